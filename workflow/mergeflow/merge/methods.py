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
- ``ws``: a ``Workspace`` giving scratch tensors (default: fresh allocations);
  ``out``: an optional tensor to write the result into (same shape and dtype).
- ``trims`` (magnitude-trimming methods only): the per-model ``Trim`` of the whole tensor,
  given when the call merges one block of it (``plan.merge_tensor_blocks``); None, computed
  from ``tensors``.

Source tensors are never modified. The same operations run whether or not ``ws`` caches and
whether or not ``out`` is given, so results are bitwise identical either way.

Semantics and defaults follow the published methods and mergekit's choices where mergekit has
the method; see ``MERGE_METHODS`` for the defaults of each.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy
import torch
from torch import Tensor

from mergeflow.errors import MergeflowError, RecipeError

RngFactory = Callable[[int], torch.Generator]
MethodFunction = Callable[..., Tensor]

# Below this |cos| SLERP interpolates on the great circle; above it the vectors are nearly
# colinear, sin(theta) is tiny and plain linear interpolation is the stable answer.
SLERP_DOT_THRESHOLD = 0.9995
_TINY = 1e-8
# Above this many entries the magnitude threshold is found from a sample-bracketed band
# instead of a full selection (kthvalue over tens of millions of entries is slow on CPU).
_EXACT_SELECTION_LIMIT = 1 << 18
_SAMPLE_SIZE = 1 << 16


class Workspace:
    """Scratch tensors for the methods, by slot name.

    The default allocates fresh tensors. With ``cache=True`` (the in-memory merger) a buffer
    per (slot, shape, dtype, device) is kept and reused across tensors and merges: fresh
    allocations of large tensors cost a page fault per 4 KiB, more than the arithmetic.
    """

    def __init__(self, cache: bool = False, sort_cache: bool = True):
        self.cache = cache
        self.sort_cache = cache and sort_cache
        self._buffers: dict[tuple, Tensor] = {}
        self._sorted: dict[tuple, Tensor] = {}

    def empty(self, slot: str, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or like.dtype
        if not self.cache:
            return torch.empty(like.shape, dtype=dtype, device=like.device)
        key = (slot, tuple(like.shape), dtype, like.device)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.empty(like.shape, dtype=dtype, device=like.device)
        return buffer

    def ones(self, like: Tensor) -> Tensor:
        """A tensor of ones shaped like ``like`` (filled once when cached)."""
        key = ("ones", tuple(like.shape), like.dtype, like.device)
        if self.cache and key in self._buffers:
            return self._buffers[key]
        buffer = self.empty("ones", like).fill_(1.0)
        return buffer

    def trim(self, magnitudes: Callable[[], Tensor], keep: int, key: tuple | None,
             tie_break: str = "index") -> "Trim":
        """The ``Trim`` keeping the ``keep`` largest of ``magnitudes()`` (flat float32). A
        caching workspace given the ``key`` of a (model, base) tensor pair sorts that task
        vector's magnitudes once and then answers any ``keep`` by lookup: the search varies
        densities, never the task vectors. That costs one float32 copy of each task vector
        trimmed (``sort_cache=False`` to save it). ``tie_break``: see :func:`_exact_trim`."""
        if not self.sort_cache or key is None:
            return magnitude_trim(magnitudes(), keep, tie_break)
        ordered = self._sorted.get(key)
        if ordered is None:
            ordered = self._sorted[key] = magnitudes().sort().values
        total = ordered.numel()
        cut = ordered[total - keep:total - keep + 1]
        left = int(torch.searchsorted(ordered, cut))
        right = int(torch.searchsorted(ordered, cut, right=True))
        threshold = float(cut)
        return _exact_trim(threshold, total - right, right - left, keep, magnitudes, tie_break)


def _destination(out: Tensor | None, ws: Workspace, like: Tensor) -> Tensor:
    return out if out is not None else ws.empty("result", like)


# --------------------------------------------------------------------------------------------
# Sparsification of task vectors (in place where possible)


def _kth_largest(values: Tensor, k: int) -> float:
    return float(torch.kthvalue(values, values.numel() - k + 1).values)


# Passes over large magnitude tensors go chunk by chunk: a mask of the whole tensor would be
# the largest allocation of a streaming merge.
_SCAN_CHUNK = 1 << 20


def _chunks(values):
    """Runs of ``values`` (a flat tensor or NumPy array)."""
    for start in range(0, len(values), _SCAN_CHUNK):
        yield values[start:start + _SCAN_CHUNK]


def _count(values, compare: Callable) -> int:
    """How many entries of ``values`` (a flat tensor or NumPy array) ``compare`` holds for."""
    nonzero = numpy.count_nonzero if isinstance(values, numpy.ndarray) else torch.count_nonzero
    return sum(int(nonzero(compare(chunk))) for chunk in _chunks(values))


def kth_largest(magnitudes: Tensor, k: int) -> float:
    """The exact ``k``-th largest entry of a flat float32 tensor."""
    return select_largest(magnitudes, k)[0]


def select_largest(magnitudes: Tensor, k: int) -> tuple[float, int, int]:
    """The exact ``k``-th largest entry of a flat float32 tensor, the number of entries above
    it and the number equal to it.

    For large tensors: the quantile is bracketed from an evenly strided sample, entries above
    the bracket are counted, and only the entries inside it go through ``kthvalue`` and the
    counts; when the bracket misses (adversarial layouts) it falls back to the full selection.
    On CPU the passes over the tensor run in NumPy, whose comparisons and boolean selection
    take about a third of torch's time there.
    """
    total = magnitudes.numel()
    if total > _EXACT_SELECTION_LIMIT:
        sample = magnitudes[:: total // _SAMPLE_SIZE]
        size = sample.numel()
        below = size * (1.0 - k / total)  # sample rank of the target
        margin = 6.0 * math.sqrt(max(below * (1.0 - below / size), 1.0)) + 8.0
        ranks = (max(int(below - margin), 0), min(int(below + margin), size - 1))
        # two order statistics of the sample: a partition, not a sort
        low, high = (float(v) for v in numpy.partition(sample.cpu().numpy(), ranks)[list(ranks)])
        values = magnitudes.numpy() if magnitudes.device.type == "cpu" else magnitudes
        above = _count(values, lambda chunk: chunk > high)
        if above < k:
            parts = [c[(c >= low) & (c <= high)] for c in _chunks(values)]
            band = torch.from_numpy(numpy.concatenate(parts)) if isinstance(values, numpy.ndarray) else torch.cat(parts)
            if k - above <= band.numel():
                threshold = _kth_largest(band, k - above)
                return (threshold, above + int(torch.count_nonzero(band > threshold)),
                        int(torch.count_nonzero(band == threshold)))
    threshold = _kth_largest(magnitudes, k)
    return (threshold, _count(magnitudes, lambda chunk: chunk > threshold),
            _count(magnitudes, lambda chunk: chunk == threshold))


def keep_count(density: float, numel: int) -> int:
    """Entries a magnitude trim keeps: ``int(density * n)``, at least one of a non-empty
    tensor (mergekit's rounding)."""
    return max(1, int(density * numel)) if numel > 0 else 0


@dataclass(frozen=True)
class Trim:
    """The entries a magnitude trim keeps: those with ``|x| >= threshold``; when entries tied
    at the threshold straddle the cut, those with ``|x| > threshold`` and, of the tied ones,
    only those at the sorted flat indices ``tied``."""

    threshold: float
    tied: Tensor | None = None

    def block(self, start: int, stop: int) -> "Trim":
        """This trim for the flat entries ``[start, stop)`` of the tensor, indexed from 0."""
        if self.tied is None:
            return self
        low, high = torch.searchsorted(self.tied, torch.tensor([start, stop], device=self.tied.device)).tolist()
        return Trim(self.threshold, self.tied[low:high] - start)


TIE_BREAKS = ("index", "argsort")
"""How a TIES trim picks among entries tied in magnitude at its cut (the ``tie_break`` parameter)."""


def _exact_trim(threshold: float, above: int, tied: int, keep: int,
                magnitudes: Callable[[], Tensor], tie_break: str = "index") -> Trim:
    """The trim keeping exactly ``keep`` entries, given the ``keep``-th largest magnitude and
    the counts of entries above and at it. Of the entries tied at the cut, ``tie_break``
    ``index`` keeps the first by flat index (the order of a stable descending sort);
    ``argsort`` keeps those mergekit keeps: the first in torch's unstable descending
    ``argsort`` of the magnitudes, an order with no rule short of that sort of the whole tensor
    (deterministic for one torch build and device, and most of a TIES merge's time when it runs,
    so it runs only where ties straddle the cut). Zeros are never chosen among: kept or not, a
    zero delta adds nothing."""
    if above + tied == keep or threshold <= 0.0:
        return Trim(threshold)
    if tie_break == "argsort":
        # a descending sort puts the ``above`` larger entries first, then the tied ones
        ranked = torch.argsort(magnitudes(), descending=True)[above:keep]
        return Trim(threshold, torch.sort(ranked).values)
    at_cut, needed = [], keep - above
    for number, chunk in enumerate(_chunks(magnitudes())):
        if needed <= 0:
            break
        found = torch.nonzero(chunk == threshold).reshape(-1)[:needed]
        at_cut.append(found + number * _SCAN_CHUNK)
        needed -= found.numel()
    return Trim(threshold, torch.cat(at_cut))


def magnitude_trim(magnitudes: Tensor, keep: int, tie_break: str = "index") -> Trim:
    """The ``Trim`` keeping the ``keep`` largest of a flat float32 tensor of magnitudes."""
    return _exact_trim(*select_largest(magnitudes, keep), keep, lambda: magnitudes, tie_break)


def apply_trim(delta: Tensor, trim: Trim | None, ws: Workspace) -> Tensor:
    """Zero, in place, the entries of ``delta`` (flat or not) that ``trim`` drops; None drops all."""
    if trim is None:
        return delta.zero_()
    if trim.tied is None:
        return shrink_below(delta, trim.threshold, ws)
    flat = delta.view(-1)
    kept = flat[trim.tied]
    above = (_float32_away_from_zero(trim.threshold) if delta.dtype == torch.float32 else
             float(torch.nextafter(torch.tensor(trim.threshold, dtype=delta.dtype),
                                   torch.tensor(math.inf, dtype=delta.dtype))))
    shrink_below(delta, above, ws)
    flat[trim.tied] = kept
    return delta


def shrink_below(delta: Tensor, threshold: float, ws: Workspace) -> Tensor:
    """Zero the entries with ``|x| < threshold`` in place."""
    if threshold <= 0.0:
        return delta  # every entry is at or above a zero threshold
    if delta.dtype == torch.float32:
        # |x| >= threshold  <=>  |x| > the next float below it; hardshrink does that test in
        # one float pass (bool masks multiplied into floats are several times slower on CPU).
        return torch.ops.aten.hardshrink.out(delta, _float32_toward_zero(threshold), out=delta)
    magnitudes = torch.abs(delta, out=ws.empty("magnitude", delta))
    return delta.mul_(torch.ge(magnitudes, threshold, out=ws.empty("keep", delta, torch.bool)))


@functools.lru_cache(maxsize=64)
def _float32_toward_zero(value: float) -> float:
    """The float32 next to ``value`` towards zero (cached: called per block with few values)."""
    return float(numpy.nextafter(numpy.float32(value), numpy.float32(0.0)))


@functools.lru_cache(maxsize=64)
def _float32_away_from_zero(value: float) -> float:
    return float(numpy.nextafter(numpy.float32(value), numpy.float32(math.inf)))


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
    order = torch.argsort(rows.abs().float(), dim=1)
    # the rank of each entry: the inverse permutation of the sort order, by a scatter (a
    # second argsort would give the same, at the cost of another sort)
    positions = torch.arange(columns, device=rows.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions).to(rows.dtype)
    rank_fraction = ranks / (columns - 1) if columns > 1 else torch.full_like(ranks, 0.5)
    keep_probability = (density - epsilon + 2.0 * epsilon * rank_fraction).clamp_(_TINY, 1.0)
    keep = torch.rand(rows.shape, generator=generator, device=rows.device) < keep_probability
    result = rows * keep
    if rescale:
        result = result / keep_probability
    return result.reshape(delta.shape)


# --------------------------------------------------------------------------------------------
# Methods


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


@dataclass(frozen=True)
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


def magnitude_trims(model_params, numel: int, magnitudes: Callable[[int], Tensor], ws: Workspace,
                    keys: list[tuple] | None = None, tie_break: str = "index") -> list[Trim | None]:
    """Per model, the ``Trim`` of the TIES magnitude trim over the whole tensor (None when
    nothing is kept). ``magnitudes(i)``: model ``i``'s flat float32 |task vector|, called only
    when needed; ``keys``: per model, the key under which a caching workspace keeps it sorted;
    ``tie_break``: see :func:`_exact_trim`."""
    trims: list[Trim | None] = []
    for index, model in enumerate(model_params):
        density = float(model["density"])
        keep = keep_count(density, numel)
        if density >= 1.0 or keep <= 0:
            trims.append(Trim(0.0) if keep > 0 else None)
            continue
        trims.append(ws.trim(lambda index=index: magnitudes(index), keep,
                             keys[index] if keys else None, tie_break))
    return trims


def _whole_tensor_trims(tensors, base, model_params, ws: Workspace, tie_break: str) -> list[Trim | None]:
    keys = [(t.data_ptr(), base.data_ptr(), tuple(base.shape), base.dtype) for t in tensors]
    return magnitude_trims(model_params, base.numel(),
                           lambda i: torch.sub(tensors[i], base).abs_().reshape(-1).float(), ws, keys,
                           tie_break)


def _generalized_task_arithmetic(variant: _TaskArithmeticVariant) -> MethodFunction:
    """Build a task-vector method: sparsify each ``x_i - base``, optionally elect signs, sum
    with weights, optionally normalize by the (agreeing) weights, scale by lambda, add base."""

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


task_arithmetic_merge = _generalized_task_arithmetic(_TaskArithmeticVariant(None, False))
ties_merge = _generalized_task_arithmetic(_TaskArithmeticVariant("magnitude", True))
dare_linear_merge = _generalized_task_arithmetic(_TaskArithmeticVariant("random", False))
dare_ties_merge = _generalized_task_arithmetic(_TaskArithmeticVariant("random", True))
breadcrumbs_merge = _generalized_task_arithmetic(_TaskArithmeticVariant("outliers", False))
breadcrumbs_ties_merge = _generalized_task_arithmetic(_TaskArithmeticVariant("outliers", True))
della_merge = _generalized_task_arithmetic(_TaskArithmeticVariant("magnitude_rank", True))
della_linear_merge = _generalized_task_arithmetic(_TaskArithmeticVariant("magnitude_rank", False))


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
    # How the streaming writer may split a large tensor: "flat" (any runs of entries: the
    # method is elementwise given its ``trims``), "rows" (whole rows) or None (whole tensor).
    blocks: str | None = None
    trims: bool = False  # takes ``trims``: whole-tensor magnitude trims


def _task_method(name, function, normalize, rescale=False, extra=None, random=False,
                 blocks=None, trims=False):
    model_defaults = {"weight": 1.0, "density": 1.0, **(extra or {})}
    method_defaults = {"lambda": 1.0, "normalize": normalize, "rescale": rescale,
                       **({"tie_break": "index"} if trims else {})}
    return MergeMethod(name, function, True, model_defaults, method_defaults, random=random,
                       blocks=blocks, trims=trims)


MERGE_METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in [
        MergeMethod("linear", linear_merge, False, {"weight": 1.0}, {"normalize": True}, blocks="flat"),
        _task_method("task_arithmetic", task_arithmetic_merge, normalize=False, blocks="flat"),
        _task_method("ties", ties_merge, normalize=True, blocks="flat", trims=True),
        _task_method("dare_linear", dare_linear_merge, False, rescale=True, random=True, blocks="flat"),
        _task_method("dare_ties", dare_ties_merge, False, rescale=True, random=True, blocks="flat"),
        _task_method("breadcrumbs", breadcrumbs_merge, False, extra={"gamma": 0.01}),
        _task_method("breadcrumbs_ties", breadcrumbs_ties_merge, False, extra={"gamma": 0.01}),
        _task_method("della", della_merge, True, True, {"epsilon": 0.15}, random=True, blocks="rows"),
        _task_method("della_linear", della_linear_merge, False, True, {"epsilon": 0.15}, random=True,
                     blocks="rows"),
        MergeMethod("slerp", slerp_merge, True, {}, {"t": None}, min_models=1, max_models=1),
        MergeMethod("model_stock", model_stock_merge, True, {}, {}, min_models=2),
    ]
}


PARAMETER_LEVELS = ("model", "method", "any")


def read_parameters(methods: list[str], level: str) -> set[str]:
    """The parameters any of ``methods`` reads at ``level``: ``model`` (per-model: weight,
    density, ...), ``method`` (lambda, normalize, t, ...) or ``any`` (both: a recipe's or
    slice's own ``parameters`` may give per-model defaults too)."""
    names: set[str] = set()
    for name in methods:
        method = get_method(name)
        if level in ("model", "any"):
            names |= set(method.model_defaults)
        if level in ("method", "any"):
            names |= set(method.method_defaults)
    return names


def check_parameter_names(keys, level: str, where: str, methods: list[str] | None = None) -> None:
    """Raise ``RecipeError`` naming the first of ``keys`` that no method reads at ``level`` (see
    :func:`read_parameters`): a misspelt parameter would otherwise be ignored. ``methods``: the
    methods in play (a search space's: a gene none of them reads is refused); None, every
    registered method (a recipe: a slice may switch methods, as a per-group choice does)."""
    import difflib

    known = read_parameters(list(MERGE_METHODS) if methods is None else methods, level)
    scope = "no merge method" if methods is None else f"no merge method here ({', '.join(methods)})"
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise RecipeError(f"{where}: parameter {key!r} is read by {scope}; "
                              f"{'per-model ' if level == 'model' else ''}parameters "
                              f"{'merge methods' if methods is None else 'they'} read: "
                              f"{', '.join(sorted(known)) or 'none'}{hint}")


def get_method(name: str) -> MergeMethod:
    """The registered method called ``name``; MergeflowError naming it when unknown."""
    try:
        return MERGE_METHODS[name]
    except KeyError:
        known = ", ".join(sorted(MERGE_METHODS))
        raise MergeflowError(f"unknown merge method {name!r}; known methods: {known}") from None
