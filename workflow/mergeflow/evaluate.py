"""The evaluator: batched scoring of any Hugging Face causal LM on a task's items.

Two scorers:

- ``mc_loglik``: multiple choice by log-likelihood. Each choice is scored as the summed
  log-probability of its tokens after the prompt; the item is correct when the gold choice has
  the highest score (lm-evaluation-harness's ``acc``).
- ``exact_match``: greedy generation, then the number in the answer is extracted (GSM8K style:
  the text after ``####`` if present, else the last number) and compared with the target.

Both also record ``loglik``, the log-likelihood of the gold continuation, which the IRT stage can
use as a graded response. Items arrive as a frame with ``item_id``, ``prompt``, ``choices``,
``answer`` (gold index, -1 for generative) and ``target`` (gold text), as the data stage writes.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mergeflow.errors import MergeflowError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCORERS = ("mc_loglik", "exact_match")


@dataclass(frozen=True)
class EvalSettings:
    """How to run a model: batch size, device, dtype, and the limits of a sequence."""

    batch_size: int = 64
    device: str = "cpu"
    dtype: str = "float32"
    max_length: int = 2048
    max_new_tokens: int = 16
    add_bos: bool = True

    @classmethod
    def from_config(cls, cfg: dict) -> "EvalSettings":
        known = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        return cls(**known)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeflowError(f"device {device!r} was asked for but CUDA is not available on this machine")
    return torch.device(device)


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise MergeflowError(f"dtype {name!r} is not supported; use one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_causal_lm(path: str | Path, settings: EvalSettings, trust_remote_code: bool = False):
    """Load a model and its tokenizer for scoring: eval mode, on the configured device and dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(settings.dtype), trust_remote_code=trust_remote_code, use_safetensors=True
    )
    model.to(resolve_device(settings.device)).eval()
    return model, tokenizer


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _context_ids(tokenizer, prompt: str, settings: EvalSettings) -> list[int]:
    ids = _encode(tokenizer, prompt)
    if settings.add_bos and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def continuation_logliks(model, requests: list[tuple[list[int], list[int]]], settings: EvalSettings,
                         progress: str = "") -> np.ndarray:
    """Summed log-probability of each continuation given its context, in batches.

    Requests are sorted by length (longest first) so a batch pads little, and only the positions
    that predict continuation tokens go through the log-softmax, which matters for large vocabularies.
    """
    device = next(model.parameters()).device
    pad = 0
    out = np.empty(len(requests), dtype=np.float64)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    t0 = time.perf_counter()
    n_batches = math.ceil(len(order) / settings.batch_size)
    with torch.inference_mode():
        for b in range(n_batches):
            idx = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            seqs, spans = [], []
            for i in idx:
                ctx, cont = requests[i]
                full = (ctx + cont)[-(settings.max_length + 1):]
                seqs.append(full[:-1])
                # positions (in the input) whose next-token prediction is a continuation token
                spans.append((len(full) - 1 - len(cont), len(full) - 1))
            width = max(len(s) for s in seqs)
            input_ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            attention = torch.zeros((len(seqs), width), dtype=torch.long)
            rows, cols, targets, owner = [], [], [], []
            for r, (s, (lo, hi)) in enumerate(zip(seqs, spans)):
                input_ids[r, : len(s)] = torch.tensor(s)
                attention[r, : len(s)] = 1
                full = s + [requests[idx[r]][1][-1]]
                for p in range(lo, hi):
                    rows.append(r)
                    cols.append(p)
                    targets.append(full[p + 1])
                    owner.append(r)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)].float()
            logprobs = torch.log_softmax(picked, dim=-1)
            token_lp = logprobs[torch.arange(len(targets), device=device), torch.tensor(targets, device=device)]
            sums = torch.zeros(len(seqs), dtype=torch.float64, device=device)
            sums.index_add_(0, torch.tensor(owner, device=device), token_lp.double())
            out[idx] = sums.cpu().numpy()
            if progress and (b + 1) % max(1, n_batches // 10) == 0:
                log.info("%s: batch %d/%d (%.1fs)", progress, b + 1, n_batches, time.perf_counter() - t0)
    return out


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_number(text: str) -> str | None:
    """The answer number of a generation: after '####' if present, else the last number."""
    if "####" in text:
        text = text.split("####")[-1]
    found = NUMBER.findall(text)
    if not found:
        return None
    return found[-1].replace(",", "").rstrip(".")


def _numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def generate_greedy(model, tokenizer, prompts: list[str], settings: EvalSettings, stop: tuple[str, ...] = ("\n",),
                    progress: str = "") -> list[str]:
    """Greedy generations for ``prompts``, left-padded in batches, cut at the first stop string."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = [""] * len(prompts)
    contexts = [_context_ids(tokenizer, p, settings)[-settings.max_length:] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(contexts[i]))
    n_batches = math.ceil(len(order) / settings.batch_size)
    with torch.inference_mode():
        for b in range(n_batches):
            idx = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            width = max(len(contexts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                ctx = contexts[i]
                input_ids[r, width - len(ctx):] = torch.tensor(ctx)
                attention[r, width - len(ctx):] = 1
            gen = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 max_new_tokens=settings.max_new_tokens, do_sample=False, pad_token_id=pad_id)
            for r, i in enumerate(idx):
                text = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
                for s in stop:
                    text = text.split(s)[0]
                texts[i] = text
            if progress:
                log.info("%s: generation batch %d/%d", progress, b + 1, n_batches)
    return texts


def evaluate_items(model, tokenizer, items: pd.DataFrame, scorer: str, settings: EvalSettings,
                   delimiter: str = " ", progress: str = "") -> pd.DataFrame:
    """Score every item: ``item_id``, ``correct`` (0/1), ``loglik`` of the gold continuation."""
    if scorer not in SCORERS:
        raise MergeflowError(f"unknown scorer {scorer!r}; use one of {list(SCORERS)}")
    if len(items) == 0:
        raise MergeflowError("no items to evaluate")
    contexts = [_context_ids(tokenizer, p, settings) for p in items["prompt"]]
    if scorer == "mc_loglik":
        requests, owners = [], []
        for i, (ctx, choices) in enumerate(zip(contexts, items["choices"])):
            for c in choices:
                requests.append((ctx, _encode(tokenizer, delimiter + str(c))))
                owners.append(i)
        scores = continuation_logliks(model, requests, settings, progress)
        correct = np.zeros(len(items), dtype=np.int8)
        loglik = np.zeros(len(items), dtype=np.float64)
        start = 0
        for i, (choices, gold) in enumerate(zip(items["choices"], items["answer"])):
            s = scores[start:start + len(choices)]
            start += len(choices)
            correct[i] = int(np.argmax(s) == gold)
            loglik[i] = s[gold]
    else:
        requests = [(ctx, _encode(tokenizer, delimiter + str(t))) for ctx, t in zip(contexts, items["target"])]
        loglik = continuation_logliks(model, requests, settings, progress)
        generations = generate_greedy(model, tokenizer, list(items["prompt"]), settings, progress=progress)
        correct = np.array([_numbers_equal(extract_number(g), extract_number(str(t)))
                            for g, t in zip(generations, items["target"])], dtype=np.int8)
    return pd.DataFrame({"item_id": items["item_id"].to_numpy(), "correct": correct, "loglik": loglik})


def respond(model_spec: dict, items_path: str | Path, scorer: str, delimiter: str, evaluation: dict,
            out: str | Path) -> pd.DataFrame:
    """The respond stage: score one model on one split and write its responses parquet."""
    from mergeflow.config import model_location
    from mergeflow.data import read_split

    settings = EvalSettings.from_config(evaluation)
    items = read_split(items_path)
    location = model_location(model_spec)
    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm(location, settings, model_spec.get("trust_remote_code", False))
    log.info("loaded %s in %.1fs on %s (%s)", location, time.perf_counter() - t0, settings.device, settings.dtype)
    t0 = time.perf_counter()
    responses = evaluate_items(model, tokenizer, items, scorer, settings, delimiter, progress=str(items_path))
    elapsed = time.perf_counter() - t0
    log.info("%d items in %.1fs (%.1f items/s); accuracy %.4f", len(items), elapsed, len(items) / elapsed,
             responses["correct"].mean())
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    responses.to_parquet(out, index=False)
    return responses
