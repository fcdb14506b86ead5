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

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from mergeflow.errors import MergeflowError
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


def _one_cpu_thread(method: MethodFunction) -> MethodFunction:
    """Run ``method`` on one CPU thread. Whole-tensor reductions (norms, dots, sums) round
    according to how torch's threads split them (a dot of 8192 entries already differs between
    one thread and two); the streaming writer merges on one thread, so the in-memory merger must
    too for the same bits."""
    @functools.wraps(method)
    def run(tensors, *args, **kwargs) -> Tensor:
        threads = torch.get_num_threads()
        if tensors[0].device.type != "cpu" or threads == 1:
            return method(tensors, *args, **kwargs)
        torch.set_num_threads(1)
        try:
            return method(tensors, *args, **kwargs)
        finally:
            torch.set_num_threads(threads)

    return run


# ---- Spherical methods (nuslerp, multislerp, karcher). Their angles and norms lose too much in
# half precision, so they compute in float32 at least and the result takes the compute dtype.


def _geometric(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


# nuslerp: vectors with 1 - cos^2 at most this squared are (anti)parallel and interpolate
# linearly; mergekit's test, true in float32 only where |cos| rounds to 1.
NUSLERP_EPS = 1e-8
# nuslerp divides each vector by max(norm, this): a zero vector stays zero and so counts as
# orthogonal to the other.
NUSLERP_NORM_FLOOR = 1e-7


def _slerp_last_axis(v0: Tensor, v1: Tensor, t: float) -> Tensor:
    """Spherical interpolation of each pair of vectors along the last axis, from ``v0`` (t=0) to
    ``v1`` (t=1), by the angle between them: ``(sin((1-t)theta) v0 + sin(t theta) v1) /
    sin(theta)``, so magnitudes interpolate too. (Anti)parallel pairs interpolate linearly; a
    zero vector counts as orthogonal (theta = pi/2: the other is scaled by sin(t pi/2))."""
    norm0 = torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp_min_(NUSLERP_NORM_FLOOR)
    norm1 = torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp_min_(NUSLERP_NORM_FLOOR)
    cosine = torch.sum((v0 / norm0) * (v1 / norm1), dim=-1, keepdim=True).clamp_(-1.0, 1.0)
    parallel = (1.0 - cosine.square()) <= NUSLERP_EPS ** 2
    # the spherical branch at theta = pi/2 where parallel, so it stays finite before it is dropped
    theta = torch.acos(cosine.masked_fill(parallel, 0.0))
    sin_theta = torch.sin(theta)
    spherical = v0 * (torch.sin((1.0 - t) * theta) / sin_theta) + v1 * (torch.sin(t * theta) / sin_theta)
    return torch.where(parallel, v0 * (1.0 - t) + v1 * t, spherical)


@_one_cpu_thread
def nuslerp_merge(tensors, base, model_params, params, rng, ws=None, out=None) -> Tensor:
    """NuSLERP: spherical interpolation between two models at ``t = w1 / (w0 + w1)`` (0.5 when
    the weights sum to about zero); with a base, between their task vectors, added back to the
    base. ``nuslerp_flatten`` (default) takes each tensor as one vector; otherwise each row
    (vectors along the last axis), or with ``nuslerp_row_wise`` each column (along the first)."""
    w0, w1 = (float(p["weight"]) for p in model_params)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    v0, v1 = (_geometric(x if base is None else x - base) for x in tensors)
    if params["nuslerp_flatten"]:
        merged = _slerp_last_axis(v0.reshape(-1), v1.reshape(-1), t)
    elif params["nuslerp_row_wise"]:
        merged = _slerp_last_axis(v0.transpose(0, -1), v1.transpose(0, -1), t).transpose(0, -1)
    else:
        merged = _slerp_last_axis(v0, v1, t)
    result = _destination(out, ws or Workspace(), tensors[0])
    merged = merged.reshape(result.shape)
    return result.copy_(merged if base is None else merged + _geometric(base))


@_one_cpu_thread
def multislerp_merge(tensors, base, model_params, params, rng, ws=None, out=None) -> Tensor:
    """Multi-SLERP: a weighted mean of the models' directions on the unit sphere, from the tangent
    space at their normalized weighted mean (one exponential map), scaled by the weighted mean of
    their norms; with a base, of their task vectors, added back to the base. Weights are divided
    by their sum with ``normalize_weights``; one model is returned as is."""
    result = _destination(out, ws or Workspace(), tensors[0])
    if len(tensors) == 1:
        return result.copy_(tensors[0])
    eps = float(params["eps"])
    weights = [float(p["weight"]) for p in model_params]
    if params["normalize_weights"]:
        total = sum(weights)
        if total == 0.0:
            raise MergeflowError(f"multislerp: the models' weights {weights} sum to zero "
                                 "(normalize_weights divides by their sum)")
        weights = [w / total for w in weights]
    vectors = [_geometric(x if base is None else x - base).reshape(-1) for x in tensors]
    norms = [torch.linalg.vector_norm(v) for v in vectors]
    units = [v / (norm + eps) for v, norm in zip(vectors, norms)]
    mean = sum(w * u for w, u in zip(weights, units))
    mean_norm = float(torch.linalg.vector_norm(mean))
    if mean_norm < eps:
        # No mean direction. Two models (antipodal, balanced) and unchanged tensors (every vector
        # zero) fall back to the weighted sum; otherwise the weights must change. mergekit
        # raises for unchanged tensors of three or more models too.
        if len(tensors) > 2 and any(float(n) > 0.0 for n in norms):
            raise MergeflowError(f"multislerp: the weighted mean of the models' directions is zero "
                                 f"(antipodal task vectors balanced by the weights {weights}); change the weights")
        merged = sum(w * v for w, v in zip(weights, vectors))
    else:
        mean = mean / mean_norm
        tangent = sum(w * (u - torch.dot(u, mean) * mean) for w, u in zip(weights, units))
        length = float(torch.linalg.vector_norm(tangent)) + eps
        direction = mean * math.cos(length) + tangent * (math.sin(length) / length)
        merged = direction * sum(w * norm for w, norm in zip(weights, norms))
    merged = merged.reshape(result.shape)
    return result.copy_(merged if base is None else merged + _geometric(base))


def karcher_mean(vectors: list[Tensor], max_iter: int, tol: float) -> Tensor:
    """The Karcher (Riemannian) mean of flat vectors' directions, equally weighted, scaled by
    their mean norm. Vectors with norm at most ``tol`` have no direction and only count in the
    scale (zero, for a zero vector); when the mean direction cancels the first direction starts
    the iteration. Each step moves along the mean log map; stops after ``max_iter`` steps or
    once the step is shorter than ``tol``."""
    norms = [float(torch.linalg.vector_norm(v)) for v in vectors]
    scale = sum(norms) / len(vectors)
    units = [v / n for v, n in zip(vectors, norms) if n > tol]
    if not units:
        return torch.zeros_like(vectors[0])
    share = 1.0 / len(units)
    mean = sum(share * u for u in units)
    mean_norm = float(torch.linalg.vector_norm(mean))
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for unit in units:
            cosine = max(-1.0, min(1.0, float(torch.dot(mean, unit))))
            theta = math.acos(cosine)
            if theta < tol or math.sin(theta) == 0.0:  # at the mean; or antipodal: no direction
                continue
            step.add_(unit - cosine * mean, alpha=share * theta / math.sin(theta))
        length = float(torch.linalg.vector_norm(step))
        if length < tol:
            break
        mean = mean * math.cos(length) + step * (math.sin(length) / length)
        mean_norm = float(torch.linalg.vector_norm(mean))
        if mean_norm > tol:
            mean = mean / mean_norm
    return mean * scale


@_one_cpu_thread
def karcher_merge(tensors, base, model_params, params, rng, ws=None, out=None) -> Tensor:
    """Karcher mean of the models (see :func:`karcher_mean`); one model is returned as is. No
    base: a models recipe's ``base_model`` is merged as one more model (the planner adds it)."""
    result = _destination(out, ws or Workspace(), tensors[0])
    if len(tensors) == 1:
        return result.copy_(tensors[0])
    merged = karcher_mean([_geometric(x).reshape(-1) for x in tensors],
                          int(params["max_iter"]), float(params["tol"]))
    return result.copy_(merged.reshape(result.shape))


# ---- Task-vector methods with their own weighting (sce, ram, ramplus_tl), nearswap and
# arcee_fusion: computed in the compute dtype, as mergekit does.


def _variance_mask(deltas: Tensor, fraction: float) -> Tensor:
    """1 at the ``int(fraction * count)`` entries whose task vectors vary most across the models
    (population variance; ``count`` the entries that vary at all), 0 elsewhere."""
    variance = torch.var(deltas, dim=0, correction=0)
    # the product as torch forms it (a float32 tensor), as mergekit does: the same cut
    keep = int(torch.count_nonzero(variance) * fraction) if fraction > 0 else 0
    mask = torch.zeros_like(variance)
    if keep > 0:
        mask.view(-1)[torch.topk(variance.reshape(-1), keep).indices] = 1.0
    return mask


@_one_cpu_thread
def sce_merge(tensors, base, model_params, params, rng, ws=None, out=None) -> Tensor:
    """SCE (select, calculate, erase): keep the ``select_topk`` fraction of entries whose task
    vectors vary most across the models (all at 1); weight each model by its task vector's mean
    square (normalized to sum 1; equal when they sum below 1e-6); per entry, drop the task
    vectors whose sign differs from the sign of their sum (zero entries never agree), and take
    the weighted mean of the rest: ``base + sum(w_i d_i) / max(sum(w_i), 1e-6)`` over them."""
    deltas = torch.stack([x - base for x in tensors])
    fraction = float(params["select_topk"])
    if fraction < 1.0:
        deltas.mul_(_variance_mask(deltas, fraction))
    energy = deltas.square().reshape(len(tensors), -1).mean(dim=1)
    total = float(energy.sum())
    weights = torch.full_like(energy, 1.0 / len(tensors)) if abs(total) < 1e-6 else energy / total
    weights = weights.reshape(-1, *([1] * base.dim()))
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
    agreeing = weights * (torch.sign(deltas) == elected)
    merged = (deltas * agreeing).sum(dim=0) / agreeing.sum(dim=0).clamp_min(1e-6)
    return torch.add(base, merged, out=_destination(out, ws or Workspace(), base))


# nearswap divides by max(|x - base|, this): where the models agree, the other model's value
NEARSWAP_FLOOR = 1e-6


def nearswap_merge(tensors, base, model_params, params, rng, ws=None, out=None) -> Tensor:
    """NearSwap: per entry, move from the base towards the other model by
    ``min(1, t / |x - base|)`` of their difference (none for t <= 0): entries closer than ``t``
    take the other model's value, those further apart mostly keep the base's."""
    ws = ws or Workspace()
    result = _destination(out, ws, base)
    delta = torch.sub(tensors[0], base, out=ws.empty("delta0", base))
    share = torch.abs(delta, out=ws.empty("share", base)).clamp_min_(NEARSWAP_FLOOR)
    share.reciprocal_().mul_(float(params["t"])).clamp_(0.0, 1.0)
    return torch.mul(delta, share, out=result).add_(base)


def _fusion_importance(model: Tensor, base: Tensor) -> Tensor:
    """Arcee Fusion's importance of each entry: ``|x - base|`` times the KL divergence of the
    softmax of its row (last axis) in the model from that in the base."""
    p = torch.softmax(model, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return torch.abs(model - base) * divergence


@_one_cpu_thread
def arcee_fusion_merge(tensors, base, model_params, params, rng, ws=None, out=None) -> Tensor:
    """Arcee Fusion: the other model's value where the entry's importance (see
    ``_fusion_importance``) reaches ``median + 1.5 IQR`` of the tensor's importances (the
    outliers of a box plot), the base's elsewhere. Quartiles are the sorted importances at
    ``floor(q (n - 1))``, of the whole tensor: mergekit takes them from a random sample of 1M
    entries in larger tensors, which cannot be reproduced."""
    model = tensors[0]
    flat = _fusion_importance(model, base).reshape(-1)
    last = flat.numel() - 1
    quartiles = torch.stack([torch.kthvalue(flat, index + 1).values
                             for index in (last // 4, last // 2, 3 * last // 4)])
    threshold = quartiles[1] + 1.5 * (quartiles[2] - quartiles[0])  # in the compute dtype
    keep = (flat >= threshold).reshape(base.shape)
    return torch.where(keep, model, base, out=_destination(out, ws or Workspace(), base))


def _ram_sums(tensors, base, epsilon: float, ws: Workspace, total: Tensor):
    """RAM's per-entry sums: into ``total`` the sum of the task vectors' entries beyond
    ``epsilon`` in magnitude, and the count of them; with the kept task vectors and their 0/1
    masks (valid until the next use of ``ws``)."""
    count = ws.empty("count", base)
    deltas, kept = [], []
    for index, tensor in enumerate(tensors):
        delta = torch.sub(tensor, base, out=ws.empty(f"delta{index}", base))
        mask = torch.gt(torch.abs(delta, out=ws.empty(f"kept{index}", base)), epsilon,
                        out=ws.empty(f"kept{index}", base))
        delta.mul_(mask)
        if index == 0:
            total.copy_(delta)
            count.copy_(mask)
        else:
            total.add_(delta)
            count.add_(mask)
        deltas.append(delta)
        kept.append(mask)
    return count, deltas, kept


def ram_merge(tensors, base, model_params, params, rng, ws=None, out=None) -> Tensor:
    """RAM (reinforced agent merging): per entry, the mean of the task vectors' entries beyond
    ``epsilon`` in magnitude (an entry one model changed takes that change whole), added to the
    base."""
    ws = ws or Workspace()
    result = _destination(out, ws, base)
    count, _, _ = _ram_sums(tensors, base, float(params["epsilon"]), ws, result)
    return result.div_(count.clamp_min_(1.0)).add_(base)


def ramplus_tl_merge(tensors, base, model_params, params, rng, ws=None, out=None) -> Tensor:
    """RAM+ (tensor-local): RAM, with each model's changes that no other model makes scaled by
    ``1 + r min(alpha, shared / unique)``, ``shared`` and ``unique`` counting the model's kept
    entries that other models change too and those it alone changes, in this tensor
    (``unique`` floored at ``epsilon``)."""
    ws = ws or Workspace()
    result = _destination(out, ws, base)
    epsilon, r, alpha = float(params["epsilon"]), float(params["r"]), float(params["alpha"])
    count, deltas, kept = _ram_sums(tensors, base, epsilon, ws, result)
    alone = torch.eq(count, 1.0, out=ws.empty("alone", base))
    boost = ws.empty("boost", base).zero_()
    for delta, mask in zip(deltas, kept):
        # counts as integers: exact, whatever the tensor's size and the threads
        unique = int(torch.count_nonzero(mask * alone))
        shared = int(torch.count_nonzero(mask)) - unique
        floor = max(unique, epsilon)
        ratio = shared / floor if floor > 0 else (math.inf if shared else 0.0)
        boost.add_(delta, alpha=r * min(max(ratio, 0.0), alpha))
    # where one model changes an entry the mean is that change: add its boost there
    result.div_(count.clamp_min_(1.0))
    return result.add_(boost.mul_(alone)).add_(base)
