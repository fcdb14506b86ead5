"""The task-vector methods with their masks held (``MergeMethod.masked``, ``MaskedTerms``): the
held merge is the merge, and its slopes are its derivatives in the weights and lambda."""

import pytest
import torch

from mergeflow.merge.passes import CPU_BLOCK
from mergeflow.merge.registry import MERGE_METHODS, get_method

MASKED = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della",
          "della_linear"]


def arguments(name, weights, density=0.6, **params):
    """A method's per-model and method parameters with its defaults, as the planner fills them,
    and its seeded generators (a fresh factory per call: each call draws the same numbers)."""
    method = get_method(name)
    models = [{**method.model_defaults, "weight": w, "density": density, "gamma": 0.05} for w in weights]
    models = [{k: v for k, v in m.items() if k in method.model_defaults} for m in models]
    return models, {**method.method_defaults, **params}, lambda index: torch.Generator().manual_seed(7 + index)


def sources(shape=(400, 401)):
    """Three models' tensors around a base, in float64: by default a tensor above ``CPU_BLOCK``,
    which the elementwise methods merge in blocks."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    return [base + torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(3)], base


def test_the_default_tensor_is_merged_in_blocks():
    assert sources()[1].numel() > CPU_BLOCK


def test_the_methods_with_a_held_form_are_the_task_vector_ones():
    assert sorted(n for n, m in MERGE_METHODS.items() if m.masked is not None) == sorted(MASKED)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("name", MASKED)
def test_the_held_merge_is_the_merge(name, normalize, rescale):
    """At the weights it was held at, negative ones and lambda included, with and without the
    rescale of what the masks keep."""
    tensors, base = sources()
    models, params, rng = arguments(name, [0.7, -0.4, 1.1], normalize=normalize, rescale=rescale, **{"lambda": 1.3})
    method = get_method(name)
    merged = method.function(tensors, base, models, params, rng)
    terms = method.masked(tensors, base, models, params, arguments(name, [])[2])
    torch.testing.assert_close(terms.at(), merged, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("name", MASKED)
def test_the_slopes_are_the_merge_s_derivatives(name, normalize, rescale):
    """Against central differences of the merge itself at w ± h: the masks that move with the
    weights (the elected signs) stay put for so small an h, the others never move with them."""
    tensors, base = sources()
    weights, h = [0.7, 0.4, 1.1], 1e-6
    method = get_method(name)
    models, params, rng = arguments(name, weights, normalize=normalize, rescale=rescale, **{"lambda": 1.3})
    terms = method.masked(tensors, base, models, params, rng)
    slopes, along_lambda = terms.slopes()

    def merged(weights, lam=1.3):
        models, params, rng = arguments(name, weights, normalize=normalize, rescale=rescale, **{"lambda": lam})
        return method.function(tensors, base, models, params, rng)

    for k in range(3):
        up, down = ([w + (s if i == k else 0.0) for i, w in enumerate(weights)] for s in (h, -h))
        numeric = (merged(up) - merged(down)) / (2 * h)
        assert numeric.abs().max() > 0.01
        torch.testing.assert_close(slopes[k], numeric, rtol=1e-6, atol=1e-6)
        held = (terms.at(up) - terms.at(down)) / (2 * h)
        torch.testing.assert_close(slopes[k], held, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(along_lambda, (merged(weights, 1.3 + h) - merged(weights, 1.3 - h)) / (2 * h),
                               rtol=1e-6, atol=1e-6)


def test_held_signs_stay_held_where_the_merge_s_own_would_flip():
    """TIES at other weights: the held merge keeps the signs elected at the held weights, so it
    differs from the merge there exactly where the election flips."""
    tensors, base = sources((40, 41))
    method = get_method("ties")
    models, params, rng = arguments("ties", [1.0, 1.0, 1.0])
    terms = method.masked(tensors, base, models, params, rng)
    other = [3.0, 0.1, 0.1]
    models, params, rng = arguments("ties", other)
    moved = method.function(tensors, base, models, params, rng)
    differs = (terms.at(other) - moved).abs() > 1e-9
    assert 0 < int(differs.sum()) < differs.numel()
