"""Merge recipes: mergekit's YAML format, for the subset mergeflow supports.

Supported top-level keys (anything else is rejected with a message naming the key):

- ``merge_method``: a name in ``MERGE_METHODS``.
- ``base_model``: path of the base model (required by every method except ``linear``,
  ``nuslerp`` and ``multislerp``; ``karcher`` merges it as one more model).
- ``models``: list of ``{model: PATH, parameters: {weight: ..., density: ...}}``.
- ``slices``: instead of ``models``: list of ``{sources: [{model, layer_range: [start, end],
  parameters}], parameters, base_model}``; the output layers are the slices' layers in order.
  Extension: a slice may name its own ``merge_method`` (mergekit has one method per recipe).
- ``parameters``: method parameters (``lambda``, ``normalize``, ``t`` ...) and defaults for the
  per-model ones; each value a scalar, a gradient or a filter list (see ``params``).
- ``dtype``: the dtype merges are computed in (default float32); ``out_dtype``: the dtype
  written (default ``dtype`` if given, else the base model's dtype).
- ``tokenizer_source``: the output vocabulary, as mergekit: ``base`` (the base model's),
  ``union`` (every model's tokens: the base's, then each other model's new ones in recipe order)
  or a model path (that model's). Unset, every model must have the base's vocabulary. When the
  vocabularies differ, each model's embedding rows (``embed_tokens``, ``lm_head``) are permuted
  into the output vocabulary and the rows a model lacks filled before merging
  (:mod:`mergeflow.merge.vocab`); when they are all the same, it only names the directory whose
  tokenizer files are copied (``base``, ``union``: the base's).
- ``tokenizer``: instead of ``tokenizer_source``, ``{source: base | union | PATH (default union),
  tokens: {TOKEN: {source: MODEL | {kind: zero} | {kind: model_token, model: MODEL, token: T |
  token_id: N}, force: false}}}``: where an output token's row comes from when a model lacks it
  (with ``force``, for every model); a token no model has is added to the output vocabulary;
  ``pad_to_multiple_of: N`` pads the rows to a multiple of N with the mean of each model's rows.
- ``seed``: extension, seed of the random methods (DARE, DELLA); default 0.

Not supported: ``chat_template``, ``modules``,
``passthrough`` frankenmerges and non-safetensors models.

For tensors outside the transformer blocks (embeddings, final norm, lm_head) a slices recipe
uses the first slice (before the blocks) or the last slice (after them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergeflow.dtypes import DTYPES
from mergeflow.errors import MergeflowError, RecipeError
from mergeflow.yamlio import load_yaml

TOP_LEVEL_KEYS = {"merge_method", "base_model", "models", "slices", "parameters", "dtype",
                  "out_dtype", "tokenizer_source", "tokenizer", "seed"}
TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
TOKEN_KEYS = {"source", "force"}
# tokenizer_source values that are no model path: the base's vocabulary, the union of all
VOCABULARY_KEYWORDS = ("base", "union")
MODEL_KEYS = {"model", "parameters"}
SLICE_KEYS = {"sources", "parameters", "base_model", "merge_method"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}


@dataclass
class ModelEntry:
    """A source model and its per-model parameters."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSource:
    """One model's layers ``[start, end)`` feeding an output slice."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSpec:
    """A run of output layers merged from the same layers of several sources."""

    sources: list[SliceSource]
    parameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None
    merge_method: str | None = None

    @property
    def num_layers(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


@dataclass(frozen=True)
class TokenOverride:
    """Where one output token's embedding rows come from (mergekit's ``tokenizer.tokens``):
    ``source`` is a model path (its row of the token), ``{"kind": "zero"}``, or ``{"kind":
    "model_token", "model": PATH, "token": T}`` (or ``"token_id": N``: a row of that model by its
    own id). Used for the models that lack the token, for all with ``force``."""

    source: str | dict[str, Any]
    force: bool = False

    def to_dict(self) -> dict[str, Any]:
        source = dict(self.source) if isinstance(self.source, dict) else self.source
        return {"source": source, "force": True} if self.force else {"source": source}


@dataclass
class Recipe:
    """A merge recipe (mergekit's format); exactly one of ``models`` and ``slices`` is set."""

    merge_method: str
    models: list[ModelEntry] = field(default_factory=list)
    slices: list[SliceSpec] = field(default_factory=list)
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokens: dict[str, TokenOverride] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    seed: int = 0

    @property
    def tokenizer_model(self) -> str | None:
        """The model path ``tokenizer_source`` names, None for unset, ``base`` and ``union``."""
        return None if self.tokenizer_source in (None, *VOCABULARY_KEYWORDS) else self.tokenizer_source

    def model_paths(self) -> list[str]:
        """Every model the recipe reads, base included, in first-mention order."""
        paths = [self.base_model] if self.base_model else []
        paths += [entry.model for entry in self.models]
        for spec in self.slices:
            paths += [spec.base_model] if spec.base_model else []
            paths += [source.model for source in spec.sources]
        return list(dict.fromkeys(paths))

    def to_dict(self) -> dict[str, Any]:
        """The canonical YAML mapping: keys in a fixed order, empty values left out."""
        data: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model:
            data["base_model"] = self.base_model
        if self.models:
            data["models"] = [_model_to_dict(entry) for entry in self.models]
        if self.slices:
            data["slices"] = [_slice_to_dict(spec) for spec in self.slices]
        if self.parameters:
            data["parameters"] = dict(self.parameters)
        for key in ("dtype", "out_dtype"):
            if getattr(self, key):
                data[key] = getattr(self, key)
        if self.tokens or self.pad_to_multiple_of:  # mergekit's form with token overrides or padding
            data["tokenizer"] = {"source": self.tokenizer_source}
            if self.tokens:
                data["tokenizer"]["tokens"] = {token: o.to_dict() for token, o in self.tokens.items()}
            if self.pad_to_multiple_of:
                data["tokenizer"]["pad_to_multiple_of"] = self.pad_to_multiple_of
        elif self.tokenizer_source:
            data["tokenizer_source"] = self.tokenizer_source
        data["seed"] = self.seed
        return data

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)


def _model_to_dict(entry: ModelEntry) -> dict[str, Any]:
    data: dict[str, Any] = {"model": entry.model}
    if entry.parameters:
        data["parameters"] = dict(entry.parameters)
    return data


def _slice_to_dict(spec: SliceSpec) -> dict[str, Any]:
    sources = []
    for source in spec.sources:
        item: dict[str, Any] = {"model": source.model, "layer_range": list(source.layer_range)}
        if source.parameters:
            item["parameters"] = dict(source.parameters)
        sources.append(item)
    data: dict[str, Any] = {"sources": sources}
    if spec.parameters:
        data["parameters"] = dict(spec.parameters)
    if spec.base_model:
        data["base_model"] = spec.base_model
    if spec.merge_method:
        data["merge_method"] = spec.merge_method
    return data


def _check_keys(data: Any, allowed: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise MergeflowError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise MergeflowError(
            f"unsupported key {unknown[0]!r} in {where}; mergeflow supports: {', '.join(sorted(allowed))}"
        )


def _parameters(data: dict, where: str) -> dict[str, Any]:
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise MergeflowError(f"'parameters' of {where} must be a mapping")
    return dict(parameters)


def _model_path(data: dict, where: str) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise MergeflowError(f"{where} needs 'model': a model path")
    return model


def _parse_source(data: Any, where: str) -> SliceSource:
    _check_keys(data, SOURCE_KEYS, where)
    layer_range = data.get("layer_range")
    if (not isinstance(layer_range, (list, tuple)) or len(layer_range) != 2
            or not all(isinstance(v, int) for v in layer_range) or layer_range[0] >= layer_range[1]
            or layer_range[0] < 0):
        raise MergeflowError(f"{where}: 'layer_range' must be [start, end] with 0 <= start < end")
    return SliceSource(_model_path(data, where), (layer_range[0], layer_range[1]),
                       _parameters(data, where))


def _parse_slice(data: Any, where: str) -> SliceSpec:
    _check_keys(data, SLICE_KEYS, where)
    sources = data.get("sources")
    if not isinstance(sources, list) or not sources:
        raise MergeflowError(f"{where} needs a non-empty 'sources' list")
    parsed = [_parse_source(source, f"{where} source {i}") for i, source in enumerate(sources)]
    lengths = {source.layer_range[1] - source.layer_range[0] for source in parsed}
    if len(lengths) != 1:
        raise MergeflowError(f"{where}: all sources' layer ranges must have the same length")
    return SliceSpec(parsed, _parameters(data, where), data.get("base_model"),
                     data.get("merge_method"))


def _parse_token_source(source: Any, where: str) -> str | dict[str, Any]:
    if isinstance(source, str) and source:
        return source
    if isinstance(source, dict) and source.get("kind") == "zero":
        _check_keys(source, {"kind"}, where)
        return {"kind": "zero"}
    if isinstance(source, dict) and source.get("kind") == "model_token":
        _check_keys(source, {"kind", "model", "token", "token_id"}, where)
        _model_path(source, where)
        token, token_id = source.get("token"), source.get("token_id")
        by_token = isinstance(token, str) and token_id is None
        by_id = token is None and isinstance(token_id, int) and not isinstance(token_id, bool)
        if not (by_token or by_id):
            raise RecipeError(f"{where}: a model_token source needs exactly one of 'token' (a string) and "
                              "'token_id' (an integer)")
        return dict(source)
    raise RecipeError(f"{where}: 'source' must be a model path, {{kind: zero}} or {{kind: model_token, model, "
                      f"token | token_id}}; got {source!r}")


def _parse_tokenizer(data: dict, where: str) -> tuple[str | None, dict[str, TokenOverride], int | None]:
    """``tokenizer_source``, the token overrides and the padding multiple, from either mergekit form."""
    source = data.get("tokenizer_source")
    block = data.get("tokenizer")
    if source is not None and block is not None:
        raise RecipeError(f"{where}: set 'tokenizer_source' or 'tokenizer', not both (as mergekit)")
    if block is not None:
        _check_keys(block, TOKENIZER_KEYS, f"{where} tokenizer")
        source = block.get("source", "union")
    if source is not None and (not isinstance(source, str) or not source):
        raise RecipeError(f"{where}: tokenizer source {source!r} must be 'base', 'union' or a model path")
    tokens = (block or {}).get("tokens") or {}
    if not isinstance(tokens, dict):
        raise RecipeError(f"{where}: 'tokenizer.tokens' must be a mapping of token to {{source, force}}")
    overrides = {}
    for token, spec in tokens.items():
        at = f"{where} tokenizer.tokens[{token!r}]"
        _check_keys(spec, TOKEN_KEYS, at)
        if "source" not in spec:
            raise RecipeError(f"{at} needs a 'source'")
        if not isinstance(spec.get("force", False), bool):
            raise RecipeError(f"{at}: 'force' must be true or false")
        overrides[str(token)] = TokenOverride(_parse_token_source(spec["source"], at), spec.get("force", False))
    pad = (block or {}).get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise RecipeError(f"{where}: 'tokenizer.pad_to_multiple_of' must be a positive integer, got {pad!r}")
    return source, overrides, pad


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    """Validate a mergekit-style mapping and build a Recipe."""
    _check_keys(data, TOP_LEVEL_KEYS, where)
    method = data.get("merge_method")
    if not isinstance(method, str):
        raise MergeflowError(f"{where} needs 'merge_method'")
    models = data.get("models") or []
    slices = data.get("slices") or []
    if bool(models) == bool(slices):
        raise MergeflowError(f"{where} needs exactly one of 'models' and 'slices'")
    if not isinstance(models, list) or not isinstance(slices, list):
        raise MergeflowError(f"{where}: 'models' and 'slices' must be lists")
    entries = []
    for i, item in enumerate(models):
        if isinstance(item, str):  # shorthand: a bare path
            item = {"model": item}
        _check_keys(item, MODEL_KEYS, f"{where} models[{i}]")
        entries.append(ModelEntry(_model_path(item, f"{where} models[{i}]"),
                                  _parameters(item, f"{where} models[{i}]")))
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and data[key] not in DTYPES:
            raise MergeflowError(f"{where}: {key} {data[key]!r} is not one of {list(DTYPES)}")
    seed = data.get("seed", 0)
    if not isinstance(seed, int):
        raise MergeflowError(f"{where}: 'seed' must be an integer")
    tokenizer_source, tokens, pad_to_multiple_of = _parse_tokenizer(data, where)
    return Recipe(
        merge_method=method,
        models=entries,
        slices=[_parse_slice(item, f"{where} slices[{i}]") for i, item in enumerate(slices)],
        base_model=data.get("base_model"),
        parameters=_parameters(data, where),
        dtype=data.get("dtype"),
        out_dtype=data.get("out_dtype"),
        tokenizer_source=tokenizer_source,
        tokens=tokens,
        pad_to_multiple_of=pad_to_multiple_of,
        seed=seed,
    )


def recipe_from_yaml(text: str, where: str = "recipe") -> Recipe:
    """Parse a recipe from YAML text (what :meth:`Recipe.to_yaml` writes, e.g. a history row's)."""
    return recipe_from_dict(load_yaml(text, where), where=where)


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe YAML file."""
    path = Path(path)
    if not path.is_file():
        raise MergeflowError(f"recipe file {str(path)!r} does not exist")
    return recipe_from_dict(load_yaml(path.read_text(), f"recipe file {str(path)!r}"), where=f"recipe {str(path)!r}")


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    """Write a recipe as YAML that both mergeflow and (for the common subset) mergekit read."""
    Path(path).write_text(recipe.to_yaml())


def recipe_hash(recipe: Recipe) -> str:
    """A stable 12-hex-digit hash of the canonical YAML (sorted keys)."""
    canonical = yaml.safe_dump(recipe.to_dict(), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]
