"""Sparsification kernels: which entries of a task vector a merge keeps, and dropping the rest.

Pure tensor functions for the task-vector methods (``methods``): TIES's exact
``int(density * n)`` magnitude trim (``keep_count``, ``select_largest``, ``magnitude_trim``,
the ``Trim`` it returns and ``apply_trim``), Model Breadcrumbs' outlier drop and DELLA's drop
by magnitude rank. A trim is found over the whole tensor and can then be applied block by
block (``Trim.block``), which is how a streaming merge reproduces the whole tensor's result.

``Workspace`` lives here, not with the methods: ``apply_trim`` and ``shrink_below`` take their
scratch tensors from it, and its cache of sorted magnitudes answers trims (``Workspace.trim``),
so the kernels need it and it needs them. The methods import it from here, which keeps the
imports one way: methods -> sparsify.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import numpy
import torch
from torch import Tensor

# Above this many entries the magnitude threshold is found from a sample-bracketed band
# instead of a full selection (kthvalue over tens of millions of entries is slow on CPU).
_EXACT_SELECTION_LIMIT = 1 << 18
_SAMPLE_SIZE = 1 << 16
# Passes over large magnitude tensors go chunk by chunk: a mask of the whole tensor would be
# the largest allocation of a streaming merge.
_SCAN_CHUNK = 1 << 20
# DELLA's keep probabilities are clipped to (0, 1]: a kept entry is rescaled by 1/probability.
_MIN_KEEP_PROBABILITY = 1e-8


class Workspace:
    """Scratch tensors for the methods and kernels, by slot name.

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


def _kth_largest(values: Tensor, k: int) -> float:
    return float(torch.kthvalue(values, values.numel() - k + 1).values)


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
    only those at the sorted flat indices ``tied``. ``scale``: the rescale of what it keeps
    (``rescale``: the L1 norm of the whole task vector over that of its kept entries)."""

    threshold: float
    tied: Tensor | None = None
    scale: float = 1.0

    def block(self, start: int, stop: int) -> "Trim":
        """This trim for the flat entries ``[start, stop)`` of the tensor, indexed from 0."""
        if self.tied is None:
            return self
        low, high = torch.searchsorted(self.tied, torch.tensor([start, stop], device=self.tied.device)).tolist()
        return Trim(self.threshold, self.tied[low:high] - start, self.scale)


TIE_BREAKS = ("index", "argsort")
"""How a magnitude trim picks among entries tied in magnitude at its cut (the ``tie_break``
parameter of TIES and Breadcrumbs): the first by flat index, or mergekit's sort order."""


def _exact_trim(threshold: float, above: int, tied: int, keep: int,
                magnitudes: Callable[[], Tensor], tie_break: str = "index") -> Trim:
    """The trim keeping exactly ``keep`` entries, given the ``keep``-th largest magnitude and
    the counts of entries above and at it. Of the entries tied at the cut, ``tie_break``
    ``index`` keeps the first by flat index (the order of a stable descending sort);
    ``argsort`` keeps those mergekit keeps: the first in torch's unstable descending
    ``argsort`` of the magnitudes, an order with no rule short of that sort of the whole tensor
    (deterministic for one torch build and device, and most of a TIES merge's time when it runs,
    so it runs only where ties straddle the cut); ``ascending`` those last in torch's ascending
    sort (mergekit's Breadcrumbs keeps a run of that order). Zeros are never chosen among: kept
    or not, a zero delta adds nothing."""
    if above + tied == keep or threshold <= 0.0:
        return Trim(threshold)
    if tie_break == "argsort":
        # a descending sort puts the ``above`` larger entries first, then the tied ones
        ranked = torch.argsort(magnitudes(), descending=True)[above:keep]
        return Trim(threshold, torch.sort(ranked).values)
    if tie_break == "ascending":
        # an ascending sort puts the tied entries just below the ``above`` larger ones
        values = magnitudes()
        ranked = torch.sort(values, descending=False).indices[values.numel() - keep:values.numel() - above]
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


@dataclass(frozen=True)
class OutlierTrim:
    """Model Breadcrumbs' cut of one task vector: the entries ``kept`` keeps (None: none) that
    ``outliers`` does not (None: no outliers); ``scale`` as ``Trim.scale``."""

    kept: Trim | None
    outliers: Trim | None
    scale: float = 1.0

    def block(self, start: int, stop: int) -> "OutlierTrim":
        """This cut for the flat entries ``[start, stop)`` of the tensor, indexed from 0."""
        return OutlierTrim(None if self.kept is None else self.kept.block(start, stop),
                           None if self.outliers is None else self.outliers.block(start, stop), self.scale)


def outlier_trims(density: float, gamma: float, numel: int, magnitudes: Callable[[], Tensor],
                  ws: Workspace, key: tuple | None = None, tie_break: str = "index") -> OutlierTrim | None:
    """Model Breadcrumbs: drop the top ``gamma`` fraction by magnitude (outliers) and the
    smallest entries, keeping ``int(density * n)`` entries in between (with ``gamma + density``
    above 1, fewer outliers); None with density 1 (nothing dropped). Of entries tied in
    magnitude at a cut, ``tie_break`` ``index`` counts those first by flat index as larger;
    ``argsort`` keeps mergekit's run of torch's ascending sort. ``magnitudes()``: the flat
    float32 |task vector| (called at most once)."""
    if density >= 1.0:
        return None
    keep = int(numel * density)
    n_top = int(numel * gamma)
    n_bottom = numel - keep - n_top
    if n_bottom < 0:  # gamma + density > 1: keep the density, drop fewer outliers
        n_bottom, n_top = 0, numel - keep
    values = functools.cache(magnitudes)
    order = "ascending" if tie_break == "argsort" else tie_break
    kept = None if keep == 0 else Trim(0.0) if n_bottom == 0 else ws.trim(values, numel - n_bottom, key, order)
    outliers = None if n_top == 0 or kept is None else ws.trim(values, n_top, key, order)
    return OutlierTrim(kept, outliers)


def drop_outliers(delta: Tensor, trim: OutlierTrim | None, ws: Workspace) -> Tensor:
    """Zero, in place, the entries of ``delta`` that a Breadcrumbs cut drops (None: none)."""
    if trim is None:
        return delta
    apply_trim(delta, trim.kept, ws)
    if trim.outliers is not None:
        # the outliers alone, subtracted: x - x is exactly 0, x - 0 is x
        delta.sub_(apply_trim(ws.empty("outliers", delta).copy_(delta), trim.outliers, ws))
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
    keep_probability = (density - epsilon + 2.0 * epsilon * rank_fraction).clamp_(_MIN_KEEP_PROBABILITY, 1.0)
    keep = torch.rand(rows.shape, generator=generator, device=rows.device) < keep_probability
    result = rows * keep
    if rescale:
        result = result / keep_probability
    return result.reshape(delta.shape)
