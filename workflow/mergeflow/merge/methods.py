"""Merge methods: pure functions from source tensors and resolved parameters to one tensor.

Every method has the same signature::

    method(tensors, base, model_params, params, rng) -> Tensor

- ``tensors``: the tensors of the models being merged, in recipe order. For methods that work
  on task vectors (everything but ``linear``) the base model is *not* among them.
- ``base``: the base model's tensor, or None for methods that do not use one.
- ``model_params``: one dict per entry of ``tensors`` with the per-model parameters resolved
  for this tensor and defaults filled in (``weight``, ``density``, ``gamma``, ``epsilon``).
- ``params``: the method parameters resolved for this tensor, defaults filled in
  (``lambda``, ``normalize``, ``rescale``, ``t``).
- ``rng(i)``: a ``torch.Generator`` for model ``i``, seeded from (recipe seed, tensor name, i)
  so random methods (DARE, DELLA) are reproducible tensor by tensor.

Semantics and defaults follow the published methods and mergekit's choices where mergekit has
the method; see ``MERGE_METHODS`` for the defaults of each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from mergeflow.errors import MergeflowError

RngFactory = Callable[[int], torch.Generator]
MethodFunction = Callable[
    [Sequence[Tensor], "Tensor | None", Sequence[dict[str, Any]], dict[str, Any], RngFactory], Tensor
]

# Below this |cos| SLERP interpolates on the great circle; above it the vectors are nearly
# colinear, sin(theta) is tiny and plain linear interpolation is the stable answer.
SLERP_DOT_THRESHOLD = 0.9995
_TINY = 1e-8


# --------------------------------------------------------------------------------------------
# Sparsification of task vectors (in place where possible)


def magnitude_threshold(values: Tensor, keep: int) -> float:
    """The ``keep``-th largest |value|: keeping ``|v| >= threshold`` keeps the top ``keep``."""
    magnitudes = values.abs().flatten()
    return float(torch.kthvalue(magnitudes.float(), magnitudes.numel() - keep + 1).values)


def trim_by_magnitude(delta: Tensor, density: float) -> Tensor:
    """TIES trim: keep the ``int(density * n)`` entries of largest magnitude, zero the rest.

    Entries tied with the threshold magnitude are all kept.
    """
    if density >= 1.0:
        return delta
    keep = int(density * delta.numel())
    if keep <= 0:
        return delta.zero_()
    threshold = magnitude_threshold(delta, keep)
    return delta.mul_(delta.abs() >= threshold)


def drop_random(delta: Tensor, density: float, rescale: bool, generator: torch.Generator) -> Tensor:
    """DARE: keep each entry with probability ``density`` (Bernoulli), rescale by 1/density."""
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
    delta.mul_(keep)
    if rescale:
        delta.div_(density)
    return delta


def drop_magnitude_outliers(delta: Tensor, density: float, gamma: float, rescale: bool) -> Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` fraction by magnitude (outliers) and the
    smallest entries, keeping ``int(density * n)`` entries in between."""
    if density >= 1.0:
        return delta
    total = delta.numel()
    keep = int(total * density)
    n_top = int(total * gamma)
    n_bottom = total - keep - n_top
    if n_bottom < 0:  # gamma + density > 1: keep the density, drop fewer outliers
        n_bottom, n_top = 0, total - keep
    order = torch.argsort(delta.abs().flatten().float())
    mask = torch.zeros(total, dtype=torch.bool, device=delta.device)
    mask[order[n_bottom : total - n_top]] = True
    delta.mul_(mask.view(delta.shape))
    if rescale and keep > 0:
        delta.mul_(total / keep)
    return delta


def drop_by_magnitude_rank(
    delta: Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator
) -> Tensor:
    """DELLA (MagPrune): within each row, keep entries with probability rising linearly with
    their magnitude rank from ``density - epsilon`` to ``density + epsilon``; rescale each kept
    entry by 1/its keep probability. Probabilities are clipped to (0, 1]."""
    if density >= 1.0:
        return delta
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    columns = rows.shape[1]
    ranks = torch.argsort(torch.argsort(rows.abs().float(), dim=1), dim=1).to(rows.dtype)
    rank_fraction = ranks / (columns - 1) if columns > 1 else torch.full_like(ranks, 0.5)
    keep_probability = (density - epsilon + 2.0 * epsilon * rank_fraction).clamp_(_TINY, 1.0)
    keep = torch.rand(rows.shape, generator=generator, device=rows.device) < keep_probability
    result = rows * keep
    if rescale:
        result = result / keep_probability
    return result.reshape(delta.shape)


# --------------------------------------------------------------------------------------------
# Methods


def linear_merge(tensors, base, model_params, params, rng) -> Tensor:
    """Weighted average ``sum(w_i x_i) / sum(w_i)`` (or the plain weighted sum without
    ``normalize``)."""
    weights = [float(p["weight"]) for p in model_params]
    total = sum(weights)
    scale = 1.0 / total if params["normalize"] and abs(total) > _TINY else 1.0
    result = torch.mul(tensors[0], weights[0] * scale)
    for tensor, weight in zip(tensors[1:], weights[1:]):
        result.add_(tensor, alpha=weight * scale)
    return result


def _task_vector_sum(tensors, base, weights, lam: float, normalize: bool) -> Tensor:
    """``base + lam * sum(w_i (x_i - base)) [/ sum(w_i)]`` rearranged to one pass per source:
    ``sum(c_i x_i) + (1 - sum(c_i)) base`` with ``c_i = lam w_i [/ sum(w_i)]``."""
    total = sum(weights)
    divisor = total if normalize and abs(total) > _TINY else 1.0
    coefficients = [lam * w / divisor for w in weights]
    result = torch.mul(base, 1.0 - sum(coefficients))
    for tensor, coefficient in zip(tensors, coefficients):
        result.add_(tensor, alpha=coefficient)
    return result


def _elect_and_merge(weighted_deltas: list[Tensor], weights: list[float]) -> tuple[Tensor, Tensor]:
    """TIES sign election and disjoint sum: the sign of the weighted sum wins per entry; only
    entries agreeing with it contribute. Returns (sum of agreeing weighted deltas, sum of the
    weights of agreeing entries)."""
    majority_positive = torch.stack(weighted_deltas).sum(dim=0) >= 0
    merged = torch.zeros_like(weighted_deltas[0])
    weight_sum = torch.zeros_like(weighted_deltas[0])
    for delta, weight in zip(weighted_deltas, weights):
        agrees = torch.where(majority_positive, delta > 0, delta < 0)
        merged.add_(delta * agrees)
        weight_sum.add_(agrees, alpha=weight)
    return merged, weight_sum


@dataclass(frozen=True)
class _TaskArithmeticVariant:
    sparsify: str | None  # None, "magnitude", "random", "outliers", "magnitude_rank"
    sign_consensus: bool


def _sparsify(delta: Tensor, variant: _TaskArithmeticVariant, model: dict, rescale: bool,
              generator: Callable[[], torch.Generator]) -> Tensor:
    density = float(model["density"])
    if variant.sparsify == "magnitude":
        return trim_by_magnitude(delta, density)
    if variant.sparsify == "random":
        return drop_random(delta, density, rescale, generator())
    if variant.sparsify == "outliers":
        return drop_magnitude_outliers(delta, density, float(model["gamma"]), rescale)
    if variant.sparsify == "magnitude_rank":
        return drop_by_magnitude_rank(delta, density, float(model["epsilon"]), rescale, generator())
    return delta


def _generalized_task_arithmetic(variant: _TaskArithmeticVariant) -> MethodFunction:
    """Build a task-vector method: sparsify each ``x_i - base``, optionally elect signs, sum
    with weights, optionally normalize by the (agreeing) weights, scale by lambda, add base."""

    def merge(tensors, base, model_params, params, rng) -> Tensor:
        weights = [float(p["weight"]) for p in model_params]
        lam = float(params["lambda"])
        normalize = bool(params["normalize"])
        if variant.sparsify is None and not variant.sign_consensus:
            return _task_vector_sum(tensors, base, weights, lam, normalize)
        rescale = bool(params["rescale"])
        weighted_deltas = []
        for index, (tensor, model) in enumerate(zip(tensors, model_params)):
            delta = _sparsify(torch.sub(tensor, base), variant, model, rescale,
                              lambda index=index: rng(index))
            weighted_deltas.append(delta.mul_(weights[index]))
        if variant.sign_consensus:
            merged, divisor = _elect_and_merge(weighted_deltas, weights)
            divisor[divisor == 0] = 1.0
        else:
            merged = weighted_deltas[0]
            for delta in weighted_deltas[1:]:
                merged.add_(delta)
            total = sum(weights)
            divisor = total if abs(total) > _TINY else 1.0
        if normalize:
            merged.div_(divisor)
        return merged.mul_(lam).add_(base)

    return merge


task_arithmetic_merge = _generalized_task_arithmetic(_TaskArithmeticVariant(None, False))
ties_merge = _generalized_task_arithmetic(_TaskArithmeticVariant("magnitude", True))
dare_linear_merge = _generalized_task_arithmetic(_TaskArithmeticVariant("random", False))
dare_ties_merge = _generalized_task_arithmetic(_TaskArithmeticVariant("random", True))
breadcrumbs_merge = _generalized_task_arithmetic(_TaskArithmeticVariant("outliers", False))
breadcrumbs_ties_merge = _generalized_task_arithmetic(_TaskArithmeticVariant("outliers", True))
della_merge = _generalized_task_arithmetic(_TaskArithmeticVariant("magnitude_rank", True))
della_linear_merge = _generalized_task_arithmetic(_TaskArithmeticVariant("magnitude_rank", False))


def _lerp(v0: Tensor, v1: Tensor, t: float) -> Tensor:
    return torch.mul(v0, 1.0 - t).add_(v1, alpha=t)


def slerp_merge(tensors, base, model_params, params, rng) -> Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1), on the angle
    between the flattened tensors; linear interpolation when they are nearly colinear."""
    t = float(params["t"])
    v0, v1 = base, tensors[0]
    norm0 = float(torch.linalg.vector_norm(v0.float()))
    norm1 = float(torch.linalg.vector_norm(v1.float()))
    if norm0 < _TINY or norm1 < _TINY:
        return _lerp(v0, v1, t)
    dot = float(torch.sum(v0.double() * v1.double())) / (norm0 * norm1)
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return _lerp(v0, v1, t)
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    scale0 = math.sin((1.0 - t) * theta) / sin_theta
    scale1 = math.sin(t * theta) / sin_theta
    return torch.mul(v0, scale0).add_(v1, alpha=scale1)


def model_stock_ratio(cosine: float, num_models: int) -> float:
    """Model Stock's interpolation ratio ``t = N cos / (1 + (N - 1) cos)``."""
    denominator = 1.0 + (num_models - 1) * cosine
    if abs(denominator) < _TINY:
        return 0.0
    return num_models * cosine / denominator


def model_stock_merge(tensors, base, model_params, params, rng) -> Tensor:
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
    average = torch.mul(tensors[0], 1.0 / len(tensors))
    for tensor in tensors[1:]:
        average.add_(tensor, alpha=1.0 / len(tensors))
    return average.mul_(ratio).add_(base, alpha=1.0 - ratio)


# --------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, what it needs and the defaults of its parameters.

    ``model_defaults`` and ``method_defaults`` map parameter names to defaults; a None default
    means the parameter is required.
    """

    name: str
    function: MethodFunction
    uses_base: bool
    model_defaults: dict[str, Any] = field(default_factory=dict)
    method_defaults: dict[str, Any] = field(default_factory=dict)
    min_models: int = 1
    max_models: int | None = None
    random: bool = False


def _task_method(name, function, normalize, rescale=False, extra=None, random=False):
    model_defaults = {"weight": 1.0, "density": 1.0, **(extra or {})}
    method_defaults = {"lambda": 1.0, "normalize": normalize, "rescale": rescale}
    return MergeMethod(name, function, True, model_defaults, method_defaults, random=random)


MERGE_METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in [
        MergeMethod("linear", linear_merge, False, {"weight": 1.0}, {"normalize": True}),
        _task_method("task_arithmetic", task_arithmetic_merge, normalize=False),
        _task_method("ties", ties_merge, normalize=True),
        _task_method("dare_linear", dare_linear_merge, False, rescale=True, random=True),
        _task_method("dare_ties", dare_ties_merge, False, rescale=True, random=True),
        _task_method("breadcrumbs", breadcrumbs_merge, False, extra={"gamma": 0.01}),
        _task_method("breadcrumbs_ties", breadcrumbs_ties_merge, False, extra={"gamma": 0.01}),
        _task_method("della", della_merge, True, True, {"epsilon": 0.15}, random=True),
        _task_method("della_linear", della_linear_merge, False, True, {"epsilon": 0.15}, random=True),
        MergeMethod("slerp", slerp_merge, True, {}, {"t": None}, min_models=1, max_models=1),
        MergeMethod("model_stock", model_stock_merge, True, {}, {}, min_models=2),
    ]
}


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; MergeflowError naming it when unknown."""
    try:
        return MERGE_METHODS[name]
    except KeyError:
        known = ", ".join(sorted(MERGE_METHODS))
        raise MergeflowError(f"unknown merge method {name!r}; known methods: {known}") from None
