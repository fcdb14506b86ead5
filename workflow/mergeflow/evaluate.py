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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mergeflow.data import extract_number
from mergeflow.dtypes import torch_dtype
from mergeflow.errors import MergeflowError
from mergeflow.progress import Progress

log = logging.getLogger(__name__)

SCORERS = ("mc_loglik", "exact_match")


@dataclass(frozen=True)
class EvalSettings:
    """How to run a model: batch size, device, dtype, and the limits of a sequence (the
    config's ``evaluation`` section; its defaults are the schema's)."""

    batch_size: int
    device: str
    dtype: str
    max_length: int
    max_new_tokens: int
    add_bos: bool

    @classmethod
    def from_config(cls, cfg: dict | None = None) -> "EvalSettings":
        """From an ``evaluation`` mapping; absent keys take the schema's defaults."""
        from mergeflow.config import validate_section

        return cls(**validate_section(cfg or {}, "evaluation", "evaluation"))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeflowError(f"device {device!r} was asked for but CUDA is not available on this machine")
    return torch.device(device)


# Files a tokenizer is built from without converting a slow one (which needs sentencepiece or tiktoken).
TOKENIZER_SOURCES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, name: str | None = None):
    """A model directory's tokenizer; a directory without ``tokenizer.json`` (or another file a
    tokenizer is built from) is named as such, not as a missing sentencepiece or tiktoken."""
    from transformers import AutoTokenizer

    owner = f"model {name!r}" if name else f"model {str(path)!r}"
    directory = Path(path)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:
        if directory.is_dir() and not any((directory / f).is_file() for f in TOKENIZER_SOURCES):
            raise MergeflowError(
                f"{owner}: {str(directory / 'tokenizer.json')!r} is missing (nor is there "
                f"{' / '.join(TOKENIZER_SOURCES[1:])}), so its tokenizer cannot be built; copy the tokenizer "
                "files of the model it was fine-tuned from into that directory") from err
        raise MergeflowError(f"{owner}: cannot load its tokenizer from {str(path)!r}: {err}") from err


def load_causal_lm(path: str | Path, settings: EvalSettings, trust_remote_code: bool = False):
    """Load a model and its tokenizer for scoring: eval mode, on the configured device and dtype."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype(settings.dtype), trust_remote_code=trust_remote_code, use_safetensors=True
    )
    model.to(resolve_device(settings.device)).eval()
    return model, tokenizer


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode_many(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of many texts in one batched tokenizer call, each distinct text encoded once."""
    unique = list(dict.fromkeys(texts))
    ids = dict(zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"])) if unique else {}
    return [ids[t] for t in texts]


def _context_ids(tokenizer, prompt: str, settings: EvalSettings) -> list[int]:
    return _contexts(tokenizer, [prompt], settings)[0]


def _contexts(tokenizer, prompts: list[str], settings: EvalSettings) -> list[list[int]]:
    bos = [tokenizer.bos_token_id] if settings.add_bos and tokenizer.bos_token_id is not None else []
    return [bos + ids for ids in _encode_many(tokenizer, prompts)]


def _padded(seqs: list[list[int]], pad: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack sequences into an id matrix and an attention mask (right-padded unless ``left``)."""
    width = max(len(s) for s in seqs)
    ids = np.full((len(seqs), width), pad, dtype=np.int64)
    mask = np.zeros((len(seqs), width), dtype=np.int64)
    for r, s in enumerate(seqs):
        lo = width - len(s) if left else 0
        ids[r, lo:lo + len(s)] = s
        mask[r, lo:lo + len(s)] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def continuation_logliks(model, requests: list[tuple[list[int], list[int]]], settings: EvalSettings,
                         progress: str = "") -> np.ndarray:
    """Summed log-probability of each continuation given its context, in batches.

    Requests are sorted by length (longest first) so a batch pads little, and only the positions
    that predict continuation tokens go through the log-softmax, which matters for large vocabularies.
    """
    device = next(model.parameters()).device
    out = np.empty(len(requests), dtype=np.float64)
    order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][0]) + len(requests[i][1])))
    n_batches = math.ceil(len(order) / settings.batch_size)
    meter = Progress(progress, n_batches, "batch") if progress else None
    with torch.inference_mode():
        for b in range(n_batches):
            idx = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            fulls = [(requests[i][0] + requests[i][1])[-(settings.max_length + 1):] for i in idx]
            cont_len = torch.tensor([len(requests[i][1]) for i in idx])
            full_ids, mask = _padded(fulls, 0)
            input_ids, attention = full_ids[:, :-1], mask[:, :-1]
            # Position p of the input predicts token p + 1; a continuation of length c ending at
            # the sequence's last token is predicted from positions len - 1 - c .. len - 2.
            ends = torch.tensor([len(f) - 1 for f in fulls])
            rows = torch.repeat_interleave(torch.arange(len(idx)), cont_len)
            first = torch.repeat_interleave(torch.cumsum(cont_len, 0) - cont_len, cont_len)
            cols = (ends - cont_len)[rows] + torch.arange(len(rows)) - first
            targets = full_ids[rows, cols + 1]
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
            logprobs = torch.log_softmax(logits[rows.to(device), cols.to(device)].float(), dim=-1)
            token_lp = logprobs.gather(1, targets.to(device)[:, None])[:, 0].double()
            sums = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, rows.to(device), token_lp)
            out[idx] = sums.cpu().numpy()
            if meter:
                meter.update()
    return out


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
    contexts = [c[-settings.max_length:] for c in _contexts(tokenizer, prompts, settings)]
    order = sorted(range(len(prompts)), key=lambda i: -len(contexts[i]))
    n_batches = math.ceil(len(order) / settings.batch_size)
    meter = Progress(f"{progress} (generation)", n_batches, "batch") if progress else None
    with torch.inference_mode():
        for b in range(n_batches):
            idx = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            input_ids, attention = _padded([contexts[i] for i in idx], pad_id, left=True)
            width = input_ids.shape[1]
            gen = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 max_new_tokens=settings.max_new_tokens, do_sample=False, pad_token_id=pad_id)
            for r, i in enumerate(idx):
                text = tokenizer.decode(gen[r, width:], skip_special_tokens=True)
                for s in stop:
                    text = text.split(s)[0]
                texts[i] = text
            if meter:
                meter.update()
    return texts


def evaluate_items(model, tokenizer, items: pd.DataFrame, scorer: str, settings: EvalSettings,
                   delimiter: str = " ", progress: str = "") -> pd.DataFrame:
    """Score every item: ``item_id``, ``correct`` (0/1), ``loglik`` of the gold continuation."""
    if scorer not in SCORERS:
        raise MergeflowError(f"unknown scorer {scorer!r}; use one of {list(SCORERS)}")
    if len(items) == 0:
        raise MergeflowError("no items to evaluate")
    contexts = _contexts(tokenizer, list(items["prompt"]), settings)
    if scorer == "mc_loglik":
        conts = iter(_encode_many(tokenizer, [delimiter + str(c) for choices in items["choices"] for c in choices]))
        requests = [(ctx, next(conts)) for ctx, choices in zip(contexts, items["choices"]) for _ in choices]
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
        targets = _encode_many(tokenizer, [delimiter + str(t) for t in items["target"]])
        requests = list(zip(contexts, targets))
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
