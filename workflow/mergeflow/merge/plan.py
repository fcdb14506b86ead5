"""Planning a merge: for each output tensor, which source tensors, method and parameters.

Both the streaming merge (``stream``) and the in-memory merge (``fast``) execute the same plan
with the same method functions, which is what makes their outputs bitwise identical: the
in-memory merge a whole tensor at a time (``merge_tensor``), the streaming one large tensors in
blocks (``merge_tensor_blocks``) that reproduce the whole tensor's result bit for bit.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from mergeflow.errors import MergeflowError, RecipeError
from mergeflow.merge.passes import CPU_BLOCK, one_cpu_thread
from mergeflow.merge.methods import MaskedTerms
from mergeflow.merge.params import (
    is_pre_layer_tensor, layer_index, layer_position, resolve_value, with_layer_index,
)
from mergeflow.merge.recipe import Recipe, SliceSource, SliceSpec
from mergeflow.merge.registry import MergeMethod, check_parameter_names, get_method
from mergeflow.dtypes import torch_dtype
from mergeflow.merge.sources import ModelSource, TensorInfo
from mergeflow.merge.sparsify import TIE_BREAKS, Workspace

TensorRef = tuple[str, str]  # (model path, tensor name)
Fetch = Callable[[str, str], torch.Tensor]
# (model, name, start, stop) -> flat entries [start, stop) of a tensor, in the compute dtype
# on the device; valid until the next read of the same (model, name)
ReadRange = Callable[[str, str, int, int], torch.Tensor]

# The streaming merge splits tensors above this many entries into blocks of about this many
# (4 MiB of float32): a multiple of CPU_BLOCK, so the methods' own blocks fall where they fall
# in the whole tensor.
STREAM_BLOCK = 1 << 20
# A model weight beyond this magnitude is almost surely a typo (1.0e+30 for 1.0): merged with a
# warning, since a weight is the user's to choose.
ABSURD_WEIGHT = 1e3

log = logging.getLogger(__name__)


@dataclass
class TensorPlan:
    """How to produce one output tensor."""

    name: str
    method: MergeMethod
    sources: list[TensorRef]
    base: TensorRef | None
    model_params: list[dict[str, Any]]
    params: dict[str, Any]
    seed: int
    shape: tuple[int, ...]


@dataclass
class MergePlan:
    tensors: list[TensorPlan]
    num_layers: int
    template: str  # model whose config and non-layer tensor names the output copies
    compute_dtype: torch.dtype
    out_dtype: torch.dtype


def tensor_seed(recipe_seed: int, tensor_name: str, model_index: int = 0) -> int:
    """Seed of the random draws for a tensor: a hash of (recipe seed, tensor name, index).
    ``merge_tensor`` seeds model ``i``'s generator with ``tensor_seed(...) + i``."""
    digest = hashlib.sha256(f"{recipe_seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def as_slices(recipe: Recipe, num_layers: int) -> list[SliceSpec]:
    """The recipe's slices; a ``models`` recipe is one slice over all layers."""
    if recipe.slices:
        return recipe.slices
    sources = [SliceSource(e.model, (0, num_layers), e.parameters) for e in recipe.models]
    return [SliceSpec(sources)]


def _lookup(key: str, *levels: dict[str, Any]) -> tuple[bool, Any]:
    for level in levels:
        if key in level:
            return True, level[key]
    return False, None


def _check_value(key: str, value: Any, model: str, tensor: str) -> None:
    if key == "density" and not (isinstance(value, (int, float)) and 0.0 < value <= 1.0):
        raise MergeflowError(
            f"density {value!r} of model {model!r} for tensor {tensor!r} is outside (0, 1]")
    if key == "weight" and not isinstance(value, (int, float)):
        hint = (" (YAML reads a float written with an exponent as a number: 1.0e+30 or 1e30)"
                if isinstance(value, str) else "")
        raise MergeflowError(f"weight {value!r} of model {model!r} for tensor {tensor!r} is not a number{hint}")
    if key == "weight" and not math.isfinite(value):
        raise MergeflowError(f"weight {value!r} of model {model!r} for tensor {tensor!r} is not finite")


class _Planner:
    def __init__(self, recipe: Recipe, sources: dict[str, ModelSource]):
        self.recipe = recipe
        self.sources = sources
        self.template = recipe.base_model or recipe.model_paths()[0]
        template = sources[self.template]
        self.slices = as_slices(recipe, template.num_layers)
        self._warned: set[tuple[str, float]] = set()
        self._check_names()
        self._add_base_as_model(template.num_layers)

    def _check_names(self) -> None:
        """Every method of the recipe exists, and every parameter is one a merge method reads at
        its level: a misspelt one (``wieght``) would otherwise be ignored. Errors name the key."""
        for number, spec in enumerate(self.slices):
            where = f"slices[{number}]" if self.recipe.slices else "models"
            key = f"slices[{number}].merge_method" if spec.merge_method else "merge_method"
            try:
                get_method(spec.merge_method or self.recipe.merge_method)
            except MergeflowError as err:
                raise RecipeError(f"recipe: {key}: {err}") from None
            for source in spec.sources:
                check_parameter_names(source.parameters, "model", f"recipe: {where}: model {source.model!r}")
            check_parameter_names(spec.parameters, "any", f"recipe: {where}: parameters")
        check_parameter_names(self.recipe.parameters, "any", "recipe: parameters")

    def _add_base_as_model(self, num_layers: int) -> None:
        """A models recipe whose method merges its base as one more model (``base_as_model``,
        karcher) gets the base appended when it does not list it, as mergekit's planner does; a
        slices recipe merges the sources it names."""
        base = self.recipe.base_model
        if self.recipe.slices or not base or not get_method(self.recipe.merge_method).base_as_model:
            return
        sources = self.slices[0].sources
        if base not in [source.model for source in sources]:
            self.slices = [SliceSpec([*sources, SliceSource(base, (0, num_layers))], self.slices[0].parameters)]

    def source_info(self, ref: TensorRef) -> TensorInfo:
        return self.sources[ref[0]].info(ref[1])

    def plan(self) -> list[TensorPlan]:
        template = self.sources[self.template]
        names = list(template.tensors)
        pre = [n for n in names if layer_index(n) is None and is_pre_layer_tensor(n)]
        post = [n for n in names if layer_index(n) is None and not is_pre_layer_tensor(n)]
        plans = [self.plan_tensor(n, n, self.slices[0], None, 0.0) for n in pre]
        out_layer = 0
        for spec in self.slices:
            first = spec.sources[0]
            for rel in range(spec.num_layers):
                source_layer = first.layer_range[0] + rel
                layer_names = [n for n in self.sources[first.model].tensors
                               if layer_index(n) == source_layer]
                if not layer_names:
                    raise MergeflowError(
                        f"model {first.model!r} has no layer {source_layer} (layer_range {list(first.layer_range)})")
                t = layer_position(rel, spec.num_layers)
                for name in layer_names:
                    plans.append(self.plan_tensor(with_layer_index(name, out_layer), name, spec, rel, t))
                out_layer += 1
        plans += [self.plan_tensor(n, n, self.slices[-1], None, 1.0) for n in post]
        return plans

    def plan_tensor(self, out_name: str, first_name: str, spec: SliceSpec,
                    rel: int | None, t: float) -> TensorPlan:
        method = get_method(spec.merge_method or self.recipe.merge_method)
        base_path = spec.base_model or self.recipe.base_model

        def ref(source: SliceSource) -> TensorRef:
            if rel is None:
                return (source.model, out_name)
            return (source.model, with_layer_index(first_name, source.layer_range[0] + rel))

        members = spec.sources
        base_ref = None
        if method.uses_base and (base_path or not method.base_optional):
            if not base_path:
                raise MergeflowError(f"merge method {method.name!r} needs a 'base_model'")
            base_members = [s for s in members if s.model == base_path]
            base_ref = ref(base_members[0]) if base_members else (
                base_path, ref(members[0])[1])
            members = [s for s in members if s.model != base_path]
        self._check_model_count(method, members, out_name, base_ref is not None)
        model_params = [self._model_params(method, s, spec, t, out_name) for s in members]
        params = self._method_params(method, spec, t, out_name)
        refs = [ref(s) for s in members]
        shape = self._check_shapes(refs + ([base_ref] if base_ref else []), out_name)
        seed = tensor_seed(self.recipe.seed, out_name)
        return TensorPlan(out_name, method, refs, base_ref, model_params, params, seed, shape)

    def _check_model_count(self, method: MergeMethod, members: list, tensor: str, has_base: bool) -> None:
        """The models merged besides the base are within the method's ``min_models`` and
        ``max_models``."""
        count = len(members)
        low, high = method.min_models, method.max_models
        if low <= count and (high is None or count <= high):
            return
        if high == low:
            needs = f"exactly {low}"
        elif high is None:
            needs = f"at least {low}"
        else:
            needs = f"{low} to {high}"
        besides = " besides the base" if has_base else ""
        raise MergeflowError(f"merge method {method.name!r} merges {needs} model(s){besides}; "
                             f"tensor {tensor!r} has {count}")

    def _model_params(self, method: MergeMethod, source: SliceSource, spec: SliceSpec,
                      t: float, tensor: str) -> dict[str, Any]:
        values = {}
        for key, default in method.model_defaults.items():
            found, setting = _lookup(key, source.parameters, spec.parameters, self.recipe.parameters)
            value = resolve_value(setting, t, tensor, key) if found else None
            value = default if value is None else value
            _check_value(key, value, source.model, tensor)
            if key == "weight" and abs(value) > ABSURD_WEIGHT and (source.model, value) not in self._warned:
                self._warned.add((source.model, value))
                log.warning("weight %r of model %r is beyond +-%g: the merge will be dominated by it "
                            "(a typo, or a missing normalize?)", value, source.model, ABSURD_WEIGHT)
            values[key] = value
        return values

    def _method_params(self, method: MergeMethod, spec: SliceSpec, t: float,
                       tensor: str) -> dict[str, Any]:
        values = {}
        for key, default in method.method_defaults.items():
            found, setting = _lookup(key, spec.parameters, self.recipe.parameters)
            value = resolve_value(setting, t, tensor, key) if found else None
            value = default if value is None else value
            if value is None:
                raise MergeflowError(
                    f"merge method {method.name!r} needs parameter {key!r} (tensor {tensor!r})")
            if key == "tie_break" and value not in TIE_BREAKS:
                raise MergeflowError(f"tie_break {value!r} for tensor {tensor!r}: expected one of "
                                     f"{', '.join(TIE_BREAKS)}")
            values[key] = value
        return values

    def _check_shapes(self, refs: list[TensorRef], tensor: str) -> tuple[int, ...]:
        infos = [self.source_info(r) for r in refs]
        for r, info in zip(refs[1:], infos[1:]):
            if info.shape != infos[0].shape:
                raise MergeflowError(
                    f"tensor shape mismatch for {tensor!r}: model {refs[0][0]!r} has "
                    f"{list(infos[0].shape)}, model {r[0]!r} has {list(info.shape)}")
        return infos[0].shape


def open_sources(recipe: Recipe) -> dict[str, ModelSource]:
    return {path: ModelSource(path) for path in recipe.model_paths()}


def plan_merge(recipe: Recipe, sources: dict[str, ModelSource],
               out_dtype: str | None = None) -> MergePlan:
    """Plan every output tensor; checks methods, parameters, tensor names and shapes."""
    planner = _Planner(recipe, sources)
    tensors = planner.plan()
    compute_dtype = torch_dtype(recipe.dtype or "float32", "recipe dtype")
    chosen = out_dtype or recipe.out_dtype or recipe.dtype
    if chosen:
        resolved_out = torch_dtype(chosen, "output dtype")
    else:
        first_float = next((planner.source_info((planner.template, t.name)).dtype
                            for t in tensors if layer_index(t.name) is None), torch.float32)
        resolved_out = first_float if first_float.is_floating_point else torch.float32
    num_layers = sum(spec.num_layers for spec in planner.slices)
    return MergePlan(tensors, num_layers, planner.template, compute_dtype, resolved_out)


def merge_tensor(plan: TensorPlan, fetch: Fetch, device: torch.device | str,
                 ws: Workspace | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Run one tensor's plan; ``fetch(model, name)`` gives source tensors in the compute dtype
    on ``device``. Source tensors are not modified. ``ws`` and ``out`` as for the methods:
    they change where results go, never their values."""
    tensors = [fetch(model, name) for model, name in plan.sources]
    base = fetch(*plan.base) if plan.base else None
    try:
        return plan.method.function(tensors, base, plan.model_params, plan.params,
                                    _rng_factory(plan, device), ws, out)
    except MergeflowError as err:  # a method's own refusal (multislerp's cancelling directions)
        raise MergeflowError(f"tensor {plan.name!r}: {err}") from None


def masked_terms(plan: TensorPlan, fetch: Fetch, device: torch.device | str,
                 ws: Workspace | None = None) -> MaskedTerms:
    """One tensor's :class:`~mergeflow.merge.methods.MaskedTerms`: its merge with every mask held as
    :func:`merge_tensor` makes it (the same trims, and the same seeded draws), as a smooth function
    of the weights and lambda. MergeflowError for a method without that form."""
    if plan.method.masked is None:
        raise MergeflowError(f"tensor {plan.name!r}: merge method {plan.method.name!r} has no form with its masks held")
    tensors = [fetch(model, name) for model, name in plan.sources]
    return plan.method.masked(tensors, fetch(*plan.base), plan.model_params, plan.params,
                              _rng_factory(plan, device), ws)


def _rng_factory(plan: TensorPlan, device: torch.device | str) -> Callable[[int], torch.Generator]:
    """Model ``i``'s generator, seeded with ``plan.seed + i`` on first use and then the same
    object: a tensor merged in blocks continues each model's draws from block to block."""
    if not plan.method.random:
        return _no_rng
    generators: dict[int, torch.Generator] = {}

    def rng(model_index: int) -> torch.Generator:
        if model_index not in generators:
            generators[model_index] = torch.Generator(device=device)
            generators[model_index].manual_seed(plan.seed + model_index)
        return generators[model_index]

    return rng


def merge_tensor_blocks(plan: TensorPlan, read: ReadRange, device: torch.device | str,
                        block: int | None = None) -> Iterator[torch.Tensor]:
    """Run one tensor's plan, yielding its result as consecutive flat blocks; together they
    equal ``merge_tensor``'s result bit for bit. Tensors of at most ``block`` entries, and those
    a method needs whole (``MergeMethod.layout`` None), come as one block.

    A block sees the same entries and the same operations as in the whole tensor: blocks are
    multiples of the methods' own CPU blocks (or whole rows for row-wise methods), each
    model's random generator continues across blocks, and a method's whole-tensor quantities
    (``MergeMethod.prepare``: trims, angles, weights) are computed first from passes over the
    blocks, as the whole-tensor merge computes them (``passes``). ``block``: default
    ``STREAM_BLOCK``.
    """
    block = block or STREAM_BLOCK
    if block % CPU_BLOCK:
        raise ValueError(f"block {block} is not a multiple of {CPU_BLOCK}")
    numel = math.prod(plan.shape)
    layout = plan.method.layout(plan.params, plan.shape)
    refs = plan.sources + ([plan.base] if plan.base else [])
    # a row-wise method ranks a vector's entries across the whole vector: one row
    if layout is None or numel <= block or (layout == "rows" and len(plan.shape) < 2):
        whole = {ref: read(*ref, 0, numel).view(plan.shape) for ref in refs}
        yield merge_tensor(plan, lambda model, name: whole[(model, name)], device).reshape(-1)
        return
    row = numel // plan.shape[0] if layout == "rows" else None
    if row is not None:
        block = max(1, block // row) * row

    def passes(models: list[int] | None = None) -> Iterator[tuple[int, list[torch.Tensor], torch.Tensor | None]]:
        chosen = range(len(plan.sources)) if models is None else models
        for start in range(0, numel, block):
            stop = min(start + block, numel)
            tensors = [read(*plan.sources[i], start, stop) for i in chosen]
            base = read(*plan.base, start, stop) if plan.base else None
            if row is not None:
                tensors = [t.view(-1, row) for t in tensors]
                base = base.view(-1, row) if base is not None else None
            yield start, tensors, base

    ws = Workspace(cache=True, sort_cache=False)
    options = {}
    if plan.method.prepare is not None:
        with one_cpu_thread(device):
            options["prepared"] = plan.method.prepare(passes, plan.shape, plan.model_params, plan.params)
    rng = _rng_factory(plan, device)
    for start, tensors, base in passes():
        out = ws.empty("block_result", tensors[0])
        if plan.method.prepare is not None:
            options["offset"] = start
        yield plan.method.function(tensors, base, plan.model_params, plan.params, rng, ws, out,
                                   **options).reshape(-1)


def _no_rng(model_index: int) -> torch.Generator:
    raise RuntimeError("a deterministic merge method asked for random numbers")


def check_finite(tensor: torch.Tensor, tensor_name: str, model: str) -> None:
    """MergeflowError naming the tensor and model when a tensor holds NaN or Inf."""
    if tensor.is_floating_point() and tensor.numel() and not _finite(tensor):
        raise MergeflowError(f"tensor {tensor_name!r} of model {model!r} contains NaN or Inf")


def _finite(tensor: torch.Tensor) -> bool:
    # min and max are NaN when any entry is, +-Inf when one is: one reduction pass, no mask
    # (isfinite().all() costs a bool tensor and is an order of magnitude slower on CPU)
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
