"""Build the embedded default's tiny model zoo on CPU: a tokenizer, a base, and experts.

Every model is a standard Hugging Face directory (Llama config, ``model.safetensors``, a
``PreTrainedTokenizerFast``) that ``AutoModelForCausalLM`` / ``AutoTokenizer`` load with no extra
code. Everything is a function of the seed.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
)

from mergeflow.finetune import lr_factor
from mergeflow.outputs import save_model
from mergeflow.progress import Progress
from mergeflow.zoo import language

log = logging.getLogger(__name__)

SPECIAL_TOKENS = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>", "unk": "<unk>"}
SPACE = "\u2581"  # the Metaspace marker: a word-start token


def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over both languages; numbers split into digits.

    The Metaspace pre-tokenizer marks word starts, so decoding restores spaces and writes
    numbers as one word again ("4", "2" -> "42").
    """
    vocab: dict[str, int] = {}
    for tok in list(SPECIAL_TOKENS.values()) + [SPACE] + [SPACE + w for w in language.vocabulary()] + language.DIGITS:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=SPECIAL_TOKENS["eos"],
        unk_token=SPECIAL_TOKENS["unk"],
        pad_token=SPECIAL_TOKENS["pad"],
    )


@dataclass(frozen=True)
class TrainSpec:
    """One training phase: which corpus, how many steps, batch size and peak learning rate."""

    corpus: str
    steps: int
    batch_size: int
    lr: float
    warmup: int = 50
    checkpoint_every: int = 0


def new_model(tokenizer, hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int,
              max_positions: int, seed: int, num_key_value_heads: int | None = None):
    """An untrained Llama over ``tokenizer``'s vocabulary (grouped-query attention when
    ``num_key_value_heads`` is fewer than the heads)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_key_value_heads or num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _batch(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (bos + text + eos, right-padded) and labels with padding masked out."""
    ids = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(ids), width), -100, dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(x)] = torch.tensor(x)
    return input_ids, labels


def train(model, tokenizer, spec: TrainSpec, seed: int, checkpoint_dir: Path | None = None) -> list[float]:
    """AdamW with linear warm-up and cosine decay on freshly sampled texts; returns the loss trace."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    sample = language.CORPORA[spec.corpus]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.98))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, spec.steps, spec.warmup))
    model.train()
    losses = []
    meter = Progress(f"zoo {spec.corpus}", spec.steps, "step")
    for step in range(spec.steps):
        input_ids, labels = _batch(tokenizer, [sample(rng) for _ in range(spec.batch_size)])
        loss = model(input_ids=input_ids, attention_mask=(labels != -100).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        meter.update(postfix=f"loss {np.mean(losses[-100:]):.4f}")
        if checkpoint_dir is not None and spec.checkpoint_every and (step + 1) % spec.checkpoint_every == 0 \
                and step + 1 < spec.steps:
            save_model(model, tokenizer, checkpoint_dir / f"step_{step + 1:05d}")
    model.eval()
    return losses


def _kernels(cfg: dict) -> dict:
    """The pinned kernels a zoo model trained with (zoo.kernels), and the ATen dispatch they gave;
    nothing for native kernels (the record the default's zoo always had)."""
    if "kernels" not in cfg:
        return {}
    return {"kernels": cfg["kernels"], "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def build_base(cfg: dict, out: Path) -> None:
    """Pretrain the base model on both languages (see ``language.pretraining_text``)."""
    arch = cfg["model"]
    tokenizer = build_tokenizer()
    model = new_model(tokenizer, arch["hidden_size"], arch["intermediate_size"], arch["num_layers"],
                      arch["num_heads"], arch["max_positions"], seed=cfg["seed"])
    phase = cfg["base"]
    spec = TrainSpec("pretrain", phase["steps"], phase["batch_size"], phase["lr"])
    losses = train(model, tokenizer, spec, seed=cfg["seed"])
    save_model(model, tokenizer, out, {"zoo.json": {"role": "base", "corpus": "pretrain", "steps": spec.steps,
                                                    "final_loss": float(np.mean(losses[-50:])), "seed": cfg["seed"],
                                                    **_kernels(cfg)}})


def build_expert(cfg: dict, name: str, base_dir: Path, out: Path, checkpoints: Path) -> None:
    """Fine-tune the base on one expert's corpus, keeping intermediate checkpoints."""
    phase = cfg["experts"][name]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    seed = cfg["seed"] + 1 + sorted(cfg["experts"]).index(name)
    spec = TrainSpec(phase["corpus"], phase["steps"], phase["batch_size"], phase["lr"],
                     checkpoint_every=cfg.get("checkpoint_every", 0))
    checkpoints.mkdir(parents=True, exist_ok=True)
    losses = train(model, tokenizer, spec, seed=seed, checkpoint_dir=checkpoints)
    save_model(model, tokenizer, out, {"zoo.json": {"role": "expert", "corpus": spec.corpus, "steps": spec.steps,
                                                    "final_loss": float(np.mean(losses[-50:])), "seed": seed,
                                                    **_kernels(cfg)}})


def write_task_sources(cfg: dict, out_dir: Path) -> None:
    """Write each synthetic task as a parquet file that the data stage loads like any dataset."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in cfg["tasks"]:
        rng = np.random.default_rng([cfg["seed"], zlib.crc32(name.encode())])
        frame = pd.DataFrame(language.task_items(name, cfg["task_items"], rng))
        frame.to_parquet(out_dir / f"{name}.parquet", index=False)
