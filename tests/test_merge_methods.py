"""Each merge method against its formula, written out independently here."""

import math

import pytest
import torch

from mergeflow.merge.methods import model_stock_ratio
from mergeflow.merge.registry import MERGE_METHODS, get_method
from mergeflow.merge.sparsify import Workspace, kth_largest
from mergeflow.errors import MergeflowError


def run(name, tensors, base, models=None, seed=0, **params):
    """Call a registered method with its defaults filled in, like the planner does."""
    method = get_method(name)
    models = models or [{} for _ in tensors]
    model_params = [{**method.model_defaults, **m} for m in models]
    method_params = {**method.method_defaults, **params}

    def rng(index):
        return torch.Generator().manual_seed(seed * 1000 + index)

    return method.function(tensors, base, model_params, method_params, rng)


def test_registry_has_every_standard_method():
    assert set(MERGE_METHODS) >= {
        "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "breadcrumbs",
        "breadcrumbs_ties", "della", "della_linear", "model_stock"}


def test_unknown_method_names_itself():
    with pytest.raises(MergeflowError, match="'frankenmerge'"):
        get_method("frankenmerge")


def test_linear_normalizes_weights():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    out = run("linear", [a, b], None, [{"weight": 1.0}, {"weight": 3.0}])
    torch.testing.assert_close(out, (1 * a + 3 * b) / 4)
    raw = run("linear", [a, b], None, [{"weight": 1.0}, {"weight": 3.0}], normalize=False)
    torch.testing.assert_close(raw, a + 3 * b)


def test_task_arithmetic_adds_scaled_task_vectors():
    base = torch.randn(7)
    a, b = base + torch.randn(7), base + torch.randn(7)
    out = run("task_arithmetic", [a, b], base, [{"weight": 0.7}, {"weight": 0.4}], **{"lambda": 1.3})
    expected = base + 1.3 * (0.7 * (a - base) + 0.4 * (b - base))
    torch.testing.assert_close(out, expected)
    normalized = run("task_arithmetic", [a, b], base, [{"weight": 0.7}, {"weight": 0.4}], normalize=True)
    torch.testing.assert_close(normalized, base + (0.7 * (a - base) + 0.4 * (b - base)) / 1.1)


def test_ties_three_model_hand_example():
    base = torch.full((5,), 0.1)
    deltas = [torch.tensor([1.0, -2.0, 0.5, 3.0, -0.1]),
              torch.tensor([-1.5, -1.0, 0.2, 2.0, 0.3]),
              torch.tensor([0.5, 4.0, -0.6, -1.0, 0.2])]
    # density 0.6 keeps 3 of 5 per model:
    #   [1, -2, 0, 3, 0], [-1.5, -1, 0, 2, 0], [0, 4, -0.6, -1, 0]
    # elected signs of the sums (-0.5, 1, -0.6, 4, 0): -, +, -, +, + (zero counts as +)
    # disjoint means: -1.5 (m2), 4 (m3), -0.6 (m3), (3+2)/2, nothing agrees -> 0
    expected = base + torch.tensor([-1.5, 4.0, -0.6, 2.5, 0.0])
    out = run("ties", [base + d for d in deltas], base, [{"weight": 1.0, "density": 0.6}] * 3)
    torch.testing.assert_close(out, expected)


def test_ties_weights_enter_sign_and_mean():
    base = torch.zeros(1)
    out = run("ties", [torch.tensor([1.0]), torch.tensor([-1.0])], base,
              [{"weight": 1.0}, {"weight": 3.0}])
    torch.testing.assert_close(out, torch.tensor([-1.0]))  # -3 wins; (3 * -1) / 3


def test_dare_mean_of_many_draws_is_task_arithmetic():
    torch.manual_seed(0)
    base = torch.randn(16)
    tensors = [base + torch.randn(16), base + torch.randn(16)]
    models = [{"weight": 0.6, "density": 0.3}, {"weight": 0.5, "density": 0.5}]
    draws = torch.stack([run("dare_linear", tensors, base, models, seed=s) for s in range(3000)])
    expected = base + 0.6 * (tensors[0] - base) + 0.5 * (tensors[1] - base)
    torch.testing.assert_close(draws.mean(0), expected, atol=0.12, rtol=0)


def test_dare_keeps_density_fraction_rescaled():
    base = torch.zeros(20000)
    out = run("dare_linear", [torch.ones(20000)], base, [{"weight": 1.0, "density": 0.25}], seed=1)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.25) < 0.02
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 4.0))


def test_dare_is_reproducible_per_seed():
    base = torch.zeros(100)
    tensors = [torch.randn(100), torch.randn(100)]
    models = [{"density": 0.5}] * 2
    assert torch.equal(run("dare_ties", tensors, base, models, seed=4),
                       run("dare_ties", tensors, base, models, seed=4))
    assert not torch.equal(run("dare_ties", tensors, base, models, seed=4),
                           run("dare_ties", tensors, base, models, seed=5))


def test_slerp_endpoints_and_midpoint():
    v0, v1 = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 2.0, -0.3])
    assert torch.equal(run("slerp", [v1], v0, t=0.0), v0)
    assert torch.equal(run("slerp", [v1], v0, t=1.0), v1)
    dot = float(v0 @ v1) / float(v0.norm() * v1.norm())
    theta = math.acos(dot)
    t = 0.3
    expected = (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)
    torch.testing.assert_close(run("slerp", [v1], v0, t=t), expected)


def test_slerp_falls_back_to_linear_when_colinear():
    v0 = torch.tensor([1.0, 2.0, 3.0])
    v1 = 2.0 * v0
    torch.testing.assert_close(run("slerp", [v1], v0, t=0.25), 0.75 * v0 + 0.25 * v1)


def test_model_stock_ratio_from_cosine():
    base = torch.tensor([1.0, 1.0])
    d1, d2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])  # cos = 0.5
    t = 2 * 0.5 / (1 + 0.5)
    assert model_stock_ratio(0.5, 2) == pytest.approx(t)
    out = run("model_stock", [base + d1, base + d2], base)
    expected = t * (base + (d1 + d2) / 2) + (1 - t) * base
    torch.testing.assert_close(out, expected)


def test_breadcrumbs_drops_outliers_and_small_entries():
    base = torch.zeros(10)
    delta = torch.arange(1.0, 11.0)
    # density 0.5 keeps 5, gamma 0.1 drops the largest 1 -> ranks 5..9 -> values 5..9
    out = run("breadcrumbs", [delta], base, [{"weight": 1.0, "density": 0.5, "gamma": 0.1}])
    expected = torch.tensor([0, 0, 0, 0, 5, 6, 7, 8, 9, 0.0])
    torch.testing.assert_close(out, expected)


def test_della_keeps_large_entries_more_often_and_is_unbiased():
    base = torch.zeros(1, 10)
    delta = torch.arange(1.0, 11.0).view(1, 10)
    draws = torch.stack([run("della_linear", [delta], base, [{"density": 0.5, "epsilon": 0.4}], seed=s)
                         for s in range(2000)])
    kept = (draws != 0).float().mean(0).flatten()
    assert kept[0] == pytest.approx(0.1, abs=0.03) and kept[-1] == pytest.approx(0.9, abs=0.03)
    torch.testing.assert_close(draws.mean(0), delta, atol=0.6, rtol=0.1)


def test_della_and_breadcrumbs_ties_elect_signs():
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, -1.0, 2.0, 0.5]), torch.tensor([-3.0, -1.0, 1.0, 0.5])
    # density 1: no sparsification; della normalizes (TIES mean), breadcrumbs_ties sums
    torch.testing.assert_close(run("della", [a, b], base), torch.tensor([-3.0, -1.0, 1.5, 0.5]))
    torch.testing.assert_close(run("breadcrumbs_ties", [a, b], base),
                               torch.tensor([-3.0, -2.0, 3.0, 1.0]))


@pytest.mark.parametrize("layout", ["random", "sorted", "ties"])
def test_fast_selection_is_exact(layout):
    torch.manual_seed(3)
    values = torch.randn(600_000).abs()
    if layout == "sorted":
        values = values.sort().values
    if layout == "ties":
        values = torch.randint(0, 50, (600_000,)).float()
    for k in (1, 1000, 300_000, 599_999, 600_000):
        expected = float(torch.kthvalue(values, values.numel() - k + 1).values)
        assert kth_largest(values, k) == expected


def ties_reference(tensors, base, weights, density):
    """TIES written out with dense tensors: top-k trim, sign election, disjoint mean."""
    weighted = []
    for tensor, weight in zip(tensors, weights):
        delta = (tensor - base).flatten()
        keep = torch.zeros_like(delta)
        keep[delta.abs().topk(int(density * delta.numel())).indices] = 1.0
        weighted.append(delta * keep * weight)
    stacked = torch.stack(weighted)
    elected = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
    agrees = (stacked.sign() == elected).float()
    merged = (stacked * agrees).sum(0)
    weight_sum = (torch.tensor(weights).view(-1, 1) * agrees).sum(0)
    weight_sum[weight_sum == 0] = 1.0
    return base + (merged / weight_sum).view(base.shape)


def test_ties_on_a_large_blocked_tensor_matches_the_dense_formula():
    torch.manual_seed(5)
    base = torch.randn(300, 170)  # 51,000 entries: merged in CPU blocks
    tensors = [base + torch.randn(300, 170) for _ in range(3)]
    out = run("ties", tensors, base, [{"weight": w, "density": 0.4} for w in (0.5, 1.0, 0.8)])
    torch.testing.assert_close(out, ties_reference(tensors, base, [0.5, 1.0, 0.8], 0.4))


@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear", "della", "breadcrumbs"])
def test_cached_workspace_and_out_do_not_change_results(name):
    torch.manual_seed(6)
    base = torch.randn(260, 200)
    tensors = [base + torch.randn(260, 200), base + torch.randn(260, 200)]
    models = [{"weight": 0.7, "density": 0.3}, {"weight": 0.5, "density": 0.6}]
    method = get_method(name)
    model_params = [{**method.model_defaults, **m} for m in models]

    def merged(ws, out):
        def rng(index):
            return torch.Generator().manual_seed(100 + index)
        return method.function(tensors, base, model_params, method.method_defaults, rng, ws, out)

    fresh = merged(None, None).clone()
    ws = Workspace(cache=True)
    for _ in range(2):  # the second run reuses buffers and the sorted magnitudes
        assert torch.equal(merged(ws, torch.empty_like(base)), fresh)
