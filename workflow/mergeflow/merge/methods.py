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
- ``prepared`` (methods with a ``prepare`` function in the registry only): the method's
  whole-tensor quantities (trims, angles, weights) from ``prepare(passes, shape, model_params,
  params)``, given when the call merges one block of the tensor (``plan.merge_tensor_blocks``)
  that starts at flat entry ``offset``; None, computed from ``tensors`` (see ``passes``).

The task-vector methods also give their ``masked`` terms (same arguments, no ``out``): the merge
with every mask held as this call makes it, smooth in the weights and lambda, and its
derivatives in them (:class:`MaskedTerms`: what the gradient search follows).

Source tensors are never modified. The same operations run whether or not ``ws`` caches and
whether or not ``out`` is given, so results are bitwise identical either way.

Semantics and defaults follow the published methods and mergekit's choices where mergekit has
the method; ``registry.MERGE_METHODS`` declares each one's parameters and defaults.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from mergeflow.errors import MergeflowError
from mergeflow.merge.passes import (
    CPU_BLOCK, BlockPass, chunks, fill_flat, gram, norm, one_cpu_thread, quadratic, whole_tensor_pass,
)
from mergeflow.merge.sparsify import (
    Trim, Workspace, apply_trim, drop_by_magnitude_rank, drop_outliers, kth_largest, magnitude_trim, magnitude_trims,
    outlier_trims,
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




def _elected(deltas: list[Tensor], scales: list[float], ws: Workspace, like: Tensor) -> Tensor:
    """TIES's elected sign per entry (+-1): the sign of ``sum(scales[i] * deltas[i])``, zero
    counting as positive (in ``ws``'s ``total`` slot)."""
    total = torch.mul(deltas[0], scales[0], out=ws.empty("total", like))
    for delta, scale in zip(deltas[1:], scales[1:]):
        total.add_(delta, alpha=scale)
    # copysign gives +1 for +0.0; a -0.0 total only arises when every delta is zero there
    return torch.copysign(ws.ones(like), total, out=total)


def _elect_and_merge(deltas: list[Tensor], scales: list[float], weights: list[float],
                     normalize: bool, ws: Workspace, result: Tensor) -> Tensor:
    """TIES sign election and disjoint merge of ``scales[i] * deltas[i]`` (scales >= 0), into
    ``result``: per entry the sign of the scaled sum wins (zero counts as positive); only
    deltas agreeing with it contribute, and with ``normalize`` their sum is divided by the sum
    of the ``weights`` of the agreeing ones (the disjoint mean).

    Float-only formulation (bool masks are slow on CPU): with ``s = +-1`` the elected sign,
    a delta agrees iff ``delta * s > 0``, so ``sum of agreeing = s * sum(c_i relu(delta_i s))``.
    """
    elected = _elected(deltas, scales, ws, result)
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
        """Whether the merge can run block by block (given its whole-tensor trims)."""
        return self.sparsify in (None, "magnitude", "random", "outliers")

    @property
    def trimmed(self) -> bool:
        """Whether the merge needs whole-tensor magnitude trims (``prepared``)."""
        return self.sparsify in ("magnitude", "outliers")


def _sparsify_block(delta: Tensor, variant: _TaskArithmeticVariant, model: dict,
                    trim, rescale: bool, generator: torch.Generator | None,
                    ws: Workspace) -> Tensor:
    """Sparsify one task vector (block) in place; DARE's and Breadcrumbs' rescales are left to
    the caller's scale."""
    density = float(model["density"])
    if density >= 1.0:
        return delta
    if variant.sparsify == "magnitude":
        return apply_trim(delta, trim, ws)
    if variant.sparsify == "outliers":
        return drop_outliers(delta, trim, ws)
    if variant.sparsify == "random":
        draws = torch.rand(delta.shape, generator=generator, out=ws.empty("random", delta))
        # a 0/1 float mask: a comparison into a float output and a float product are fast on
        # CPU, a bool mask multiplied into floats is not
        return delta.mul_(torch.lt(draws, density, out=draws))
    if variant.sparsify == "magnitude_rank":
        return drop_by_magnitude_rank(delta, density, float(model["epsilon"]), rescale, generator)
    return delta


def _kept_scale(weight: float, model: dict, variant: _TaskArithmeticVariant, trim, rescale: bool) -> float:
    """A model's scale on its sparsified task vector: its weight with DARE's ``1/density`` or
    the trim's L1 rescale (``rescale``; DELLA's rescale is in the entries themselves)."""
    scale = weight
    density = float(model["density"])
    if rescale and density < 1.0:
        if variant.sparsify == "random":
            scale /= density
        elif variant.trimmed and trim is not None:
            scale *= trim.scale
    return scale


def _scaled_deltas(tensors, base, model_params, variant, params, trims, generators,
                   ws: Workspace) -> tuple[list[Tensor], list[float]]:
    """Each model's sparsified task vector of one block (in ``ws``) and its scale, both as the
    merge sums them: a negative scale is folded into its vector (the election needs
    non-negative scales)."""
    rescale = bool(params["rescale"])
    deltas, scales = [], []
    for index, (tensor, model) in enumerate(zip(tensors, model_params)):
        delta = torch.sub(tensor, base, out=ws.empty(f"delta{index}", base))
        delta = _sparsify_block(delta, variant, model, trims[index], rescale,
                                generators[index], ws)
        scale = _kept_scale(float(model["weight"]), model, variant, trims[index], rescale)
        if scale < 0.0:  # the election below needs non-negative scales
            delta.mul_(scale)
            scale = 1.0
        deltas.append(delta)
        scales.append(scale)
    return deltas, scales


def _merge_block(tensors, base, model_params, variant, params, trims, generators,
                 ws: Workspace, result: Tensor) -> Tensor:
    """The task-vector merge of one block (or a whole tensor), into ``result``."""
    weights = [float(p["weight"]) for p in model_params]
    normalize = bool(params["normalize"])
    deltas, scales = _scaled_deltas(tensors, base, model_params, variant, params, trims, generators, ws)
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


def smooth_parameters(model_params: list[dict], params: dict) -> tuple[list[float], float]:
    """What a task-vector merge is smooth in once its masks are held (:class:`MaskedTerms`): each
    model's ``weight``, and ``lambda``."""
    return [float(p["weight"]) for p in model_params], float(params["lambda"])


# The parameters :func:`smooth_parameters` reads, per level: the only ones a gradient may move.
SMOOTH_PARAMETERS = {"model": ("weight",), "method": ("lambda",)}


@dataclass
class MaskedTerms:
    """A task-vector merge of one tensor with its masks held as the merge at ``weights`` and
    ``lam`` makes them: the entries each model's sparsification keeps (trims, seeded drops and
    their rescales, which depend on densities and seeds, never on weights) and, under sign
    consensus, the elected sign (which does depend on the weights). Held, the merge is smooth in
    the weights w and lambda (AdaMerging++'s move):

        θ(w, λ) = base + λ Σ_k w_k u_k / D(w),

    ``vectors`` u_k: each model's kept task vector with its rescale, zero where it disagrees with
    the elected sign; D = Σ_k w_k a_k under ``normalize`` (``agree`` a_k: 1 where the model agrees
    with the elected sign; 1 everywhere without sign consensus, ``agree`` None), and 1 where that is
    0 (or, without sign consensus, below 1e-8 in magnitude), as the merge divides; D = 1 without
    ``normalize``."""

    base: Tensor
    vectors: list[Tensor]
    agree: list[Tensor] | None
    normalize: bool
    weights: list[float]
    lam: float

    def _divisor(self, weights: list[float]) -> tuple[Tensor | float, Tensor | float]:
        """D(w), and 1 where the merge divides by it (0 where it does not)."""
        if not self.normalize:
            return 1.0, 0.0
        if self.agree is None:
            total = sum(weights)
            return (total, 1.0) if abs(total) > _TINY else (1.0, 0.0)
        total = torch.zeros_like(self.base)
        for agree, weight in zip(self.agree, weights):
            total.add_(agree, alpha=weight)
        unused = torch.eq(total, 0.0).to(total.dtype)
        return total.add_(unused), 1.0 - unused

    def _mean(self, weights: list[float]) -> tuple[Tensor, Tensor | float, Tensor | float]:
        """Σ_k w_k u_k / D(w), D(w) as the merge divides by it, and 1 where it does (0 where not)."""
        summed = torch.zeros_like(self.base)
        for vector, weight in zip(self.vectors, weights):
            summed.add_(vector, alpha=weight)
        divisor, divides = self._divisor(weights)
        return summed.div_(divisor), divisor, divides

    def at(self, weights: list[float] | None = None, lam: float | None = None) -> Tensor:
        """θ at other weights and lambda (default: the held ones), the masks held."""
        weights = self.weights if weights is None else weights
        lam = self.lam if lam is None else lam
        return torch.add(self.base, self._mean(weights)[0], alpha=lam)

    def slopes(self) -> tuple[list[Tensor], Tensor]:
        """∂θ/∂w_k per model and ∂θ/∂λ at the held weights and lambda: λ (u_k − a_k Σ_i w_i u_i / D) / D
        where the merge divides by D, else λ u_k; and Σ_i w_i u_i / D (so θ itself is base + λ ∂θ/∂λ)."""
        mean, divisor, divides = self._mean(self.weights)
        pulled = mean * divides  # what D's own change takes back, per unit of a_k
        slopes = []
        for index, vector in enumerate(self.vectors):
            agree = 1.0 if self.agree is None else self.agree[index]
            slopes.append((vector - pulled * agree).div_(divisor).mul_(self.lam))
        return slopes, mean


def _masked_block(tensors, base, model_params, variant, params, trims, generators, ws: Workspace,
                  vectors: list[Tensor], agree: list[Tensor] | None) -> None:
    """One block's :class:`MaskedTerms` ``vectors`` and ``agree``, written into them, from the
    sparsified task vectors and the elected sign exactly as :func:`_merge_block` computes them."""
    deltas, scales = _scaled_deltas(tensors, base, model_params, variant, params, trims, generators, ws)
    elected = _elected(deltas, scales, ws, base) if variant.sign_consensus else None
    rescale = bool(params["rescale"])
    for index, (delta, model) in enumerate(zip(deltas, model_params)):
        weight = float(model["weight"])
        factor = _kept_scale(1.0, model, variant, trims[index], rescale)
        scale = _kept_scale(weight, model, variant, trims[index], rescale)
        if scale < 0.0:  # unfold the scale folded into the vector
            factor /= scale
        torch.mul(delta, factor, out=vectors[index])
        if elected is not None:
            # the merge's test: the (folded) vector times the elected sign is positive
            agrees = torch.gt(torch.mul(delta, elected, out=ws.empty("agreeing", base)), 0.0).to(base.dtype)
            vectors[index].mul_(agrees)
            if agree is not None:
                agree[index].copy_(agrees)


def _trims(variant: _TaskArithmeticVariant, model_params, params, numel: int, passes: BlockPass,
           magnitudes: Callable[[int], Tensor], ws: Workspace, keys: list[tuple] | None = None) -> list:
    """Per model, the whole-tensor trim of its task vector: TIES's ``Trim`` or Breadcrumbs'
    ``OutlierTrim`` (see ``sparsify.outlier_trims``); ``magnitudes(i)``: model ``i``'s flat float32
    |task vector|. With ``rescale``, each with mergekit's rescale (:func:`_l1_rescaled`)."""
    if variant.sparsify == "magnitude":
        trims = magnitude_trims(model_params, numel, magnitudes, ws, keys, params["tie_break"])
    else:
        trims = [outlier_trims(float(model["density"]), float(model["gamma"]), numel,
                               lambda index=index: magnitudes(index), ws, keys[index] if keys else None,
                               params["tie_break"])
                 for index, model in enumerate(model_params)]
    return _l1_rescaled(trims, passes) if params["rescale"] else trims


def _l1_rescaled(trims: list, passes: BlockPass) -> list:
    """The trims with mergekit's rescale: a kept task vector scaled to the L1 norm of the whole
    (none where either norm is below 1e-7); sums of float64 per ``CPU_BLOCK`` run."""
    rescaled = []
    scratch = Workspace()
    for index, trim in enumerate(trims):
        if trim is None:
            rescaled.append(trim)
            continue
        sums = None
        for offset, blocks, base in passes([index]):
            for start, (run_base, run) in chunks(base, blocks[0]):
                delta = run - run_base
                whole = delta.abs().sum(dtype=torch.float64)
                cut = trim.block(offset + start, offset + start + delta.numel())
                kept = (apply_trim(delta, cut, scratch) if isinstance(cut, Trim) else drop_outliers(delta, cut, scratch))
                pair = torch.stack([whole, kept.abs().sum(dtype=torch.float64)])
                sums = pair if sums is None else sums.add_(pair)
        before, after = sums.tolist()
        rescaled.append(replace(trim, scale=1.0 if before < 1e-7 or after < 1e-7 else before / after))
    return rescaled


def _generalized_task_arithmetic(*, sparsify: str | None,
                                  sign_consensus: bool) -> tuple[MethodFunction, Callable, Callable]:
    """Build a task-vector method and its ``prepare``: sparsify each ``x_i - base`` (see
    ``_TaskArithmeticVariant``), optionally elect signs, sum with weights, optionally normalize
    by the (agreeing) weights, scale by lambda, add base."""
    variant = _TaskArithmeticVariant(sparsify=sparsify, sign_consensus=sign_consensus)

    def prepare(passes: BlockPass, shape, model_params, params) -> list | None:
        """The whole tensor's trims, one model's magnitudes at a time in a float32 buffer."""
        if not variant.trimmed:
            return None
        numel = math.prod(shape)
        buffer: list[Tensor] = []

        def magnitudes(index: int) -> Tensor:
            def fill(blocks, base, out):
                # as the whole-tensor trim: the difference in the compute dtype, then float32
                if blocks[0].dtype == torch.float32:
                    torch.sub(blocks[0], base, out=out).abs_()
                else:
                    out.copy_(torch.sub(blocks[0], base).abs_())
            buffer[:] = [fill_flat(passes, numel, fill, [index], out=buffer[0] if buffer else None)]
            return buffer[0]

        return _trims(variant, model_params, params, numel, passes, magnitudes, Workspace())

    def blocks(tensors, base, model_params, params, outputs: list[Tensor], prepared, offset: int, ws: Workspace):
        """The blocks the merge runs on: (sources, base, outputs, trims) of the whole tensor, or
        of each ``CPU_BLOCK`` run of its flat entries (CPU, elementwise, large)."""
        if prepared is None and variant.trimmed:
            keys = [(t.data_ptr(), base.data_ptr(), tuple(base.shape), base.dtype) for t in tensors]
            prepared = _trims(variant, model_params, params, base.numel(),
                              whole_tensor_pass(tensors, base),
                              lambda i: torch.sub(tensors[i], base).abs_().reshape(-1).float(), ws, keys)
        trims = prepared or [None] * len(tensors)
        if not variant.elementwise or base.device.type != "cpu" or base.numel() <= CPU_BLOCK:
            yield tensors, base, outputs, [None if t is None else t.block(offset, offset + base.numel()) for t in trims]
            return
        flat_sources = [t.reshape(-1) for t in tensors]
        flat_base, flat_outputs = base.reshape(-1), [o.view(-1) for o in outputs]
        for start in range(0, base.numel(), CPU_BLOCK):
            block = slice(start, start + CPU_BLOCK)
            yield ([t[block] for t in flat_sources], flat_base[block], [o[block] for o in flat_outputs],
                   [None if t is None else t.block(offset + start, offset + start + CPU_BLOCK) for t in trims])

    def generators(rng, count: int) -> list:
        random = variant.sparsify in ("random", "magnitude_rank")
        return [rng(i) if random else None for i in range(count)]

    def merge(tensors, base, model_params, params, rng, ws=None, out=None, prepared=None, offset=0) -> Tensor:
        ws = ws or Workspace()
        result = _destination(out, ws, base)
        if variant.sparsify is None and not variant.sign_consensus:
            weights = [float(p["weight"]) for p in model_params]
            return _task_vector_sum(tensors, base, weights, float(params["lambda"]),
                                    bool(params["normalize"]), result)
        draws = generators(rng, len(tensors))
        for sources, block_base, (block_result,), trims in blocks(tensors, base, model_params, params, [result],
                                                                 prepared, offset, ws):
            _merge_block(sources, block_base, model_params, variant, params, trims, draws, ws, block_result)
        return result

    def masked(tensors, base, model_params, params, rng, ws=None, prepared=None, offset=0) -> MaskedTerms:
        """The merge's :class:`MaskedTerms`: its masks, as ``merge`` with these arguments makes them."""
        ws = ws or Workspace()
        count = len(tensors)
        vectors = [torch.empty_like(base) for _ in range(count)]
        sign_normalize = variant.sign_consensus and bool(params["normalize"])
        agree = [torch.empty_like(base) for _ in range(count)] if sign_normalize else None
        draws = generators(rng, count)
        for sources, block_base, outputs, trims in blocks(tensors, base, model_params, params,
                                                          vectors + (agree or []), prepared, offset, ws):
            _masked_block(sources, block_base, model_params, variant, params, trims, draws, ws,
                          outputs[:count], outputs[count:] if agree is not None else None)
        weights, lam = smooth_parameters(model_params, params)
        return MaskedTerms(base, vectors, agree, bool(params["normalize"]), weights, lam)

    return merge, prepare, masked


task_arithmetic_merge, _, task_arithmetic_masked = _generalized_task_arithmetic(sparsify=None, sign_consensus=False)
ties_merge, ties_prepare, ties_masked = _generalized_task_arithmetic(sparsify="magnitude", sign_consensus=True)
dare_linear_merge, _, dare_linear_masked = _generalized_task_arithmetic(sparsify="random", sign_consensus=False)
dare_ties_merge, _, dare_ties_masked = _generalized_task_arithmetic(sparsify="random", sign_consensus=True)
breadcrumbs_merge, breadcrumbs_prepare, breadcrumbs_masked = _generalized_task_arithmetic(sparsify="outliers",
                                                                                          sign_consensus=False)
breadcrumbs_ties_merge, breadcrumbs_ties_prepare, breadcrumbs_ties_masked = _generalized_task_arithmetic(
    sparsify="outliers", sign_consensus=True)
della_merge, _, della_masked = _generalized_task_arithmetic(sparsify="magnitude_rank", sign_consensus=True)
della_linear_merge, _, della_linear_masked = _generalized_task_arithmetic(sparsify="magnitude_rank",
                                                                          sign_consensus=False)


def _one_cpu_thread(method: MethodFunction) -> MethodFunction:
    """Run ``method`` on one CPU thread (see ``passes.one_cpu_thread``): the streaming writer
    merges on one thread, so the in-memory merger must too for the same bits."""
    @functools.wraps(method)
    def run(tensors, *args, **kwargs) -> Tensor:
        with one_cpu_thread(tensors[0].device):
            return method(tensors, *args, **kwargs)

    return run


_HALF = (torch.float16, torch.bfloat16)


def _geometric(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.dtype in _HALF else tensor


def _combine(tensors: list[Tensor], coefficients: list[float], result: Tensor, ws: Workspace) -> Tensor:
    """``sum(c_i x_i)`` into ``result``, summed in float32 at least (a half-precision result is
    rounded once): how the methods whose whole-tensor angles give coefficients (``prepare``)
    merge, block by block."""
    if result.dtype not in _HALF:
        acc = torch.mul(tensors[0], coefficients[0], out=result)
    else:
        acc = ws.empty("combine", result, torch.float32).copy_(tensors[0]).mul_(coefficients[0])
    for tensor, coefficient in zip(tensors[1:], coefficients[1:]):
        acc.add_(tensor, alpha=coefficient)
    return acc if acc is result else result.copy_(acc)


def _on_base(tensors: list[Tensor], base: Tensor | None, coefficients: list[float], result: Tensor,
             ws: Workspace) -> Tensor:
    """``sum(c_i v_i)`` for the models' task vectors added to the base (``v_i = x_i - base``, as
    ``sum(c_i x_i) + (1 - sum(c_i)) base``) or, without a base, for the models themselves."""
    if base is None:
        return _combine(tensors, coefficients, result, ws)
    return _combine([base, *tensors], [1.0 - sum(coefficients), *coefficients], result, ws)


def _whole(method_prepare: Callable, tensors, base, model_params, params, prepared):
    """``prepared`` as given (a block of a streamed tensor), or computed from the whole tensor."""
    if prepared is not None:
        return prepared
    like = tensors[0] if tensors else base
    return method_prepare(whole_tensor_pass(tensors, base), tuple(like.shape), model_params, params)


def slerp_prepare(passes: BlockPass, shape, model_params, params) -> list[float]:
    """SLERP's coefficients on the base and the model, from the angle between the flattened
    tensors; linear interpolation's when they are nearly colinear or one is about zero."""
    t = float(params["t"])
    matrix = gram(passes, "base+models")
    norm0, norm1 = math.sqrt(matrix[0][0]), math.sqrt(matrix[1][1])
    if norm0 < _TINY or norm1 < _TINY:
        return [1.0 - t, t]
    dot = matrix[0][1] / (norm0 * norm1)
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return [1.0 - t, t]
    theta = math.acos(max(-1.0, min(1.0, dot)))
    sin_theta = math.sin(theta)
    return [math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta]


@_one_cpu_thread
def slerp_merge(tensors, base, model_params, params, rng, ws=None, out=None, prepared=None, offset=0) -> Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1), on the angle
    between the flattened tensors; linear interpolation when they are nearly colinear."""
    ws = ws or Workspace()
    coefficients = _whole(slerp_prepare, tensors, base, model_params, params, prepared)
    return _combine([base, tensors[0]], coefficients, _destination(out, ws, base), ws)


def model_stock_ratio(cosine: float, num_models: int) -> float:
    """Model Stock's interpolation ratio ``t = N cos / (1 + (N - 1) cos)``."""
    denominator = 1.0 + (num_models - 1) * cosine
    if abs(denominator) < _TINY:
        return 0.0
    return num_models * cosine / denominator


def model_stock_layout(params, shape) -> str | None:
    """Flat; with ``filter_wise``, rows of matrices (each row its own ratio), other tensors whole."""
    if not params["filter_wise"]:
        return "flat"
    return "rows" if len(shape) == 2 else None


def model_stock_prepare(passes: BlockPass, shape, model_params, params) -> list[float] | None:
    """Model Stock's coefficients on the models' task vectors: ``t / N`` each, ``t`` from the
    mean pairwise cosine between them; None with ``filter_wise`` (per row, in each block)."""
    if params["filter_wise"]:
        return None
    matrix = gram(passes, "task")
    count = len(matrix)
    cosines = []
    for i in range(count):
        for j in range(i + 1, count):
            norms = math.sqrt(matrix[i][i]) * math.sqrt(matrix[j][j])
            cosines.append(max(-1.0, min(1.0, matrix[i][j] / max(norms, 1e-6))))
    ratio = model_stock_ratio(sum(cosines) / len(cosines), count)
    return [ratio / count] * count


def _model_stock_rows(tensors, base, result: Tensor) -> Tensor:
    """Model Stock per row (vectors along the last axis; a vector is one row): each row moves
    from the base towards the models' average by its own ratio."""
    rows = base.reshape(-1, base.shape[-1])
    deltas = [x.reshape(rows.shape) - rows for x in tensors]
    norms = [torch.linalg.vector_norm(d, dim=-1) for d in deltas]
    cosines = [((a * b).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
               for i, a in enumerate(deltas) for j, b in enumerate(deltas) if j > i]
    cosine = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(tensors)
    denominator = 1.0 + (count - 1) * cosine
    singular = denominator.abs() < 1e-6  # no finite ratio: the base
    ratio = torch.where(singular, 0.0, count * cosine / torch.where(singular, 1.0, denominator))
    average = sum(x.reshape(rows.shape) for x in tensors) / count
    return result.copy_((ratio * average + (1.0 - ratio) * rows).reshape(result.shape))


@_one_cpu_thread
def model_stock_merge(tensors, base, model_params, params, rng, ws=None, out=None, prepared=None,
                      offset=0) -> Tensor:
    """Model Stock: average the fine-tuned models and move from the base towards that average
    by ``t`` from the mean pairwise cosine between their task vectors (with ``filter_wise``,
    per row)."""
    ws = ws or Workspace()
    result = _destination(out, ws, base)
    if params["filter_wise"]:
        return _model_stock_rows(tensors, base, result)
    coefficients = _whole(model_stock_prepare, tensors, base, model_params, params, prepared)
    return _on_base(tensors, base, coefficients, result, ws)


# ---- Spherical methods (nuslerp, multislerp, karcher): coefficients from the angles between
# whole tensors (float64 from float32 dot products), summed in float32 at least.


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


def _nuslerp_t(model_params) -> float:
    w0, w1 = (float(p["weight"]) for p in model_params)
    return 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)


def nuslerp_prepare(passes: BlockPass, shape, model_params, params) -> list[float] | None:
    """NuSLERP's coefficients on the two vectors, flattened (``_slerp_last_axis`` on whole
    tensors); None for its row and column forms, which merge the whole tensor."""
    if not params["nuslerp_flatten"]:
        return None
    t = _nuslerp_t(model_params)
    matrix = gram(passes, "task")
    norm0 = max(math.sqrt(matrix[0][0]), NUSLERP_NORM_FLOOR)
    norm1 = max(math.sqrt(matrix[1][1]), NUSLERP_NORM_FLOOR)
    cosine = max(-1.0, min(1.0, matrix[0][1] / (norm0 * norm1)))
    if 1.0 - cosine * cosine <= NUSLERP_EPS ** 2:
        return [1.0 - t, t]
    theta = math.acos(cosine)
    sin_theta = math.sin(theta)
    return [math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta]


@_one_cpu_thread
def nuslerp_merge(tensors, base, model_params, params, rng, ws=None, out=None, prepared=None, offset=0) -> Tensor:
    """NuSLERP: spherical interpolation between two models at ``t = w1 / (w0 + w1)`` (0.5 when
    the weights sum to about zero); with a base, between their task vectors, added back to the
    base. ``nuslerp_flatten`` (default) takes each tensor as one vector; otherwise each row
    (vectors along the last axis), or with ``nuslerp_row_wise`` each column (along the first)."""
    ws = ws or Workspace()
    result = _destination(out, ws, tensors[0])
    if params["nuslerp_flatten"]:
        coefficients = _whole(nuslerp_prepare, tensors, base, model_params, params, prepared)
        return _on_base(tensors, base, coefficients, result, ws)
    t = _nuslerp_t(model_params)
    v0, v1 = (_geometric(x if base is None else x - base) for x in tensors)
    if params["nuslerp_row_wise"]:
        merged = _slerp_last_axis(v0.transpose(0, -1), v1.transpose(0, -1), t).transpose(0, -1)
    else:
        merged = _slerp_last_axis(v0, v1, t)
    return result.copy_(merged if base is None else merged + _geometric(base))


def _multislerp_weights(model_params, params) -> list[float]:
    weights = [float(p["weight"]) for p in model_params]
    if params["normalize_weights"]:
        total = sum(weights)
        if total == 0.0:
            raise MergeflowError(f"multislerp: the models' weights {weights} sum to zero "
                                 "(normalize_weights divides by their sum)")
        weights = [w / total for w in weights]
    return weights


def multislerp_prepare(passes: BlockPass, shape, model_params, params) -> list[float]:
    """Multi-SLERP's coefficients on the models' vectors (task vectors with a base): the
    tangent-space mean of their directions (see :func:`multislerp_merge`), in the span of the
    vectors, from their Gram matrix."""
    weights = _multislerp_weights(model_params, params)
    if len(weights) == 1:
        return [1.0]
    eps = float(params["eps"])
    matrix = gram(passes, "task")
    norms = [math.sqrt(max(matrix[i][i], 0.0)) for i in range(len(weights))]
    mean = [w / (n + eps) for w, n in zip(weights, norms)]  # sum(w_i u_i), u_i = v_i / (|v_i| + eps)
    mean_norm = norm(matrix, mean)
    if mean_norm < eps:
        # No mean direction. Two models (antipodal, balanced) and unchanged tensors (every vector
        # zero) fall back to the weighted sum; otherwise the weights must change. mergekit
        # raises for unchanged tensors of three or more models too.
        if len(weights) > 2 and any(n > 0.0 for n in norms):
            raise MergeflowError(f"multislerp: the weighted mean of the models' directions is zero "
                                 f"(antipodal task vectors balanced by the weights {weights}); change the weights")
        return weights
    # the tangent at the mean direction: sum(w_i (u_i - (u_i . m) m)) = mean - (sum w_i u_i . m) m
    along = sum(w / (n + eps) * quadratic(matrix, [float(i == j) for j in range(len(weights))], mean) / mean_norm
                for i, (w, n) in enumerate(zip(weights, norms)))
    tangent = [a - along * a / mean_norm for a in mean]
    length = norm(matrix, tangent) + eps
    scale = sum(w * n for w, n in zip(weights, norms))
    return [(a / mean_norm * math.cos(length) + b * math.sin(length) / length) * scale
            for a, b in zip(mean, tangent)]


@_one_cpu_thread
def multislerp_merge(tensors, base, model_params, params, rng, ws=None, out=None, prepared=None,
                     offset=0) -> Tensor:
    """Multi-SLERP: a weighted mean of the models' directions on the unit sphere, from the tangent
    space at their normalized weighted mean (one exponential map), scaled by the weighted mean of
    their norms; with a base, of their task vectors, added back to the base. Weights are divided
    by their sum with ``normalize_weights``; one model is returned as is."""
    ws = ws or Workspace()
    result = _destination(out, ws, tensors[0])
    if len(tensors) == 1:
        return result.copy_(tensors[0])
    coefficients = _whole(multislerp_prepare, tensors, base, model_params, params, prepared)
    return _on_base(tensors, base, coefficients, result, ws)


def karcher_coefficients(matrix: list[list[float]], max_iter: int, tol: float) -> list[float]:
    """The Karcher (Riemannian) mean of vectors' directions, equally weighted, scaled by their
    mean norm, as coefficients on the vectors (it stays in their span), from their Gram matrix.
    Vectors with norm at most ``tol`` have no direction and only count in the scale (zero, for a
    zero vector); when the mean direction cancels the first direction starts the iteration.
    Each step moves along the mean log map; stops after ``max_iter`` steps or once the step is
    shorter than ``tol``."""
    count = len(matrix)
    norms = [math.sqrt(max(matrix[i][i], 0.0)) for i in range(count)]
    scale = sum(norms) / count
    units = [i for i in range(count) if norms[i] > tol]
    if not units:
        return [0.0] * count
    # the units' Gram matrix; the mean as coefficients on the units
    g = [[matrix[i][j] / (norms[i] * norms[j]) for j in units] for i in units]
    size = len(units)
    share = 1.0 / size
    mean = [share] * size
    mean_norm = norm(g, mean)
    mean = [float(i == 0) for i in range(size)] if mean_norm < tol else [m / mean_norm for m in mean]
    for _ in range(max_iter):
        step = [0.0] * size
        for i in range(size):
            cosine = max(-1.0, min(1.0, sum(mean[j] * g[j][i] for j in range(size))))
            theta = math.acos(cosine)
            if theta < tol or math.sin(theta) == 0.0:  # at the mean; or antipodal: no direction
                continue
            factor = share * theta / math.sin(theta)
            for j in range(size):
                step[j] += factor * (float(i == j) - cosine * mean[j])
        length = norm(g, step)
        if length < tol:
            break
        mean = [m * math.cos(length) + s * (math.sin(length) / length) for m, s in zip(mean, step)]
        mean_norm = norm(g, mean)
        if mean_norm > tol:
            mean = [m / mean_norm for m in mean]
    coefficients = [0.0] * count
    for position, i in enumerate(units):
        coefficients[i] = mean[position] * scale / norms[i]
    return coefficients


def karcher_prepare(passes: BlockPass, shape, model_params, params) -> list[float]:
    """Karcher's coefficients on the models (see :func:`karcher_coefficients`)."""
    if len(model_params) == 1:
        return [1.0]
    return karcher_coefficients(gram(passes, "models"), int(params["max_iter"]), float(params["tol"]))


@_one_cpu_thread
def karcher_merge(tensors, base, model_params, params, rng, ws=None, out=None, prepared=None, offset=0) -> Tensor:
    """Karcher mean of the models (see :func:`karcher_coefficients`); one model is returned as
    is. No base: a models recipe's ``base_model`` is merged as one more model (the planner adds
    it)."""
    ws = ws or Workspace()
    coefficients = _whole(karcher_prepare, tensors, None, model_params, params, prepared)
    return _combine(list(tensors), coefficients, _destination(out, ws, tensors[0]), ws)


# ---- Task-vector methods with their own weighting (sce, ram, ramplus_tl), nearswap and
# arcee_fusion: computed in the compute dtype, as mergekit does.


def _population_variance(deltas: list[Tensor]) -> Tensor:
    """Per entry, the population variance of the models' values, summed in float64 and rounded
    to their dtype (what ``torch.var(stacked, dim=0, correction=0)`` gives on CPU, at a twentieth
    of its time: its reduction across a stacked axis is strided)."""
    wide = [d.double() for d in deltas]
    mean = wide[0].clone()
    for d in wide[1:]:
        mean.add_(d)
    mean.div_(len(wide))
    total = torch.zeros_like(mean)
    for d in wide:
        total.add_(d.sub_(mean).square_())
    return total.div_(len(wide)).to(deltas[0].dtype)


def _sce_deltas(tensors, base, selection: Trim | None, start: int) -> list[Tensor]:
    """The models' task vectors, zero outside ``selection`` (the entries of highest variance
    across the models; None: all); ``start``: the flat offset of these entries."""
    deltas = [x - base for x in tensors]
    if selection is not None:
        variance = _population_variance(deltas)
        kept = torch.ne(apply_trim(variance, selection.block(start, start + variance.numel()), Workspace()), 0.0)
        for delta in deltas:
            delta.mul_(kept)
    return deltas


def sce_prepare(passes: BlockPass, shape, model_params, params) -> tuple[Trim | None, list[float]]:
    """SCE's selection and weights: the ``select_topk`` fraction of entries whose task vectors
    vary most across the models (a trim of the variances: ``int(fraction * count)`` of the
    ``count`` entries that vary; ties at the cut by flat index, where mergekit's ``topk`` picks
    its own), and each model's weight from the mean square of its selected task vector."""
    fraction = float(params["select_topk"])
    numel = math.prod(shape)
    selection = None
    if fraction < 1.0:
        def fill(blocks, base, out):
            for start, runs in chunks(base, *blocks):
                variance = _population_variance([x - runs[0] for x in runs[1:]])
                out[start:start + variance.numel()].copy_(variance)

        variances = fill_flat(passes, numel, fill)
        count = int(torch.count_nonzero(variances))
        # the product as torch forms it (a float32 tensor), as mergekit does: the same cut
        keep = int(torch.tensor(count) * fraction) if fraction > 0 else 0
        selection = magnitude_trim(variances, keep) if keep > 0 else Trim(math.inf)
        del variances
    sums: Tensor | None = None
    for offset, blocks, base in passes():
        for start, runs in chunks(base, *blocks):
            deltas = _sce_deltas(runs[1:], runs[0], selection, offset + start)
            squares = torch.stack([_geometric(d).square().sum(dtype=torch.float64) for d in deltas])
            sums = squares if sums is None else sums.add_(squares)
    energy = [value / numel for value in sums.tolist()]
    total = sum(energy)
    weights = [1.0 / len(energy)] * len(energy) if abs(total) < 1e-6 else [e / total for e in energy]
    return selection, weights


def _sce_block(tensors, base, selection: Trim | None, weights: list[float], start: int, result: Tensor) -> None:
    deltas = _sce_deltas(tensors, base, selection, start)
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total.add_(delta)
    elected = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    merged, shares = torch.zeros_like(total), torch.zeros_like(total)
    for delta, weight in zip(deltas, weights):
        agreeing = torch.eq(torch.sign(delta), elected).to(delta.dtype).mul_(weight)  # zeros never agree
        merged.add_(delta.mul_(agreeing))
        shares.add_(agreeing)
    torch.add(base, merged.div_(shares.clamp_min_(1e-6)), out=result)


@_one_cpu_thread
def sce_merge(tensors, base, model_params, params, rng, ws=None, out=None, prepared=None, offset=0) -> Tensor:
    """SCE (select, calculate, erase): keep the ``select_topk`` fraction of entries whose task
    vectors vary most across the models (all at 1); weight each model by its task vector's mean
    square (normalized to sum 1; equal when they sum below 1e-6); per entry, drop the task
    vectors whose sign differs from the sign of their sum (zero entries never agree), and take
    the weighted mean of the rest: ``base + sum(w_i d_i) / max(sum(w_i), 1e-6)`` over them."""
    selection, weights = _whole(sce_prepare, tensors, base, model_params, params, prepared)
    result = _destination(out, ws or Workspace(), base)
    for start, runs in chunks(base, result, *tensors):
        _sce_block(runs[2:], runs[0], selection, weights, offset + start, runs[1])
    return result


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


def arcee_fusion_layout(params, shape) -> str | None:
    """Rows (the softmax's axis) for vectors and matrices; other tensors whole."""
    return "rows" if len(shape) <= 2 else None


def arcee_fusion_prepare(passes: BlockPass, shape, model_params, params) -> Tensor:
    """Arcee Fusion's threshold: ``median + 1.5 IQR`` of the tensor's importances (quartiles:
    the sorted importances at ``floor(q (n - 1))``), in the compute dtype."""
    numel = math.prod(shape)
    dtypes = []

    def fill(blocks, base, out):
        importance = _fusion_importance(blocks[0], base)
        dtypes.append(importance.dtype)
        out.copy_(importance.reshape(-1))

    importances = fill_flat(passes, numel, fill)
    last = numel - 1
    quartiles = torch.tensor([kth_largest(importances, numel - index) for index in (last // 4, last // 2, 3 * last // 4)],
                             dtype=dtypes[0], device=importances.device)
    return importances, quartiles[1] + 1.5 * (quartiles[2] - quartiles[0])  # in the compute dtype


@_one_cpu_thread
def arcee_fusion_merge(tensors, base, model_params, params, rng, ws=None, out=None, prepared=None,
                       offset=0) -> Tensor:
    """Arcee Fusion: the other model's value where the entry's importance (see
    ``_fusion_importance``) reaches ``median + 1.5 IQR`` of the tensor's importances (the
    outliers of a box plot), the base's elsewhere. Quartiles are of the whole tensor: mergekit
    takes them from a random sample of 1M entries in larger tensors, which cannot be
    reproduced."""
    model = tensors[0]
    if prepared is None:
        row = model.shape[-1] if model.dim() == 2 else None
        prepared = arcee_fusion_prepare(whole_tensor_pass(tensors, base, row), tuple(model.shape),
                                        model_params, params)
    importances, threshold = prepared
    keep = importances[offset:offset + model.numel()].view(model.shape) >= threshold
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


def ramplus_tl_prepare(passes: BlockPass, shape, model_params, params) -> list[float]:
    """RAM+'s boost per model, ``r min(alpha, shared / max(unique, epsilon))``, from counts of
    the model's kept entries that other models change too (``shared``) and that it alone
    changes (``unique``) over the whole tensor (integers: exact, however the tensor is split)."""
    epsilon, r, alpha = float(params["epsilon"]), float(params["r"]), float(params["alpha"])
    unique = [0] * len(model_params)
    kept = [0] * len(model_params)
    for _, blocks, base in passes():
        for _, runs in chunks(base, *blocks):  # runs of CPU_BLOCK: the passes stay in cache
            masks = [torch.gt(torch.sub(x, runs[0]).abs_(), epsilon) for x in runs[1:]]
            count = masks[0].to(torch.int16)
            for mask in masks[1:]:
                count.add_(mask)
            alone = torch.eq(count, 1)
            for index, mask in enumerate(masks):
                unique[index] += int(torch.count_nonzero(mask & alone))
                kept[index] += int(torch.count_nonzero(mask))
    boosts = []
    for alone_count, kept_count in zip(unique, kept):
        shared = kept_count - alone_count
        floor = max(alone_count, epsilon)
        ratio = shared / floor if floor > 0 else (math.inf if shared else 0.0)
        boosts.append(r * min(max(ratio, 0.0), alpha))
    return boosts


def ramplus_tl_merge(tensors, base, model_params, params, rng, ws=None, out=None, prepared=None,
                     offset=0) -> Tensor:
    """RAM+ (tensor-local): RAM, with each model's changes that no other model makes scaled by
    ``1 + r min(alpha, shared / unique)``, ``shared`` and ``unique`` counting the model's kept
    entries that other models change too and those it alone changes, in this tensor
    (``unique`` floored at ``epsilon``)."""
    ws = ws or Workspace()
    boosts = _whole(ramplus_tl_prepare, tensors, base, model_params, params, prepared)
    result = _destination(out, ws, base)
    epsilon = float(params["epsilon"])
    for _, runs in chunks(base, result, *tensors):  # runs of CPU_BLOCK: the passes stay in cache
        run_base, run_result, run_models = runs[0], runs[1], runs[2:]
        count, deltas, _ = _ram_sums(run_models, run_base, epsilon, ws, run_result)
        alone = torch.eq(count, 1.0, out=ws.empty("alone", run_base))
        boost = ws.empty("boost", run_base).zero_()
        for delta, factor in zip(deltas, boosts):
            boost.add_(delta, alpha=factor)
        # where one model changes an entry the mean is that change: add its boost there
        run_result.div_(count.clamp_min_(1.0))
        run_result.add_(boost.mul_(alone)).add_(run_base)
    return result
