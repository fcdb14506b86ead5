"""The finetune stage: train a configured model on prompt -> answer pairs into a new expert.

``models: {NAME: {finetune: {from: base, source: ..., template: ..., answer: ...}}}`` gives the
workflow an expert of its own making, from any model it can read (a GGUF conversion, a hub
model, a local directory): the way a user turns one pretrained model into the experts a merge
then combines. The pairs are encoded exactly as the evaluator encodes a task's items (BOS rule,
leading-space boundary), the answer followed by EOS so that generation learns to stop, and the
loss is the answer tokens' mean negative log-likelihood. The run is a function of the section and
the seed: same inputs, same weights (on one machine).
"""

from __future__ import annotations

import logging
import math
import platform
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from mergeflow.data import load_source, render_pairs
from mergeflow.errors import MergeflowError
from mergeflow.evaluate import (EvalSettings, context_length, differentiable_logliks, encode_requests, load_tokenizer,
                                resolve_device)
from mergeflow.outputs import save_model
from mergeflow.progress import Progress
from mergeflow.schema import validate_section

log = logging.getLogger(__name__)


def training_pairs(name: str, section: dict, tokenizer, settings: EvalSettings) -> list[tuple[list[int], list[int]]]:
    """The section's (context ids, answer ids + EOS) pairs, encoded as the evaluator would."""
    where = f"models.{name}.finetune"
    frame = load_source(where, section["source"])
    prompts, answers = render_pairs(where, frame, section["template"], section["answer"])
    if tokenizer.eos_token_id is None:
        raise MergeflowError(f"{where}: the tokenizer of {section['from']!r} has no EOS token to end an answer with")
    pairs = encode_requests(tokenizer, [(p, section["target_delimiter"] + a) for p, a in zip(prompts, answers)],
                            settings)
    return [(ctx, ans + [tokenizer.eos_token_id]) for ctx, ans in pairs]


def batches(n: int, size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Indices of batches of ``size``: each epoch a fresh permutation, its tail left over."""
    while True:
        order = rng.permutation(n)
        for start in range(0, n - size + 1, size):
            yield order[start:start + size]


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up to the peak, then cosine decay to a tenth of it."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def finetune(name: str, spec: dict, source_dir: str | Path, out: str | Path, evaluation: dict | None = None) -> None:
    """Fine-tune the model in ``source_dir`` by ``spec['finetune']`` and write it to ``out`` (whole
    or not at all), with ``finetune.json``: the section, the loss trace and the package versions."""
    from transformers import AutoModelForCausalLM  # heavy: the workflow imports the library at parse time

    section = validate_section(spec["finetune"], "finetune", f"models.{name}.finetune")
    settings = EvalSettings.from_config(evaluation)
    tokenizer = load_tokenizer(source_dir, name=section["from"])
    pairs = training_pairs(name, section, tokenizer, settings)
    if len(pairs) < section["batch_size"]:
        raise MergeflowError(f"models.{name}.finetune: the source has {len(pairs)} pairs, fewer than one batch "
                             f"(batch_size {section['batch_size']})")
    # float32 weights and optimizer state on the evaluation's device (a GPU where there is one)
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32, use_safetensors=True)
    model.to(resolve_device(settings.device))
    max_length = context_length(model, settings)
    if not section["train_embeddings"]:
        model.get_input_embeddings().weight.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    log.info("fine-tuning %s from %s: %d pairs, %d steps of %d, %.1fM of %.1fM parameters trained", name,
             section["from"], len(pairs), section["steps"], section["batch_size"],
             sum(p.numel() for p in trained) / 1e6, sum(p.numel() for p in model.parameters()) / 1e6)

    rng = np.random.default_rng(section["seed"])
    torch.manual_seed(section["seed"])
    opt = torch.optim.AdamW(trained, lr=section["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, section["steps"], section["warmup"]))
    model.train()
    losses: list[float] = []
    meter = Progress(f"finetune {name}", section["steps"], "step")
    drawn = batches(len(pairs), section["batch_size"], rng)
    for step in range(section["steps"]):
        batch = [pairs[i] for i in next(drawn)]
        tokens = sum(len(ans) for _, ans in batch)
        loss = -differentiable_logliks(model, batch, max_length).sum() / tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        meter.update(postfix=f"loss {np.mean(losses[-10:]):.4f}")
    model.eval().cpu()
    if not all(math.isfinite(x) for x in losses):
        raise MergeflowError(f"models.{name}.finetune: the loss became {losses[-1]} (lower lr?)")

    import transformers

    save_model(model, tokenizer, out, {"finetune.json": {
        "model": name, "finetune": section, "pairs": len(pairs),
        "loss": {"first": losses[0], "last10": float(np.mean(losses[-10:]))},
        "losses": [round(x, 5) for x in losses],
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()}}})
