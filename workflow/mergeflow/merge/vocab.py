"""Models whose vocabularies differ: the output vocabulary of a recipe's ``tokenizer_source``
(``base``, ``union`` or a model) and each model's embedding rows permuted into it, as mergekit
0.1.5 does (``mergekit/tokenizer``).

**The output vocabulary** is the base's (``base``), a model's (a path), or the union (``union``):
the base's tokenizer, then the tokens the base lacks, added as added tokens: first every model's
ordinary tokens, then every model's added tokens with their own settings (special, normalized),
the first model's settings winning. Models go base first, then in recipe order, and a model's
tokens by id (mergekit's order of the models is a set's, of a model's ordinary tokens a hash
map's). The tokens of ``tokenizer.tokens`` that it still lacks are added last. The base is the
recipe's ``base_model``, else its first model (mergekit's: the first of that set).

**The rows.** Every tensor over the vocabulary (:func:`is_vocabulary_tensor`) of every model
merged into it gets one row per output token: the model's own row of the token; for a token it
lacks (and, for a token of ``tokenizer.tokens`` with ``force``, for every model) a row shared by
the models of that tensor: the override's source if ``tokenizer.tokens`` names one; else the row
of the one model that has the token, the base's row if it has it, or the mean of the rows of the
models that have it; zeros when none has it. The merge method then runs on these rows as on any
tensor: a model lacking a token is not masked out of the weights, it brings the filled row.
With ``tokenizer.pad_to_multiple_of``, the rows are padded to that multiple, each model's padding
rows the mean of its rows above (the tokenizer is not padded; ``config.json``'s ``vocab_size`` is).

A filled row is computed in the merge's compute dtype and held in its model's own dtype (exact
for float32 models; mergekit keeps a mean of bfloat16 rows in float32 when the recipe's dtype is).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import torch

from mergeflow.errors import MergeflowError, RecipeError
from mergeflow.merge.params import is_pre_layer_tensor
from mergeflow.merge.plan import STREAM_BLOCK, MergePlan
from mergeflow.merge.recipe import Recipe, TokenOverride
from mergeflow.merge.sources import ModelSource

# Names (last components) of the tensors with one row per token: the input embeddings (Llama,
# Mistral, Qwen: embed_tokens; GPT-2: wte) and the LM head.
VOCABULARY_TENSORS = ("embed_tokens.weight", "wte.weight", "lm_head.weight")
# What a recipe merging models whose vocabularies differ must say.
RECIPE_HINT = "set tokenizer_source: union or base to merge models whose vocabularies differ"

log = logging.getLogger(__name__)


def is_vocabulary_tensor(name: str) -> bool:
    """Whether a tensor has one row per token (embeddings, LM head)."""
    return any(name == suffix or name.endswith("." + suffix) for suffix in VOCABULARY_TENSORS)


def vocabulary_difference(vocab: dict[str, int], reference: dict[str, int], of: str) -> str | None:
    """The first id at which a vocabulary differs from a ``reference`` one, in words (``of``
    names the reference: "the base 'b'"); None when they are equal."""
    if vocab == reference:
        return None
    by_id = {index: token for token, index in vocab.items()}
    reference_by_id = {index: token for token, index in reference.items()}
    for index in sorted(by_id.keys() | reference_by_id.keys()):
        token, theirs = by_id.get(index), reference_by_id.get(index)
        if token == theirs:
            continue
        if token is not None:
            if token not in reference:
                return f"token {token!r} (id {index}) is not in {of} vocabulary"
            return f"token {token!r} has id {index} but id {reference[token]} in {of} vocabulary"
        if theirs not in vocab:
            return f"{of} token {theirs!r} (id {index}) is not in its vocabulary"
        return f"{of} token {theirs!r} (id {index}) has id {vocab[theirs]} in its vocabulary"
    return None


def first_difference(vocab: "Vocabulary") -> str:
    """Why a merge has a vocabulary to reconcile, in words: the first model whose vocabulary is not
    the output's, else the token overrides."""
    for path, own in vocab.vocabs.items():
        if difference := vocabulary_difference(own, vocab.tokens, "the output"):
            return f"model {path!r}: {difference}"
    return "tokenizer.tokens overrides rows" if vocab.overrides else "the models' vocabulary tensors differ in rows"


@dataclass
class Vocabulary:
    """A recipe's output vocabulary and, per model, where each output token's row is."""

    tokenizer: Any  # the output tokenizer (transformers), written beside the merged weights
    tokens: dict[str, int]  # output token -> id (ids 0 .. n-1)
    size: int  # rows of the output: n, or n padded to a multiple of tokenizer.pad_to_multiple_of
    rows: dict[str, list[int]]  # model path -> per output id, the model's row of that token or -1
    vocabs: dict[str, dict[str, int]]  # each model's own vocabulary
    overrides: dict[str, TokenOverride]


def plan_vocabulary(recipe: Recipe, sources: dict[str, ModelSource]) -> Vocabulary | None:
    """The output vocabulary of a recipe with a ``tokenizer_source``; None when there is nothing to
    reconcile (one vocabulary, that of its source, the base's rows in every model, and no token
    overrides): the merge then takes the tensors as they are. Refused: a model with a token beyond
    its embedding rows; without ``tokenizer_source``, models whose vocabulary tensors differ in
    shape from the base's (the first differing token named; the vocabularies themselves are the
    check's to compare, :func:`mergeflow.check.compare_to_base`)."""
    base = recipe.base_model or recipe.model_paths()[0]
    if not recipe.tokenizer_source:
        if not _same_shapes(sources, base):
            _refuse_differing_vocabularies(recipe, base)
        return None
    from mergeflow.evaluate import load_tokenizer  # heavy (transformers): only where vocabularies are reconciled

    tokenizers = {path: load_tokenizer(path) for path in dict.fromkeys([base, *recipe.model_paths()])}
    vocabs = {path: tokenizer.get_vocab() for path, tokenizer in tokenizers.items()}
    source = recipe.tokenizer_model
    source_vocab = load_tokenizer(source).get_vocab() if source else vocabs[base]
    if (not recipe.tokens and not recipe.pad_to_multiple_of and all(vocab == source_vocab for vocab in vocabs.values())
            and _same_shapes(sources, base)):
        return None
    for path, vocab in vocabs.items():
        _check_rows(path, vocab, sources[path])
    tokenizer = output_tokenizer(recipe, base, tokenizers)
    tokens = tokenizer.get_vocab()
    if sorted(tokens.values()) != list(range(len(tokens))):
        raise MergeflowError(f"tokenizer_source {recipe.tokenizer_source!r}: the output vocabulary's ids are not "
                             f"0..{len(tokens) - 1}")
    order = sorted(tokens, key=tokens.__getitem__)
    rows = {path: [vocab.get(token, -1) for token in order] for path, vocab in vocabs.items()}
    multiple = recipe.pad_to_multiple_of or 1
    return Vocabulary(tokenizer, tokens, -(-len(tokens) // multiple) * multiple, rows, vocabs, dict(recipe.tokens))


def _same_shapes(sources: dict[str, ModelSource], base: str) -> bool:
    """Every model's vocabulary tensors have the base's shapes."""
    shapes = {name: info.shape for name, info in sources[base].tensors.items() if is_vocabulary_tensor(name)}
    return all(source.tensors[name].shape == shape for source in sources.values()
               for name, shape in shapes.items() if name in source.tensors)


def _refuse_differing_vocabularies(recipe: Recipe, base: str) -> None:
    """MergeflowError naming the first model whose vocabulary is not the base's, and its first
    differing token (:func:`vocabulary_difference`)."""
    from mergeflow.evaluate import load_tokenizer

    reference = load_tokenizer(base).get_vocab()
    for path in recipe.model_paths():
        if difference := vocabulary_difference(load_tokenizer(path).get_vocab(), reference, f"the base {base!r}"):
            raise MergeflowError(f"model {path!r}: {difference}; {RECIPE_HINT}")


def _check_rows(path: str, vocab: dict[str, int], source: ModelSource) -> None:
    """Every token of a model has a row in each of its vocabulary tensors."""
    for name, info in source.tensors.items():
        if is_vocabulary_tensor(name) and vocab and max(vocab.values()) >= info.shape[0]:
            token = max(vocab, key=vocab.__getitem__)
            raise MergeflowError(f"model {path!r}: token {token!r} (id {vocab[token]}) has no row in tensor {name!r} "
                                 f"({info.shape[0]} rows); its tokenizer and weights do not match")


def output_tokenizer(recipe: Recipe, base: str, tokenizers: dict[str, Any]) -> Any:
    """The tokenizer of the output vocabulary (a fresh one: ``tokenizers`` stay as they are)."""
    from mergeflow.evaluate import load_tokenizer

    out = load_tokenizer(recipe.tokenizer_model or base)
    if recipe.tokenizer_source == "union":
        have = out.get_vocab()
        ordinary: dict[str, None] = {}
        added: dict[str, Any] = {}
        for tokenizer in tokenizers.values():
            decoder = tokenizer.added_tokens_decoder
            for token, index in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
                if index not in decoder:
                    ordinary.setdefault(token)
            for info in decoder.values():
                added.setdefault(info.content, info)
        out.add_tokens([token for token in ordinary if token not in have and token not in added])
        out.add_tokens(list(added.values()))
    missing = [token for token in recipe.tokens if token not in out.get_vocab()]
    if missing:
        out.add_tokens(missing)
    return out


class AlignedSource(ModelSource):
    """A model's weights seen through the output vocabulary: each vocabulary tensor has one row per
    output token (the model's own row of it, or the row :func:`fill_rows` set), every other
    tensor is the model's. ``rows``: per output token, the model's row of it or -1; ``size``: the
    output's rows (padding included), ``config``'s ``vocab_size``."""

    def __init__(self, source: ModelSource, rows: list[int], size: int):  # no super().__init__: nothing to reread
        self.source, self.path, self.name = source, source.path, source.name
        self.rows = rows + [-1] * (size - len(rows))
        self.fills: dict[str, dict[int, torch.Tensor]] = {}  # tensor -> output id -> row
        self.config = {**source.config, "vocab_size": size}
        self.tensors = {name: replace(info, shape=(size, *info.shape[1:])) if is_vocabulary_tensor(name) else info
                        for name, info in source.tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        if not is_vocabulary_tensor(name):
            return self.source.read(name)
        info = self.info(name)
        return self.read_range(name, 0, torch.empty(info.numel, dtype=info.dtype)).view(info.shape)

    def read_range(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """As :meth:`ModelSource.read_range`; a vocabulary tensor's rows are read in runs of
        consecutive source rows, the filled ones copied."""
        if not is_vocabulary_tensor(name):
            return self.source.read_range(name, start, out)
        info = self.info(name)
        width = info.numel // info.shape[0]
        first, last = start // width, -(-(start + out.numel()) // width)
        block = torch.empty((last - first, width), dtype=info.dtype)
        fills = self.fills.get(name, {})
        row = first
        while row < last:
            if row in fills:
                block[row - first] = fills[row]
                row += 1
                continue
            source_row = self.rows[row]
            if source_row < 0:
                raise MergeflowError(f"model {self.name!r}: tensor {name!r} has no row for output token {row}")
            end = row + 1
            while end < last and end not in fills and self.rows[end] == source_row + end - row:
                end += 1
            self.source.read_range(name, source_row * width, block[row - first:end - first].view(-1))
            row = end
        offset = start - first * width
        out.copy_(block.view(-1)[offset:offset + out.numel()])
        return out


def align_sources(sources: dict[str, ModelSource], vocab: Vocabulary) -> dict[str, AlignedSource]:
    """Every model seen through the output vocabulary (:class:`AlignedSource`)."""
    return {path: AlignedSource(source, vocab.rows[path], vocab.size) for path, source in sources.items()}


def fill_rows(plan: MergePlan, recipe: Recipe, sources: dict[str, AlignedSource], vocab: Vocabulary) -> None:
    """For each vocabulary tensor of ``plan``, give each of its models the rows it lacks, and every
    model the forced ones (see the module's docstring). Reads only the rows it copies or averages;
    a token override that cannot be followed raises ``RecipeError`` naming the token."""
    forced = {vocab.tokens[token] for token, override in vocab.overrides.items() if override.force}
    for tensor in plan.tensors:
        if not is_vocabulary_tensor(tensor.name):
            continue
        refs = tensor.sources + ([tensor.base] if tensor.base else [])
        merged = {model for model, _ in refs}
        models = [model for model in vocab.rows if model in merged]  # one order (a mean's) for one set
        shared = _shared_rows(tensor.name, models, _tensor_base(recipe, tensor.name), vocab, sources,
                              plan.compute_dtype)
        for model in models:
            dtype = sources[model].info(tensor.name).dtype
            sources[model].fills[tensor.name] = {index: row.to(dtype) for index, row in shared.items()
                                                 if vocab.rows[model][index] < 0 or index in forced}
            if vocab.size > len(vocab.tokens):
                mean = _mean_row(sources[model], tensor.name, len(vocab.tokens), plan.compute_dtype).to(dtype)
                sources[model].fills[tensor.name].update(dict.fromkeys(range(len(vocab.tokens), vocab.size), mean))


def _tensor_base(recipe: Recipe, name: str) -> str | None:
    """The base model of the slice a tensor outside the blocks is merged by (as the planner)."""
    spec = (recipe.slices[0] if is_pre_layer_tensor(name) else recipe.slices[-1]) if recipe.slices else None
    return (spec.base_model if spec else None) or recipe.base_model


def _row(source: AlignedSource, name: str, row: int, dtype: torch.dtype) -> torch.Tensor:
    """Row ``row`` of a model's own tensor (not the aligned one), in ``dtype``."""
    info = source.source.info(name)
    width = info.numel // info.shape[0]
    out = torch.empty(width, dtype=info.dtype)
    return source.source.read_range(name, row * width, out).view(info.shape[1:]).to(dtype)


def _mean_row(source: AlignedSource, name: str, count: int, dtype: torch.dtype) -> torch.Tensor:
    """The mean of an aligned tensor's first ``count`` rows (its filled ones included), in ``dtype``,
    read a block of rows at a time."""
    info = source.info(name)
    width = info.numel // info.shape[0]
    step = max(1, STREAM_BLOCK // width)
    buffer = torch.empty(step * width, dtype=info.dtype)
    total = torch.zeros(width, dtype=dtype)
    for first in range(0, count, step):
        rows = min(step, count - first)
        total += source.read_range(name, first * width, buffer[:rows * width]).view(rows, width).to(dtype).sum(dim=0)
    return (total / count).view(info.shape[1:])


def _shared_rows(name: str, models: list[str], base: str | None, vocab: Vocabulary,
                 sources: dict[str, AlignedSource], dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Output id -> the row given to the models of tensor ``name`` that lack the token (to all, when
    forced): mergekit's ``PermutedVocabulary`` defaults."""
    shape = sources[models[0]].info(name).shape[1:]
    shared = {}
    for token, index in vocab.tokens.items():
        override = vocab.overrides.get(token)
        having = [model for model in models if vocab.rows[model][index] >= 0]
        if len(having) == len(models) and not (override and override.force):
            continue
        if override is not None:
            shared[index] = _override_row(name, token, index, override, models, vocab, sources, dtype)
        elif not having:
            log.warning("token %r is in no model merged into %r: its row is zeros", token, name)
            shared[index] = torch.zeros(shape, dtype=dtype)
        elif len(having) == 1 or base in having:
            donor = having[0] if len(having) == 1 else base
            shared[index] = _row(sources[donor], name, vocab.rows[donor][index], dtype)
        else:
            total = torch.zeros(shape, dtype=dtype)
            for model in having:
                total = total + _row(sources[model], name, vocab.rows[model][index], dtype)
            shared[index] = total / len(having)
    return shared


def _override_row(name: str, token: str, index: int, override: TokenOverride, models: list[str],
                  vocab: Vocabulary, sources: dict[str, AlignedSource], dtype: torch.dtype) -> torch.Tensor:
    """The row ``tokenizer.tokens[token]`` asks for."""
    where = f"recipe: tokenizer.tokens[{token!r}]"
    source = override.source
    if isinstance(source, dict) and source["kind"] == "zero":
        return torch.zeros(sources[models[0]].info(name).shape[1:], dtype=dtype)
    model = source if isinstance(source, str) else source["model"]
    if model not in models:
        raise RecipeError(f"{where}: model {model!r} is not merged into tensor {name!r} (merged: {models})")
    if isinstance(source, str):
        row = vocab.rows[model][index]
        if row < 0:
            raise RecipeError(f"{where}: model {model!r} has no token {token!r}; name another token of it with "
                              "{kind: model_token, model, token}")
    else:
        row = source.get("token_id")
        if row is None:
            row = vocab.vocabs[model].get(source["token"], -1)
            if row < 0:
                raise RecipeError(f"{where}: model {model!r} has no token {source['token']!r}")
        rows = sources[model].source.info(name).shape[0]
        if not 0 <= row < rows:
            raise RecipeError(f"{where}: token_id {row} is outside model {model!r}'s {rows} rows of {name!r}")
    return _row(sources[model], name, row, dtype)
