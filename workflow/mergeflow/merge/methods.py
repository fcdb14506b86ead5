"""Merge methods: pure functions from source tensors and resolved parameters to one tensor.

Every method has the same signature::

    method(tensors, base, model_params, params, rng, ws=None, out=None) -> Tensor

- ``tensors``: the tensors of the models being merged, in recipe order. For methods that work
  on task vectors (everything but ``linear``) the base model is *not* among them.
- ``base``: the base model's tensor, or None for methods that do not use one.
- ``model_params``: one dict per entry of ``tensors`` with the per-model parameters resolved
  for this tensor and defaults filled in (``weight``, ``density``, ``gamma``, ``epsilon``).
- ``params``: the method parameters resolved for this tensor, defaults filled in
  (``lambda``, ``normalize``, ``rescale``, ``t``).
- ``rng(i)``: a ``torch.Generator`` for model ``i``, seeded from (recipe seed, tensor name, i)
  so random methods (DARE, DELLA) are reproducible tensor by tensor.
- ``ws``: a ``sparsify.Workspace`` giving scratch tensors (default: fresh allocations);
  ``out``: an optional tensor to write the result into (same shape and dtype).
- ``trims`` (magnitude-trimming methods only): the per-model ``sparsify.Trim`` of the whole
  tensor, given when the call merges one block of it (``plan.merge_tensor_blocks``); None,
  computed from ``tensors``.

Source tensors are never modified. The same operations run whether or not ``ws`` caches and
whether or not ``out`` is given, so results are bitwise identical either way.

Semantics and defaults follow the published methods and mergekit's choices where mergekit has
the method; ``registry.MERGE_METHODS`` declares each one's parameters and defaults.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mergeflow.merge.sparsify import (
    Trim, Workspace, apply_trim, drop_by_magnitude_rank, drop_magnitude_outliers, magnitude_trims,
)

RngFactory = Callable[[int], torch.Generator]
MethodFunction = Callable[..., Tensor]

# Below this |cos| SLERP interpolates on the great circle; above it the vectors are nearly
# colinear, sin(theta) is tiny and plain linear interpolation is the stable answer.
SLERP_DOT_THRESHOLD = 0.9995
_TINY = 1e-8


def _destination(out: Tensor | None, ws: Workspace, like: Tensor) -> Tensor:
    return out if out is not None else ws.empty("result", like)


def linear_merge(tensors, base, model_params, params, rng, ws=None, out=None) -> Tensor:
    """Weighted average ``sum(w_i x_i) / sum(w_i)`` (or the plain weighted sum without
    ``normalize``)."""
    weights = [float(p["weight"]) for p in model_params]
    total = sum(weights)
    scale = 1.0 / total if params["normalize"] and abs(total) > _TINY else 1.0
    result = torch.mul(tensors[0], weights[0] * scale,
                       out=_destination(out, ws or Workspace(), tensors[0]))
    for tensor, weight in zip(tensors[1:], weights[1:]):
        result.add_(tensor, alpha=weight * scale)
    return result


def _task_vector_sum(tensors, base, weights, lam: float, normalize: bool, result: Tensor) -> Tensor:
    """``base + lam * sum(w_i (x_i - base)) [/ sum(w_i)]`` rearranged to one pass per source:
    ``sum(c_i x_i) + (1 - sum(c_i)) base`` with ``c_i = lam w_i [/ sum(w_i)]``."""
    total = sum(weights)
    divisor = total if normalize and abs(total) > _TINY else 1.0
    coefficients = [lam * w / divisor for w in weights]
    torch.mul(base, 1.0 - sum(coefficients), out=result)
    for tensor, coefficient in zip(tensors, coefficients):
        result.add_(tensor, alpha=coefficient)
    return result


# CPU merges run in blocks of this many entries (512 KiB of float32): a dozen passes over a
# block stay in cache, where over a whole tensor each pass goes to memory, and the Python cost
# per block stays small. On the bench's 134M-parameter TIES merge: 2^16 against 2^14 in memory
# 1.44 s against 2.3 s (one core busy beside it: 1.75 s against 3.3 s); 2^17 against 2^16 in
# memory 1.24-1.38 s against 1.43-1.76 s, streaming about even (9.9-12.3 s against 10.5-13.0 s,
# a noisy machine); 2^18 streamed slower in one run.
CPU_BLOCK = 1 << 17


def _elect_and_merge(deltas: list[Tensor], scales: list[float], weights: list[float],
                     normalize: bool, ws: Workspace, result: Tensor) -> Tensor:
    """TIES sign election and disjoint merge of ``scales[i] * deltas[i]`` (scales >= 0), into
    ``result``: per entry the sign of the scaled sum wins (zero counts as positive); only
    deltas agreeing with it contribute, and with ``normalize`` their sum is divided by the sum
    of the ``weights`` of the agreeing ones (the disjoint mean).

    Float-only formulation (bool masks are slow on CPU): with ``s = +-1`` the elected sign,
    a delta agrees iff ``delta * s > 0``, so ``sum of agreeing = s * sum(c_i relu(delta_i s))``.
    """
    total = torch.mul(deltas[0], scales[0], out=ws.empty("total", result))
    for delta, scale in zip(deltas[1:], scales[1:]):
        total.add_(delta, alpha=scale)
    # copysign gives +1 for +0.0; a -0.0 total only arises when every delta is zero there
    elected = torch.copysign(ws.ones(result), total, out=total)
    agreeing = ws.empty("agreeing", result)
    weight_sum = ws.empty("weight_sum", result) if normalize else None
    for index, (delta, scale, weight) in enumerate(zip(deltas, scales, weights)):
        torch.mul(delta, elected, out=agreeing).clamp_min_(0.0)
        if index == 0:
            torch.mul(agreeing, scale, out=result)
        else:
            result.add_(agreeing, alpha=scale)
        if weight_sum is not None:
            agrees = torch.gt(agreeing, 0.0, out=agreeing)  # 0/1 floats
            if index == 0:
                torch.mul(agrees, weight, out=weight_sum)
            else:
                weight_sum.add_(agrees, alpha=weight)
    result.mul_(elected)
    if weight_sum is not None:
        # where nothing agrees the sum is 0: divide by 1 there, not 0
        weight_sum.add_(torch.eq(weight_sum, 0.0, out=agreeing))
        result.div_(weight_sum)
    return result


@dataclass(frozen=True, kw_only=True)
class _TaskArithmeticVariant:
    sparsify: str | None  # None, "magnitude", "random", "outliers", "magnitude_rank"
    sign_consensus: bool

    @property
    def elementwise(self) -> bool:
        """Whether the merge can run block by block (given per-tensor trim thresholds)."""
        return self.sparsify in (None, "magnitude", "random")


def _sparsify_block(delta: Tensor, variant: _TaskArithmeticVariant, model: dict,
                    trim: Trim | None, rescale: bool, generator: torch.Generator | None,
                    ws: Workspace) -> Tensor:
    """Sparsify one task vector (block) in place; DARE's 1/density rescale is left to the
    caller's scale."""
    density = float(model["density"])
    if density >= 1.0:
        return delta
    if variant.sparsify == "magnitude":
        return apply_trim(delta, trim, ws)
    if variant.sparsify == "random":
        draws = torch.rand(delta.shape, generator=generator, out=ws.empty("random", delta))
        # a 0/1 float mask: a comparison into a float output and a float product are fast on
        # CPU, a bool mask multiplied into floats is not
        return delta.mul_(torch.lt(draws, density, out=draws))
    if variant.sparsify == "outliers":
        return drop_magnitude_outliers(delta, density, float(model["gamma"]), rescale)
    if variant.sparsify == "magnitude_rank":
        return drop_by_magnitude_rank(delta, density, float(model["epsilon"]), rescale, generator)
    return delta


def _merge_block(tensors, base, model_params, variant, params, trims, generators,
                 ws: Workspace, result: Tensor) -> Tensor:
    """The task-vector merge of one block (or a whole tensor), into ``result``."""
    weights = [float(p["weight"]) for p in model_params]
    rescale = bool(params["rescale"])
    normalize = bool(params["normalize"])
    deltas, scales = [], []
    for index, (tensor, model) in enumerate(zip(tensors, model_params)):
        delta = torch.sub(tensor, base, out=ws.empty(f"delta{index}", base))
        delta = _sparsify_block(delta, variant, model, trims[index], rescale,
                                generators[index], ws)
        scale = weights[index]
        density = float(model["density"])
        if variant.sparsify == "random" and rescale and density < 1.0:
            scale /= density
        if scale < 0.0:  # the election below needs non-negative scales
            delta.mul_(scale)
            scale = 1.0
        deltas.append(delta)
        scales.append(scale)
    if variant.sign_consensus:
        _elect_and_merge(deltas, scales, weights, normalize, ws, result)
    else:
        torch.mul(deltas[0], scales[0], out=result)
        for delta, scale in zip(deltas[1:], scales[1:]):
            result.add_(delta, alpha=scale)
        total = sum(weights)
        if normalize and abs(total) > _TINY:
            result.div_(total)
    return torch.add(base, result, alpha=float(params["lambda"]), out=result)


def _whole_tensor_trims(tensors, base, model_params, ws: Workspace, tie_break: str) -> list[Trim | None]:
    keys = [(t.data_ptr(), base.data_ptr(), tuple(base.shape), base.dtype) for t in tensors]
    return magnitude_trims(model_params, base.numel(),
                           lambda i: torch.sub(tensors[i], base).abs_().reshape(-1).float(), ws, keys,
                           tie_break)


def _generalized_task_arithmetic(*, sparsify: str | None, sign_consensus: bool) -> MethodFunction:
    """Build a task-vector method: sparsify each ``x_i - base`` (see ``_TaskArithmeticVariant``),
    optionally elect signs, sum with weights, optionally normalize by the (agreeing) weights,
    scale by lambda, add base."""
    variant = _TaskArithmeticVariant(sparsify=sparsify, sign_consensus=sign_consensus)

    def merge(tensors, base, model_params, params, rng, ws=None, out=None, trims=None) -> Tensor:
        ws = ws or Workspace()
        result = _destination(out, ws, base)
        if variant.sparsify is None and not variant.sign_consensus:
            weights = [float(p["weight"]) for p in model_params]
            return _task_vector_sum(tensors, base, weights, float(params["lambda"]),
                                    bool(params["normalize"]), result)
        if trims is None and variant.sparsify == "magnitude":
            trims = _whole_tensor_trims(tensors, base, model_params, ws, params["tie_break"])
        trims = trims or [None] * len(tensors)
        random = variant.sparsify in ("random", "magnitude_rank")
        generators = [rng(i) if random else None for i in range(len(tensors))]
        if not variant.elementwise or base.device.type != "cpu" or base.numel() <= CPU_BLOCK:
            return _merge_block(tensors, base, model_params, variant, params, trims,
                                generators, ws, result)
        flat_sources = [t.reshape(-1) for t in tensors]
        flat_base, flat_result = base.reshape(-1), result.view(-1)
        for start in range(0, base.numel(), CPU_BLOCK):
            block = slice(start, start + CPU_BLOCK)
            block_trims = [t.block(start, start + CPU_BLOCK) if t is not None else None for t in trims]
            _merge_block([t[block] for t in flat_sources], flat_base[block], model_params,
                         variant, params, block_trims, generators, ws, flat_result[block])
        return result

    return merge


task_arithmetic_merge = _generalized_task_arithmetic(sparsify=None, sign_consensus=False)
ties_merge = _generalized_task_arithmetic(sparsify="magnitude", sign_consensus=True)
dare_linear_merge = _generalized_task_arithmetic(sparsify="random", sign_consensus=False)
dare_ties_merge = _generalized_task_arithmetic(sparsify="random", sign_consensus=True)
breadcrumbs_merge = _generalized_task_arithmetic(sparsify="outliers", sign_consensus=False)
breadcrumbs_ties_merge = _generalized_task_arithmetic(sparsify="outliers", sign_consensus=True)
della_merge = _generalized_task_arithmetic(sparsify="magnitude_rank", sign_consensus=True)
della_linear_merge = _generalized_task_arithmetic(sparsify="magnitude_rank", sign_consensus=False)


def _lerp(v0: Tensor, v1: Tensor, t: float, result: Tensor) -> Tensor:
    return torch.mul(v0, 1.0 - t, out=result).add_(v1, alpha=t)


def slerp_merge(tensors, base, model_params, params, rng, ws=None, out=None) -> Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1), on the angle
    between the flattened tensors; linear interpolation when they are nearly colinear."""
    t = float(params["t"])
    v0, v1 = base, tensors[0]
    result = _destination(out, ws or Workspace(), base)
    norm0 = float(torch.linalg.vector_norm(v0.float()))
    norm1 = float(torch.linalg.vector_norm(v1.float()))
    if norm0 < _TINY or norm1 < _TINY:
        return _lerp(v0, v1, t, result)
    dot = float(torch.sum(v0.double() * v1.double())) / (norm0 * norm1)
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return _lerp(v0, v1, t, result)
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    scale0 = math.sin((1.0 - t) * theta) / sin_theta
    scale1 = math.sin(t * theta) / sin_theta
    return torch.mul(v0, scale0, out=result).add_(v1, alpha=scale1)


def model_stock_ratio(cosine: float, num_models: int) -> float:
    """Model Stock's interpolation ratio ``t = N cos / (1 + (N - 1) cos)``."""
    denominator = 1.0 + (num_models - 1) * cosine
    if abs(denominator) < _TINY:
        return 0.0
    return num_models * cosine / denominator


def model_stock_merge(tensors, base, model_params, params, rng, ws=None, out=None) -> Tensor:
    """Model Stock: average the fine-tuned models and move from the base towards that average
    by ``t`` from the mean pairwise cosine between their task vectors."""
    deltas = [torch.sub(tensor, base).flatten().double() for tensor in tensors]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            norms = float(torch.linalg.vector_norm(deltas[i]) * torch.linalg.vector_norm(deltas[j]))
            cosine = float(torch.dot(deltas[i], deltas[j])) / max(norms, 1e-6)
            cosines.append(max(-1.0, min(1.0, cosine)))
    ratio = model_stock_ratio(sum(cosines) / len(cosines), len(tensors))
    average = torch.mul(tensors[0], 1.0 / len(tensors), out=_destination(out, ws or Workspace(), base))
    for tensor in tensors[1:]:
        average.add_(tensor, alpha=1.0 / len(tensors))
    return average.mul_(ratio).add_(base, alpha=1.0 - ratio)
