"""The ``parameter`` search space (Sakana's PS, Su & Geiping's LFS): per layer group and module
kind, each source's weight/density and the method's parameters, optionally a per-group method.

Config (the ``search_space`` mapping; keys and defaults in the schema's ``space_parameter``)::

    search_space:
      kind: parameter              # the default
      method: dare_ties            # a method name, or a list of names: then each layer group
                                   # gets a categorical gene choosing its method
      layer_groups: 4              # contiguous layer groups with their own values; 1 = global
      filters: [self_attn, mlp]    # optional: separate values per module kind (+ the rest)
      parameters:                  # per-model parameters: a {min, max} range is searched,
        weight: {min: 0.0, max: 1.5}    # a plain value is fixed
        density: {min: 0.1, max: 1.0}
      method_parameters: {}        # e.g. {lambda: {min: 0.5, max: 1.5}} or {normalize: true}
      dtype: float32               # optional, copied into the recipe

``base_model`` and ``models`` (paths) are filled in by the workflow from the run's models.

Genes, in this order:

1. one categorical gene per layer group choosing the method (only when ``method`` is a list);
2. for each layer group, module kind (each filter, then the rest), model and searched
   per-model parameter: one gene;
3. for each layer group, module kind and searched method parameter: one gene.

A range gene maps linearly, ``min + x * (max - min)``; a categorical gene with K choices splits
[0, 1] into K equal bins.

Recipes produced: with one method, a mergekit-compatible ``models`` recipe whose values are
filter lists (when ``filters`` are given) of per-layer lists (when ``layer_groups > 1``, one
value per layer, so each group's layers get its value exactly; the embeddings take the first
group's values and the final norm and ``lm_head`` the last group's). With several methods, a
``slices`` recipe with one slice per group, each naming its ``merge_method`` (a mergeflow
extension mergekit does not read).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mergeflow.errors import MergeflowError
from mergeflow.merge.params import layer_position, resolve_value
from mergeflow.merge.recipe import ModelEntry, Recipe, SliceSource, SliceSpec, recipe_from_dict
from mergeflow.merge.registry import check_parameter_names, get_method
from mergeflow.merge.sources import ModelSource
from mergeflow.spaces.base import ModelConfigs, Space

# A tensor name that matches no user filter, used to read the "rest" value back from a recipe.
_REST_PROBE = "__mergeflow_rest__"


def space_methods(cfg: dict) -> list[str]:
    """The method names of a ``search_space`` mapping: ``method`` is one name or a list."""
    methods = cfg.get("method")
    return [methods] if isinstance(methods, str) else list(methods or [])


@dataclass(frozen=True)
class Range:
    low: float
    high: float

    def decode(self, x: float) -> float:
        return self.low + float(x) * (self.high - self.low)

    def encode(self, value: float) -> float:
        if self.high == self.low:
            return 0.5
        return float(np.clip((value - self.low) / (self.high - self.low), 0.0, 1.0))


def _split(spec: dict[str, Any], where: str) -> tuple[dict[str, Range], dict[str, Any]]:
    """Searched ranges and fixed values of a parameter mapping (``where``: its config key)."""
    if not isinstance(spec, dict):
        raise MergeflowError(f"{where} must be a mapping")
    ranges, fixed = {}, {}
    for key, value in spec.items():
        if isinstance(value, dict):
            if set(value) != {"min", "max"}:
                raise MergeflowError(f"{where}.{key} must be {{min, max}} or a value")
            for end in ("min", "max"):
                if isinstance(value[end], bool) or not isinstance(value[end], (int, float)):
                    raise MergeflowError(f"{where}.{key}.{end}: {value[end]!r} is not a number")
            low, high = float(value["min"]), float(value["max"])
            if low > high:
                raise MergeflowError(f"{where}.{key}: min {low} > max {high}")
            ranges[key] = Range(low, high)
        else:
            fixed[key] = value
    return ranges, fixed


def layer_groups(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """``groups`` contiguous, near-equal layer ranges [start, end) covering ``num_layers``."""
    bounds = [round(g * num_layers / groups) for g in range(groups + 1)]
    return [(bounds[g], bounds[g + 1]) for g in range(groups)]


def check_layer_groups(cfg: dict, where: str, num_layers: int | None) -> None:
    """``layer_groups`` fits the base's ``num_layers`` (when known)."""
    groups = int(cfg["layer_groups"])
    if num_layers is not None and not 1 <= groups <= max(num_layers, 1):
        raise MergeflowError(f"{where}.layer_groups: {groups} must be between 1 and the base model's "
                             f"{num_layers} layers")


@dataclass
class ParameterSpace(Space):
    methods: list[str]
    base_model: str | None
    models: list[str]
    num_layers: int
    groups: list[tuple[int, int]]
    filters: list[str]
    model_ranges: dict[str, Range]
    model_fixed: dict[str, Any]
    method_ranges: dict[str, Range]
    method_fixed: dict[str, Any]
    dtype: str | None = None
    tokenizer_source: str | None = None  # the recipes' (base, union or a model's path)
    kinds: list[str | None] = field(init=False)

    def __post_init__(self) -> None:
        self.kinds = [*self.filters, None]  # None: tensors matching no filter

    @classmethod
    def build(cls, cfg: dict, where: str = "search_space") -> "ParameterSpace":
        """The registry's entry: a validated ``search_space`` mapping, layers read from the base."""
        return cls.from_config(cfg, ModelSource(cfg["base_model"]).num_layers, where)

    @staticmethod
    def check(cfg: dict, where: str, models: ModelConfigs) -> None:
        """What can be checked before any job: every method exists, every parameter is read by
        one of them, every range is numbers with min <= max, and — when the base's config is on
        disk — ``layer_groups`` fits its layers. Errors name the key."""
        methods = space_methods(cfg)
        if not methods:
            raise MergeflowError(f"{where}.method is missing")
        for name in methods:
            try:
                get_method(name)
            except MergeflowError as err:
                raise MergeflowError(f"{where}.method: {err}") from None
        model_ranges, model_fixed = _split(cfg["parameters"], f"{where}.parameters")
        method_ranges, method_fixed = _split(cfg["method_parameters"], f"{where}.method_parameters")
        check_parameter_names([*model_ranges, *model_fixed], "model", f"{where}.parameters", methods)
        check_parameter_names([*method_ranges, *method_fixed], "method", f"{where}.method_parameters", methods)
        check_layer_groups(cfg, where, models.num_layers())

    @classmethod
    def from_config(cls, cfg: dict, num_layers: int, where: str = "search_space") -> "ParameterSpace":
        """Build from a ``search_space`` mapping (schema defaults filled) for ``num_layers`` layers."""
        cls.check(cfg, where, ModelConfigs())
        check_layer_groups(cfg, where, num_layers)
        methods = space_methods(cfg)
        models = [str(m) for m in cfg.get("models") or []]
        if not models:
            raise MergeflowError(f"{where}.models is empty")
        model_ranges, model_fixed = _split(cfg["parameters"], f"{where}.parameters")
        method_ranges, method_fixed = _split(cfg["method_parameters"], f"{where}.method_parameters")
        return cls(methods, cfg.get("base_model"), models, num_layers,
                   layer_groups(num_layers, int(cfg["layer_groups"])), [str(f) for f in cfg["filters"]],
                   model_ranges, model_fixed, method_ranges, method_fixed, cfg.get("dtype"), cfg.get("tokenizer_source"))

    # ---- layout

    @property
    def method_genes(self) -> int:
        return len(self.groups) if len(self.methods) > 1 else 0

    @property
    def dim(self) -> int:
        per_cell = len(self.models) * len(self.model_ranges) + len(self.method_ranges)
        return self.method_genes + len(self.groups) * len(self.kinds) * per_cell

    def _cells(self):
        """(group, kind) pairs in gene order."""
        for group in range(len(self.groups)):
            for kind in range(len(self.kinds)):
                yield group, kind

    # ---- genome -> table (for figures)

    def genome_table(self, x: np.ndarray) -> "pd.DataFrame":
        """A genome's values as rows ``panel`` (a parameter), ``row`` (model, and module kind with
        filters), ``column`` (layer group, its layers and, with several methods, its method) and
        ``value``: what the best-genome figure draws."""
        methods, model_values, method_values = self._decode(x)
        names = [Path(m).name for m in self.models]
        rows = []
        for group, kind in self._cells():
            start, end = self.groups[group]
            column = f"layers {start}-{end - 1}" if end - start > 1 else f"layer {start}"
            if len(self.methods) > 1:
                column += f"\n{methods[group]}"
            kind_name = "" if not self.filters else f" · {self.kinds[kind] or 'rest'}"
            for model, name in enumerate(names):
                for key in self.model_ranges:
                    rows.append({"panel": key, "row": name + kind_name, "column": column,
                                 "value": model_values[group][kind][model][key]})
            for key in self.method_ranges:
                rows.append({"panel": key, "row": "method" + kind_name, "column": column,
                             "value": method_values[group][kind][key]})
        return pd.DataFrame(rows, columns=["panel", "row", "column", "value"])

    # ---- genome -> recipe

    def _decode(self, x: np.ndarray):
        """Per-group methods, model values[group][kind][model][key], method values[group][kind][key]."""
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise MergeflowError(f"genome has shape {x.shape}; this search space needs ({self.dim},)")
        if not np.all(np.isfinite(x)):
            raise MergeflowError("genome contains NaN or Inf")
        x = np.clip(x, 0.0, 1.0)
        position = 0
        methods = [self.methods[0]] * len(self.groups)
        for group in range(self.method_genes):
            methods[group] = self.methods[min(int(x[position] * len(self.methods)), len(self.methods) - 1)]
            position += 1
        n_groups, n_kinds = len(self.groups), len(self.kinds)
        model_values = [[[{} for _ in self.models] for _ in range(n_kinds)] for _ in range(n_groups)]
        method_values = [[{} for _ in range(n_kinds)] for _ in range(n_groups)]
        for group, kind in self._cells():
            for model in range(len(self.models)):
                for key, value_range in self.model_ranges.items():
                    model_values[group][kind][model][key] = value_range.decode(x[position])
                    position += 1
            for key, value_range in self.method_ranges.items():
                method_values[group][kind][key] = value_range.decode(x[position])
                position += 1
        return methods, model_values, method_values

    def _setting(self, values_by_group_kind, key: str, layered: bool) -> Any:
        """A recipe setting from values[group][kind][key]: filter list and/or per-layer list."""
        def for_kind(kind: int) -> Any:
            if not layered:
                return values_by_group_kind[0][kind][key]
            per_layer = []
            for group, (start, end) in enumerate(self.groups):
                per_layer += [values_by_group_kind[group][kind][key]] * (end - start)
            return per_layer

        if not self.filters:
            return for_kind(0)
        entries = [{"filter": f, "value": for_kind(k)} for k, f in enumerate(self.filters)]
        return entries + [{"value": for_kind(len(self.filters))}]

    def to_recipe(self, x: np.ndarray, seed: int = 0) -> Recipe:
        """The recipe a genome stands for."""
        methods, model_values, method_values = self._decode(x)
        if len(set(methods)) == 1 and len(self.methods) == 1:
            return self._models_recipe(methods[0], model_values, method_values, seed)
        return self._slices_recipe(methods, model_values, method_values, seed)

    def _models_recipe(self, method, model_values, method_values, seed) -> Recipe:
        layered = len(self.groups) > 1
        entries = []
        for model_index, path in enumerate(self.models):
            per_cell = [[kind[model_index] for kind in group] for group in model_values]
            parameters = {key: self._setting(per_cell, key, layered) for key in self.model_ranges}
            entries.append(ModelEntry(path, {**self.model_fixed, **parameters}))
        parameters = {key: self._setting(method_values, key, layered) for key in self.method_ranges}
        return Recipe(method, models=entries, base_model=self.base_model,
                      parameters={**self.method_fixed, **parameters}, dtype=self.dtype, seed=seed,
                      tokenizer_source=self.tokenizer_source)

    def _slices_recipe(self, methods, model_values, method_values, seed) -> Recipe:
        slices = []
        for group, (start, end) in enumerate(self.groups):
            sources = []
            for model_index, path in enumerate(self.models):
                cells = [[model_values[group][kind][model_index] for kind in range(len(self.kinds))]]
                parameters = {key: self._setting(cells, key, False) for key in self.model_ranges}
                sources.append(SliceSource(path, (start, end), {**self.model_fixed, **parameters}))
            cells = [method_values[group]]
            parameters = {key: self._setting(cells, key, False) for key in self.method_ranges}
            slices.append(SliceSpec(sources, {**self.method_fixed, **parameters},
                                    merge_method=methods[group]))
        return Recipe(methods[0], slices=slices, base_model=self.base_model, dtype=self.dtype,
                      seed=seed, tokenizer_source=self.tokenizer_source)

    def merger_template(self) -> Recipe | None:
        """With a ``tokenizer_source``, a recipe of the space (the centre genome's) to build the
        in-memory merger from: it holds the sources through the output vocabulary."""
        return self.to_recipe(np.full(self.dim, 0.5)) if self.tokenizer_source else None

    def initial_genome(self, init: dict[str, float] | None) -> tuple[float, ...] | None:
        """The genome of ``init`` (source path -> weight; other genes at the middle of their
        range), or None: the optimizer's own start, the centre of the space."""
        if init is None:
            return None
        recipe = recipe_from_dict({
            "merge_method": self.methods[0], "base_model": self.base_model,
            "models": [{"model": path, "parameters": {"weight": init.get(path, 0.0)}} for path in self.models],
        })
        return tuple(float(v) for v in self.from_recipe(recipe))

    # ---- recipe -> genome

    def _probe_name(self, kind: int, layer: int) -> str:
        module = self.kinds[kind] or _REST_PROBE
        return f"model.layers.{layer}.{module}.weight"

    def _read(self, recipe: Recipe, layer: int, kind: int, model: str | None, key: str) -> Any:
        """The value a recipe gives ``key`` (per-model when ``model``) at a layer and kind."""
        tensor = self._probe_name(kind, layer)
        if recipe.slices:
            offset = 0
            for spec in recipe.slices:
                if layer < offset + spec.num_layers:
                    t = layer_position(layer - offset, spec.num_layers)
                    source = next((s for s in spec.sources if s.model == model), None)
                    levels = [source.parameters if source else {}, spec.parameters, recipe.parameters]
                    break
                offset += spec.num_layers
            else:
                return None
        else:
            t = layer_position(layer, self.num_layers)
            entry = next((e for e in recipe.models if e.model == model), None)
            levels = [entry.parameters if entry else {}, recipe.parameters]
        for level in levels:
            if key in level:
                return resolve_value(level[key], t, tensor, key)
        return None

    def _method_at(self, recipe: Recipe, layer: int) -> str:
        offset = 0
        for spec in recipe.slices:
            if layer < offset + spec.num_layers:
                return spec.merge_method or recipe.merge_method
            offset += spec.num_layers
        return recipe.merge_method

    def from_recipe(self, recipe: Recipe) -> np.ndarray:
        """The genome closest to a recipe (exact for recipes made by ``to_recipe``, up to the
        bin centre of categorical genes); values missing from the recipe take the middle."""
        genes: list[float] = []
        for start, _ in self.groups[: self.method_genes]:
            method = self._method_at(recipe, start)
            if method not in self.methods:
                raise MergeflowError(f"recipe method {method!r} is not in the search space {self.methods}")
            genes.append((self.methods.index(method) + 0.5) / len(self.methods))
        for group, kind in self._cells():
            start = self.groups[group][0]
            for model in self.models:
                for key, value_range in self.model_ranges.items():
                    genes.append(self._encode(self._read(recipe, start, kind, model, key), value_range))
            for key, value_range in self.method_ranges.items():
                genes.append(self._encode(self._read(recipe, start, kind, None, key), value_range))
        return np.asarray(genes, dtype=float)

    @staticmethod
    def _encode(value: Any, value_range: Range) -> float:
        if value is None:
            return 0.5
        return value_range.encode(float(value))
