"""The evaluator: batched scoring of any Hugging Face causal LM on a task's items.

Scorers (the registry is :mod:`mergeflow.scorers`):

- ``mc_loglik``: multiple choice by log-likelihood. Each choice is scored as the summed
  log-probability of its tokens after the prompt; the item is correct when the gold choice has
  the highest score (lm-evaluation-harness's ``acc``).
- ``mc_loglik_norm``: the same, choices ranked by log-likelihood per character (its ``acc_norm``).
- ``exact_match``: greedy generation, then the number in the answer is extracted (GSM8K style:
  the text after ``####`` if present, else the last number) and compared with the target.
- ``lm_eval_acc``, ``lm_eval_acc_norm``, ``lm_eval_generate``, ``lm_eval_loglik``: tasks named in
  lm-evaluation-harness (:mod:`mergeflow.lm_eval_tasks`): multiple choice as above with both
  ``acc`` and ``acc_norm`` recorded; greedy generation up to each item's own stop strings and
  length, judged by the task's filters and metric; the gold continuation's log-likelihood,
  correct when it is the greedy continuation.

All record ``loglik``, the log-likelihood of the gold continuation, which the IRT stage can use
as a graded response, and for debugging ``choice_logliks`` (multiple choice) or ``generation``.
Items arrive as a frame with ``item_id``, ``prompt``, ``choices``, ``answer`` (gold index, -1 for
generative) and ``target`` (gold text), as the data stage writes.

Tokenization follows lm-evaluation-harness (BOS as the tokenizer adds it, whitespace ending the
prompt moved into the answer, the answer's tokens taken from the joint encoding), so the two
agree item by item (``bench/evaluate.py``). Scoring runs each context once with all its
continuations packed after it (:class:`ScoringTree`) and computes logits only where a
continuation token is predicted; ``exact_match`` generates from the key/value cache of the same
pass that scores its gold answer.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import jinja2
import numpy as np
import pandas as pd
import torch

from mergeflow.data import PROMPT_COLUMNS, SPLIT_COLUMNS, extract_number, read_split
from mergeflow.dtypes import torch_dtype
from mergeflow.errors import MergeflowError
from mergeflow.locations import model_location
from mergeflow.progress import Progress
from mergeflow.schema import validate_section
from mergeflow.scorers import SCORERS, get_scorer  # noqa: F401 (SCORERS: the registry's home for callers)

log = logging.getLogger(__name__)


# Evaluation settings that change no answer: the batch size changes log-likelihoods in their last
# float digits and no item's correctness or generation (tests/test_evaluate.py), so jobs that
# write answers leave it out of their parameters (the workflow's answer_settings): a batch size
# lowered after an out-of-memory crash reruns nothing. Such a job reads it with job_evaluation.
ANSWER_NEUTRAL = ("batch_size",)


def job_evaluation(evaluation: dict, config_evaluation: dict) -> dict:
    """A job's evaluation settings: its parameters' (``evaluation``), with the config's values of
    the settings that change no answer (:data:`ANSWER_NEUTRAL`), which its parameters lack."""
    return {**evaluation, **{key: config_evaluation[key] for key in ANSWER_NEUTRAL if key in config_evaluation}}


@dataclass(frozen=True)
class EvalSettings:
    """How to run a model: batch size, device, dtype, and the limits of a sequence (the
    config's ``evaluation`` section; its defaults are the schema's)."""

    batch_size: int
    device: str
    dtype: str
    max_length: int | str  # "model": the model's own context length
    max_new_tokens: int
    add_bos: bool | str  # "auto": as the tokenizer adds it
    apply_chat_template: bool = False  # each prompt as one user turn of the model's chat template
    system_instruction: str | None = None  # with the chat template: a system turn before it

    @classmethod
    def from_config(cls, cfg: dict | None = None) -> "EvalSettings":
        """From an ``evaluation`` mapping; absent keys take the schema's defaults."""
        return cls(**validate_section(cfg or {}, "evaluation", "evaluation"))

    def for_task(self, task_config: dict) -> "EvalSettings":
        """These settings with a task's own chat keys (:data:`CHAT_KEYS`) where it has them."""
        chat = chat_keys(task_config)
        return replace(self, **chat) if chat else self


# The keys by which a task (or ``evaluation``, for every task) has its prompts wrapped in the
# model's chat template, as lm-evaluation-harness's --apply_chat_template and --system_instruction.
CHAT_KEYS = ("apply_chat_template", "system_instruction")


def chat_keys(mapping: dict) -> dict:
    """The chat keys a task config (or an ``evaluation`` mapping) sets: none where it sets none."""
    return {key: mapping[key] for key in CHAT_KEYS if key in mapping}


def chat_prompts(tokenizer, prompts: list[str], delimiter: str,
                 settings: EvalSettings) -> tuple[list[str], str, EvalSettings]:
    """The prompts, the delimiter before an answer and the settings as the model is given them:
    unchanged without ``apply_chat_template``; with it, each prompt wrapped in the tokenizer's chat
    template as lm-evaluation-harness 0.4 wraps a zero-shot context (few-shot examples are already
    in the prompt, as in its single-turn form): an optional system turn, the prompt as one user
    turn and the opened assistant turn, which the answer follows with no delimiter. The settings
    then come back without a BOS prefix where the rendered prompt already starts with the BOS
    token, as lm-eval then encodes it without special tokens."""
    if not settings.apply_chat_template:
        return prompts, delimiter, settings
    system = [{"role": "system", "content": settings.system_instruction}] if settings.system_instruction else []
    rendered = render_chats(tokenizer, [system + [{"role": "user", "content": p}] for p in prompts])
    return rendered, "", _bos_settings(tokenizer, rendered, settings)


def render_chats(tokenizer, chats: list[list[dict]], open_turn: list[bool] | None = None) -> list[str]:
    """Chats (lists of turns) rendered by the tokenizer's chat template as lm-evaluation-harness's
    HF model renders them: the assistant's turn opened (``open_turn``, default all) or, where a
    chat ends with a started assistant turn, continued; a template that refuses a system turn
    gets the chats without it."""
    if not getattr(tokenizer, "chat_template", None):
        raise MergeflowError("apply_chat_template is set, but the model's tokenizer has no chat template "
                             "(tokenizer_config.json or chat_template.jinja)")
    opened = open_turn if open_turn is not None else [True] * len(chats)

    def render(chat: list[dict], open_: bool) -> str:
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=open_,
                                             continue_final_message=not open_)

    try:
        return [render(chat, open_) for chat, open_ in zip(chats, opened)]
    except jinja2.exceptions.TemplateError:  # a template without a system role: lm-eval drops the turn
        log.warning("the chat template refuses a system turn; the prompts go without the system instruction")
        return [render([t for t in chat if t["role"] != "system"], open_) for chat, open_ in zip(chats, opened)]


def _bos_settings(tokenizer, rendered: list[str], settings: EvalSettings) -> EvalSettings:
    """The settings without a BOS prefix where rendered prompts already start with the BOS token."""
    bos = tokenizer.bos_token
    if bos and rendered and rendered[0].startswith(bos):
        return replace(settings, add_bos=False)
    return settings


def item_prompts(tokenizer, items: pd.DataFrame, delimiter: str,
                 settings: EvalSettings) -> tuple[list[str], str, EvalSettings]:
    """The items' prompts, the delimiter before an answer and the settings, as the model is given
    them (:func:`chat_prompts`). Items that carry their chat turns (a ``chat`` column: the turns,
    whether the assistant's turn is opened, and the delimiter that then precedes an answer, as an
    lm-evaluation-harness task builds them; ``mergeflow.lm_eval_tasks``) are rendered from those
    turns when the chat template is applied."""
    if not (settings.apply_chat_template and "chat" in items.columns):
        return chat_prompts(tokenizer, [str(p) for p in items["prompt"]], delimiter, settings)
    chats = [json.loads(c) for c in items["chat"]]
    delimiters = {c["delimiter"] for c in chats}
    if len(delimiters) > 1:
        raise MergeflowError(f"items' chat turns disagree on the delimiter before an answer ({sorted(delimiters)})")
    rendered = render_chats(tokenizer, [c["messages"] for c in chats], [c["add_generation_prompt"] for c in chats])
    return rendered, delimiters.pop(), _bos_settings(tokenizer, rendered, settings)


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
    from transformers import AutoTokenizer  # heavy: the workflow imports this module at parse time

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
    from transformers import AutoModelForCausalLM  # heavy: the workflow imports this module at parse time

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


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer itself puts BOS in front of a text it encodes with special tokens."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("0", add_special_tokens=True)["input_ids"]
    return len(ids) > len(_encode(tokenizer, "0")) and ids[0] == tokenizer.bos_token_id


def _prefix(tokenizer, settings: EvalSettings) -> list[int]:
    """The tokens put before every context: BOS when ``add_bos`` says so (``auto``: as the
    tokenizer does when it encodes with special tokens)."""
    add = tokenizer_adds_bos(tokenizer) if settings.add_bos == "auto" else settings.add_bos
    return [tokenizer.bos_token_id] if add and tokenizer.bos_token_id is not None else []


def context_length(model, settings: EvalSettings) -> int:
    """The longest sequence the evaluator feeds ``model``: ``max_length``, or with ``model`` the
    model's own context length (its config's ``max_position_embeddings`` or a synonym)."""
    config = model.config
    own = next((getattr(config, key) for key in CONTEXT_KEYS if isinstance(getattr(config, key, None), int)), None)
    if settings.max_length == "model":
        if own is None:
            raise MergeflowError(
                f"evaluation.max_length is 'model' but the model's config has none of {list(CONTEXT_KEYS)}; "
                "set evaluation.max_length to its context length")
        return own
    if own is not None and settings.max_length > own:
        log.warning("evaluation.max_length %d is longer than the model's context length %d (%s)",
                    settings.max_length, own, type(config).__name__)
    return settings.max_length


# Config keys that hold a model's context length, in the order they are looked up.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")
# Config keys of models whose logits are not just the output embedding of the last hidden state
# (soft-capping, scaling): those are scored from the model's own full logits.
LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def split_boundary(context: str, continuation: str) -> tuple[str, str]:
    """Whitespace at the end of a context belongs to the continuation (as lm-evaluation-harness
    has it), so a template ending in a space with an empty delimiter scores `` 7``, not a doubled space."""
    n = len(context) - len(context.rstrip())
    return (context[:-n], context[-n:] + continuation) if n else (context, continuation)


def encode_requests(tokenizer, pairs: list[tuple[str, str]],
                    settings: EvalSettings) -> list[tuple[list[int], list[int]]]:
    """Token ids of (context, continuation) text pairs: the context with the BOS prefix, and the
    continuation as the tokens the joint text has past the context's own (the tokenizer sees the
    answer in its context, as when the model reads it)."""
    prefix = _prefix(tokenizer, settings)
    pairs = [split_boundary(c, x) for c, x in pairs]
    contexts = _encode_many(tokenizer, [c for c, _ in pairs])
    wholes = _encode_many(tokenizer, [c + x for c, x in pairs])
    # An empty context with no BOS still needs a token to predict the continuation's first from.
    empty = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    return [((prefix + ctx) or empty, whole[len(ctx):]) for ctx, whole in zip(contexts, wholes)]


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


def _warn_truncated(count: int, total: int, max_length: int, what: str) -> None:
    if count:
        log.warning("%d of %d %s are longer than the context length %d and lose their first tokens",
                    count, total, what, max_length)


@dataclass
class ScoringTree:
    """One context and every continuation scored after it, packed into one sequence: the context,
    then one token per distinct continuation prefix (a trie), each at the position it has in its
    own sequence and attending to the context and its own ancestors only. Choices that share
    their first tokens (a delimiter, a digit) share those positions, and the context is run once."""

    tokens: list[int]
    parents: list[int]  # for each packed token past the context: the packed index it follows
    positions: list[int]
    context_len: int
    nodes: dict = field(default_factory=dict)  # continuation prefix -> packed index

    @classmethod
    def of(cls, context: tuple[int, ...]) -> "ScoringTree":
        return cls(list(context), [], list(range(len(context))), len(context))

    def add(self, answer: list[int]) -> list[int]:
        """Add a continuation; returns, for each of its tokens, the packed index predicting it."""
        at = [self.context_len - 1]
        for j in range(1, len(answer)):
            prefix = tuple(answer[:j])
            if prefix not in self.nodes:
                self.nodes[prefix] = len(self.tokens)
                self.tokens.append(answer[j - 1])
                self.parents.append(at[-1])
                self.positions.append(self.context_len + j - 1)
            at.append(self.nodes[prefix])
        return at

    def mask(self) -> np.ndarray:
        """Which packed tokens each attends to: causal over the context, ancestors past it."""
        n = len(self.tokens)
        allowed = np.zeros((n, n), dtype=bool)
        allowed[:self.context_len, :self.context_len] = np.tri(self.context_len, dtype=bool)
        for i, parent in enumerate(self.parents, start=self.context_len):
            allowed[i] = allowed[parent]
            allowed[i, i] = True
        return allowed


def shares_contexts(model, max_length: int) -> bool:
    """Whether ``model`` can score packed trees exactly: not with an attention that takes no
    arbitrary mask (flash attention), nor with a sliding window shorter than the sequences
    (the packed mask replaces the model's own, window included)."""
    window = getattr(model.config, "sliding_window", None)
    return ("flash" not in (getattr(model.config, "_attn_implementation", None) or "")
            and not (isinstance(window, int) and window < max_length))


def _truncated(context: list[int], continuation: list[int], max_length: int) -> tuple[list[int], int]:
    """What a request reads: ``(context + continuation)`` cut to ``max_length + 1`` tokens from the
    left, and how many of them are the continuation's (all but the first, if it is that long)."""
    full = (context + continuation)[-(max_length + 1):]
    return full, min(len(continuation), len(full) - 1)


def pack_requests(requests: list[tuple[list[int], list[int]]], max_length: int, share: bool = True,
                  open_ends: frozenset[int] = frozenset()
                  ) -> tuple[list[ScoringTree], list[tuple[int, list[int], list[int]]], dict[int, int]]:
    """The scoring trees of ``requests`` and, per request, its tree, the packed indices that
    predict its tokens and the tokens. A request reads ``(context + continuation)`` cut to
    ``max_length + 1`` tokens from the left, so that requests truncated alike share a tree; a
    request whose continuation itself is cut (longer than the window: its context is then one
    token, which unrelated requests would share in one tree of all their continuations) and,
    without ``share``, every request has a tree of its own (a plain sequence). The requests in
    ``open_ends`` are a generation's start: their whole continuation is packed, and the third
    result maps their tree to the packed index after which it generates."""
    trees: list[ScoringTree] = []
    by_context: dict = {}
    reads = []
    starts: dict[int, int] = {}
    for i, (ctx, cont) in enumerate(requests):
        full, c = _truncated(ctx, cont, max_length)
        context, answer = tuple(full[:len(full) - c]), full[len(full) - c:]
        key = context if share and c == len(cont) else ("own", i)
        if key not in by_context:
            by_context[key] = len(trees)
            trees.append(ScoringTree.of(context))
        t = by_context[key]
        if i in open_ends:  # one more (unscored) token packs the continuation's last as a node
            at = trees[t].add(answer + [0])
            if starts.setdefault(t, at[-1]) != at[-1]:
                raise MergeflowError("two generations would start from one scoring tree at different tokens")
            reads.append((t, at[:-1], answer))
        else:
            reads.append((t, trees[t].add(answer), answer))
    return trees, reads, starts


def _forward(model, inputs: dict, rows: torch.Tensor, cols: torch.Tensor):
    """The logits at positions (``rows``, ``cols``) only, and the model's cache (None unless
    ``inputs`` ask for one): the output embedding is applied to the gathered hidden states, not
    to every position (with a large vocabulary it dominates the cost)."""
    head = model.get_output_embeddings()
    if head is None or any(getattr(model.config, key, None) for key in LOGIT_TRANSFORM_KEYS):
        out = model(**inputs)
        logits = out.logits[rows, cols]
    else:
        out = model.get_decoder()(**inputs)
        logits = head(out.last_hidden_state[rows, cols])
    return logits, (out.get("cache") if "cache" in out else out.get("past_key_values"))


def _cache_keyword(model) -> str:
    """The name the model's forward takes its key/value cache by (``cache`` from transformers 5)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _additive(allowed: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask to add to the scores (eager attention adds it, SDPA takes it as it is)."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(torch.from_numpy(~allowed), torch.finfo(dtype).min)


def differentiable_logliks(model, requests: list[tuple[list[int], list[int]]], max_length: int) -> torch.Tensor:
    """Summed log-probability of each continuation given its context, as a float32 tensor through
    which gradients flow to the model's parameters (for a loss to train on). One right-padded
    forward pass over all the requests, nothing shared or cached: batch them as memory allows. A
    request longer than ``max_length + 1`` tokens loses its first tokens, as in the evaluator; the
    scores agree with :func:`continuation_logliks` (no gradient, faster) up to rounding."""
    seqs, kept = zip(*(_truncated(ctx, cont, max_length) for ctx, cont in requests))
    ids, mask = _padded([s[:-1] for s in seqs], 0)
    targets, _ = _padded([s[1:] for s in seqs], 0)
    scored = torch.zeros(ids.shape, dtype=torch.bool)  # the positions that predict a continuation token
    for r, (seq, c) in enumerate(zip(seqs, kept)):
        scored[r, len(seq) - 1 - c:len(seq) - 1] = True
    device = next(model.parameters()).device
    rows, cols = scored.nonzero(as_tuple=True)
    # Only the scored positions go through the output embedding (as in _forward): with a large
    # vocabulary, logits at every position would dominate the step's memory and time.
    logits, _ = _forward(model, {"input_ids": ids.to(device), "attention_mask": mask.to(device), "use_cache": False},
                         rows.to(device), cols.to(device))
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.to(device)[rows, cols][:, None])[:, 0]
    return torch.zeros(len(seqs), dtype=logp.dtype, device=device).index_add(0, rows.to(device), logp)


def continuation_logliks(model, requests: list[tuple[list[int], list[int]]], batch_size: int, max_length: int,
                         progress: str = "", greedy: np.ndarray | None = None) -> np.ndarray:
    """Summed log-probability of each continuation given its context (:func:`score_requests`;
    ``greedy`` receives whether each continuation is the greedy one)."""
    return score_requests(model, requests, batch_size, max_length, progress, greedy=greedy)[0]


def score_requests(model, requests: list[tuple[list[int], list[int]]], batch_size: int, max_length: int,
                   progress: str = "", max_new_tokens: int = 0, stop_ids: frozenset[int] = frozenset(),
                   stopped: Callable[[list[int]], bool] | None = None, open_ends: frozenset[int] = frozenset(),
                   greedy: np.ndarray | None = None) -> tuple[np.ndarray, list[list[int]]]:
    """Summed log-probability of each continuation given its context and, with
    ``max_new_tokens``, the greedy continuation of each request's scoring tree (up to a stop id,
    which is left out), decoded from the tree's own pass and key/value cache. A continuation for
    which ``stopped`` holds (it reached a stop string) gets no more tokens, and decoding ends when
    every continuation of the batch is done. Given ``greedy`` (a boolean array, one per request),
    it receives whether each continuation is the one greedy decoding would give, every token the
    most likely (lm-eval's ``is_greedy``). A tree holding a request of ``open_ends`` generates
    after that request's continuation instead (a prompt's trailing whitespace, which the gold
    answer's scoring moves into its continuation: both then share one pass).

    Requests with the same context are scored from one packed sequence (:class:`ScoringTree`);
    the sequences are sorted by length, longest first, so that a batch pads little; logits are
    computed once for each position that predicts a continuation token, and nowhere else.
    Generation needs the packed mask (:func:`shares_contexts`).
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    _warn_truncated(sum(len(c) + len(x) > max_length + 1 for c, x in requests), len(requests), max_length,
                    "scored sequences")
    share = shares_contexts(model, max_length)
    if max_new_tokens and not share:
        raise MergeflowError("greedy generation from scoring trees needs a model that takes a packed mask")
    trees, reads, starts = pack_requests(requests, max_length, share, open_ends)
    order = sorted(range(len(trees)), key=lambda t: -len(trees[t].tokens))
    batch_of = [0] * len(trees)
    for rank, t in enumerate(order):
        batch_of[t] = rank // batch_size
    members: list[list[int]] = [[] for _ in range(math.ceil(len(trees) / batch_size))]
    for i, (t, _, _) in enumerate(reads):
        members[batch_of[t]].append(i)
    out = np.zeros(len(requests), dtype=np.float64)
    generated: list[list[int]] = [[] for _ in trees]
    cache_keyword = _cache_keyword(model)
    meter = Progress(progress, len(members), "batch") if progress else None
    with torch.inference_mode():
        for b, idx in enumerate(members):
            batch = order[b * batch_size:(b + 1) * batch_size]
            width = len(trees[batch[0]].tokens)
            ids = np.zeros((len(batch), width), dtype=np.int64)
            positions = np.zeros((len(batch), width), dtype=np.int64)
            allowed = np.broadcast_to(np.eye(width, dtype=bool), (len(batch), 1, width, width)).copy()
            # Logits are needed from the context's last token on; first[t] is where tree t's rows
            # start among the gathered ones.
            rows, cols, first = [], [], {}
            for r, t in enumerate(batch):
                tree, n = trees[t], len(trees[t].tokens)
                ids[r, :n], positions[r, :n] = tree.tokens, tree.positions
                allowed[r, 0, :n, :n] = tree.mask()
                first[t] = len(rows) - (tree.context_len - 1)
                rows += [r] * (n - tree.context_len + 1)
                cols += range(tree.context_len - 1, n)
            inputs = {"input_ids": torch.from_numpy(ids).to(device), "use_cache": bool(max_new_tokens)}
            shared = _shared_prefix([trees[t] for t in batch]) if share else 0
            if shared:
                # The batch's common prefix (a system prompt, a template's head) is read once and
                # its keys and values given to every row: the rows then read only their own tokens.
                _, prefix_cache = _forward(model, {"input_ids": torch.from_numpy(ids[:1, :shared]).to(device),
                                                   "position_ids": torch.from_numpy(positions[:1, :shared]).to(device),
                                                   "use_cache": True}, torch.zeros(0, dtype=torch.long, device=device),
                                           torch.zeros(0, dtype=torch.long, device=device))
                prefix_cache.batch_repeat_interleave(len(batch))
                inputs = {"input_ids": inputs["input_ids"][:, shared:], cache_keyword: prefix_cache, "use_cache": True}
                cols = [c - shared for c in cols]
            if share:
                inputs |= {"attention_mask": _additive(allowed[:, :, shared:, :], dtype).to(device),
                           "position_ids": torch.from_numpy(positions[:, shared:]).to(device)}
            else:  # plain right-padded sequences: the model builds its own causal (and window) mask
                lengths = torch.tensor([len(trees[t].tokens) for t in batch])[:, None]
                inputs["attention_mask"] = (torch.arange(width)[None, :] < lengths).long().to(device)
            logits, cache = _forward(model, inputs, torch.tensor(rows, device=device), torch.tensor(cols, device=device))
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            at = [first[reads[i][0]] + j for i in idx for j in reads[i][1][:len(reads[i][2])]]
            targets = [tok for i in idx for tok in reads[i][2]]
            owner = [k for k, i in enumerate(idx) for _ in reads[i][2]]
            # (long: a batch of generation contexts alone has no continuation tokens to index)
            token_lp = logprobs[torch.tensor(at, dtype=torch.long, device=device),
                                torch.tensor(targets, dtype=torch.long, device=device)].double()
            sums = torch.zeros(len(idx), dtype=torch.float64, device=device)
            owner_at = torch.tensor(owner, device=device, dtype=torch.long)
            sums.index_add_(0, owner_at, token_lp)
            out[idx] = sums.cpu().numpy()
            if greedy is not None:
                rows_at = torch.tensor(at, dtype=torch.long, device=device)
                misses = (logprobs[rows_at].argmax(-1) != torch.tensor(targets, dtype=torch.long, device=device))
                wrong = torch.zeros(len(idx), dtype=torch.float64, device=device).index_add_(0, owner_at, misses.double())
                greedy[idx] = (wrong == 0).cpu().numpy()
            if max_new_tokens:
                # each tree generates after its context's last token, or after an open-ended continuation
                nodes = [starts.get(t, trees[t].context_len - 1) for t in batch]
                ends = [first[t] + node for t, node in zip(batch, nodes)]
                _decode_greedy(model, allowed[np.arange(len(batch)), 0, nodes],
                               [trees[t].positions[node] + 1 for t, node in zip(batch, nodes)],
                               logits[ends].float().argmax(-1), cache, cache_keyword, max_new_tokens, stop_ids,
                               [generated[t] for t in batch], stopped)
            if meter:
                meter.update()
    return out, [generated[t] for t, _, _ in reads]


# The shortest common prefix worth a pass of its own: below it the extra pass costs more than it saves.
SHARED_PREFIX_MIN = 16


def _shared_prefix(trees: list[ScoringTree]) -> int:
    """How many leading tokens every tree of a batch has in common, short of each context's last
    token (where its scored positions start); 0 when a single tree or fewer than
    :data:`SHARED_PREFIX_MIN` tokens are shared."""
    if len(trees) < 2:
        return 0
    limit = min(tree.context_len for tree in trees) - 1
    first = trees[0].tokens
    n = 0
    while n < limit and all(tree.tokens[n] == first[n] for tree in trees[1:]):
        n += 1
    return n if n >= SHARED_PREFIX_MIN else 0


def _decode_greedy(model, seen: np.ndarray, start: list[int], first: torch.Tensor, cache, cache_keyword: str,
                   max_new_tokens: int, stop_ids: frozenset[int], into: list[list[int]],
                   stopped: Callable[[list[int]], bool] | None = None) -> None:
    """Greedy decoding of a batch of trees after their packed pass, each row from one packed token
    (the context's last, or the end of a packed continuation): ``seen`` is what that token attends
    to (its row of the tree's mask), ``start`` the position after it, ``first`` the tokens it
    predicts, ``cache`` the pass's keys and values. A new token sits at the next position and
    attends to what the start token attends to and the tokens generated before it, never to the
    other continuations packed in the tree; ``into`` (one list per row) receives the tokens up to
    the first stop id."""
    device, dtype = first.device, next(model.parameters()).dtype
    start = torch.tensor(start, device=device)
    token, done = first, [False] * len(into)
    for step in range(max_new_tokens):
        for r, tok in enumerate(token.tolist()):
            done[r] = done[r] or tok in stop_ids
            if not done[r]:
                into[r].append(tok)
                done[r] = stopped is not None and stopped(into[r])
        if all(done) or step == max_new_tokens - 1:
            return
        seen = np.concatenate([seen, np.ones((len(into), 1), dtype=bool)], axis=1)
        inputs = {"input_ids": token[:, None], "position_ids": (start + step)[:, None], cache_keyword: cache,
                  "attention_mask": _additive(seen[:, None, None, :], dtype).to(device), "use_cache": True}
        logits, cache = _forward(model, inputs, torch.arange(len(into), device=device),
                                 torch.zeros(len(into), dtype=torch.long, device=device))
        token = logits.float().argmax(-1)


def _numbers_equal(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


STOP = ("\n",)  # a generation ends at the first of these


def _cut(text: str, stop: tuple[str, ...] = STOP) -> str:
    for s in stop:
        text = text.split(s)[0]
    return text


def _reaches_stop(tokenizer, stop: tuple[str, ...] = STOP) -> Callable[[list[int]], bool]:
    """Whether generated tokens already hold a stop string: the tokens after it are cut
    (:func:`_cut`), so generating them is wasted (lm-eval's ``until`` ends there too)."""
    return lambda tokens: any(s in tokenizer.decode(tokens, skip_special_tokens=True) for s in stop)


class _StopCriterion:
    """``generate``'s stopping criterion for :func:`_reaches_stop`: per row, whether the tokens
    after the prompt (``width`` wide) hold a stop string."""

    def __init__(self, width: int, stopped: Callable[[list[int]], bool]):
        self.width, self.stopped = width, stopped

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = [self.stopped(row[self.width:].tolist()) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _stop_ids(model, tokenizer) -> frozenset[int]:
    """The tokens that end a generation: the model's generation config's EOS, as ``generate`` has it."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = tokenizer.eos_token_id if eos is None else eos
    return frozenset([eos] if isinstance(eos, int) else eos or [])


def _generation_contexts(tokenizer, prompts: list[str], settings: EvalSettings, max_length: int) -> list[list[int]]:
    """The prompts' tokens a generation starts from: the last ``context length - max_new_tokens``,
    so that the prompt and the generation fit the model."""
    keep = max(1, max_length - settings.max_new_tokens)
    prefix = _prefix(tokenizer, settings)
    full = [prefix + ids for ids in _encode_many(tokenizer, prompts)]
    _warn_truncated(sum(len(c) > keep for c in full), len(full), keep, "prompts to generate from")
    return [c[-keep:] for c in full]


def generate_greedy(model, tokenizer, prompts: list[str], settings: EvalSettings, progress: str = "",
                    stop: tuple[str, ...] = STOP) -> list[str]:
    """Greedy generations for ``prompts`` with ``generate``, left-padded in batches, cut at the
    first stop string: for models that take no packed mask (see :func:`score_requests`)."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts: list[str] = [""] * len(prompts)
    contexts = _generation_contexts(tokenizer, prompts, settings, context_length(model, settings))
    order = sorted(range(len(prompts)), key=lambda i: -len(contexts[i]))
    n_batches = math.ceil(len(order) / settings.batch_size)
    meter = Progress(f"{progress} (generation)", n_batches, "batch") if progress else None
    with torch.inference_mode():
        for b in range(n_batches):
            idx = order[b * settings.batch_size:(b + 1) * settings.batch_size]
            input_ids, attention = _padded([contexts[i] for i in idx], pad_id, left=True)
            width = input_ids.shape[1]
            gen = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                 max_new_tokens=settings.max_new_tokens, do_sample=False, pad_token_id=pad_id,
                                 stopping_criteria=[_StopCriterion(width, _reaches_stop(tokenizer, stop))])
            for r, i in enumerate(idx):
                texts[i] = _cut(tokenizer.decode(gen[r, width:], skip_special_tokens=True), stop)
            if meter:
                meter.update()
    return texts


def evaluate_items(model, tokenizer, items: pd.DataFrame, scorer: str, settings: EvalSettings,
                   delimiter: str = " ", progress: str = "") -> pd.DataFrame:
    """Score every item: ``item_id``, ``correct`` (0/1), ``loglik`` of the gold continuation, and
    for debugging ``choice_logliks`` (every choice's log-likelihood, multiple choice) or
    ``generation`` (the greedy answer, cut at the stop string), and what the scorer adds (the
    ``acc`` and ``acc_norm`` of an lm-eval multiple-choice task, its judge's columns)."""
    how = get_scorer(scorer)
    if len(items) == 0:
        raise MergeflowError("no items to evaluate")
    max_length = context_length(model, settings)
    prompts, delimiter, settings = item_prompts(tokenizer, items, delimiter, settings)
    if how.choices:
        pairs = [(p, delimiter + str(c)) for p, choices in zip(prompts, items["choices"]) for c in choices]
        scores = continuation_logliks(model, encode_requests(tokenizer, pairs, settings), settings.batch_size,
                                      max_length, progress)
        acc = np.zeros(len(items), dtype=np.int8)
        acc_norm = np.zeros(len(items), dtype=np.int8)
        loglik = np.zeros(len(items), dtype=np.float64)
        per_choice = []
        start = 0
        for i, (choices, gold) in enumerate(zip(items["choices"], items["answer"])):
            s = scores[start:start + len(choices)]
            start += len(choices)
            acc[i] = int(np.argmax(s) == gold)
            acc_norm[i] = int(np.argmax(s / np.array([len(str(c)) for c in choices], dtype=np.float64)) == gold)
            loglik[i] = s[gold]
            per_choice.append(s.tolist())
        correct = acc_norm if how.length_normalised else acc
        extra = {"choice_logliks": per_choice, **({"acc": acc, "acc_norm": acc_norm} if how.both_norms else {})}
    elif not how.generates:
        greedy = np.zeros(len(items), dtype=bool)
        pairs = [(p, delimiter + str(t)) for p, t in zip(prompts, items["target"])]
        loglik = continuation_logliks(model, encode_requests(tokenizer, pairs, settings), settings.batch_size,
                                      max_length, progress, greedy=greedy)
        correct, extra = greedy.astype(np.int8), {}
    else:
        loglik = np.zeros(len(items), dtype=np.float64)
        generations = [""] * len(items)
        for (stop, max_new), idx in generation_groups(tokenizer, items, settings).items():
            lls, texts = answer_and_generate(model, tokenizer, [prompts[i] for i in idx],
                                             [str(items["target"].iloc[i]) for i in idx], delimiter,
                                             replace(settings, max_new_tokens=max_new), max_length, stop, progress)
            loglik[idx] = lls
            for i, text in zip(idx, texts):
                generations[i] = text
        if how.judge is None:
            correct = np.array([_numbers_equal(extract_number(g), extract_number(str(t)))
                                for g, t in zip(generations, items["target"])], dtype=np.int8)
            extra = {"generation": generations}
        else:
            module, function = how.judge.split(":")
            correct, judged = getattr(importlib.import_module(module), function)(items, generations)
            extra = {"generation": generations, **judged}
    return pd.DataFrame({"item_id": items["item_id"].to_numpy(), "correct": correct, "loglik": loglik, **extra})


def generation_groups(tokenizer, items: pd.DataFrame,
                      settings: EvalSettings) -> dict[tuple[tuple[str, ...], int], list[int]]:
    """The items' positions by how they are generated: (stop strings, most new tokens). Items
    that carry their own (``until`` and ``max_gen_toks`` columns, an lm-evaluation-harness task's
    generation arguments) stop at those strings and at the text of the tokenizer's EOS token, as
    lm-eval stops them; others at :data:`STOP`, after ``max_new_tokens``."""
    if "until" not in items.columns:
        return {(STOP, settings.max_new_tokens): list(range(len(items)))}
    eos = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False) if tokenizer.eos_token_id is not None else None
    groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
    for i, (until, max_new) in enumerate(zip(items["until"], items["max_gen_toks"])):
        stop = [str(u) for u in until]
        if eos and eos not in stop:
            stop.append(eos)
        groups.setdefault((tuple(u for u in stop if u), int(max_new)), []).append(i)
    return groups


def answer_and_generate(model, tokenizer, prompts: list[str], targets: list[str], delimiter: str,
                        settings: EvalSettings, max_length: int, stop: tuple[str, ...],
                        progress: str = "") -> tuple[np.ndarray, list[str]]:
    """The gold answers' log-likelihoods and the greedy generations (at most
    ``settings.max_new_tokens`` tokens, cut at the first of ``stop``) of prompts."""
    gold = encode_requests(tokenizer, [(p, delimiter + t) for p, t in zip(prompts, targets)], settings)
    if not shares_contexts(model, max_length):
        loglik = continuation_logliks(model, gold, settings.batch_size, max_length, progress)
        return loglik, generate_greedy(model, tokenizer, prompts, settings, progress=progress, stop=stop)
    # One pass per prompt scores the gold answer and starts the generation. A prompt ending in
    # whitespace: its gold context lacks the whitespace's tokens, which the generation reads as a
    # packed continuation of that context; only a cut prompt needs a tree of its own.
    contexts = _generation_contexts(tokenizer, prompts, settings, max_length)
    starts = [(g, c[len(g):]) if len(c) > len(g) and c[:len(g)] == g else (c, [])
              for (g, _), c in zip(gold, contexts)]
    loglik, tokens = score_requests(model, gold + starts, settings.batch_size, max_length, progress,
                                    settings.max_new_tokens, _stop_ids(model, tokenizer), _reaches_stop(tokenizer, stop),
                                    frozenset(len(gold) + i for i, (_, w) in enumerate(starts) if w))
    return loglik[:len(gold)], [_cut(tokenizer.decode(t, skip_special_tokens=True), stop) for t in tokens[len(gold):]]


def teacher_outputs(model, tokenizer, items: pd.DataFrame, scorer: str, settings: EvalSettings,
                    delimiter: str = " ") -> pd.DataFrame:
    """What a model answers on prompts without gold answers: per ``item_id``, its choices'
    log-likelihoods (``choice_logliks``, multiple choice) or its greedy ``generation`` (a generating
    scorer), the evaluator's own (:func:`evaluate_items`, given a placeholder gold whose scores are
    dropped; a generation is the same whichever scorer judges it, so no judge is run on the placeholder)."""
    how = get_scorer(scorer)
    if not (how.choices or how.generates):
        raise MergeflowError(f"scorer {scorer!r} neither scores choices nor generates: a model has no output to teach")
    placeholder = items.assign(answer=0, target="")
    responses = evaluate_items(model, tokenizer, placeholder, scorer if how.choices else "exact_match", settings,
                               delimiter)
    return responses[["item_id", "choice_logliks" if how.choices else "generation"]]


def teach(model_spec: dict, items_path: str | Path, scorer: str, delimiter: str, evaluation: dict,
          out: str | Path) -> pd.DataFrame:
    """The teach stage: a model's outputs on a split read without its answers
    (:func:`teacher_outputs`), the targets a label-free agreement loss pulls a merge towards."""
    return _model_on_split(model_spec, items_path, PROMPT_COLUMNS, evaluation, out,
                           lambda model, tokenizer, items, settings: teacher_outputs(model, tokenizer, items, scorer,
                                                                                     settings, delimiter))


def respond(model_spec: dict, items_path: str | Path, scorer: str, delimiter: str, evaluation: dict,
            out: str | Path) -> pd.DataFrame:
    """The respond stage: score one model on one split and write its responses parquet."""
    responses = _model_on_split(model_spec, items_path, SPLIT_COLUMNS, evaluation, out,
                                lambda model, tokenizer, items, settings: evaluate_items(
                                    model, tokenizer, items, scorer, settings, delimiter, progress=str(items_path)))
    log.info("accuracy %.4f", responses["correct"].mean())
    return responses


def _model_on_split(model_spec: dict, items_path: str | Path, columns: tuple[str, ...], evaluation: dict,
                    out: str | Path, score: Callable) -> pd.DataFrame:
    """A stage that runs one model over one split's items (read as ``columns``): ``score(model,
    tokenizer, items, settings)``'s frame, written to ``out``."""
    settings = EvalSettings.from_config(evaluation)
    items = read_split(items_path, columns)
    location = model_location(model_spec)
    t0 = time.perf_counter()
    model, tokenizer = load_causal_lm(location, settings, model_spec.get("trust_remote_code", False))
    log.info("loaded %s in %.1fs on %s (%s)", location, time.perf_counter() - t0, settings.device, settings.dtype)
    t0 = time.perf_counter()
    frame = score(model, tokenizer, items, settings)
    elapsed = time.perf_counter() - t0
    log.info("%d items in %.1fs (%.1f items/s)", len(items), elapsed, len(items) / elapsed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out, index=False)
    return frame
