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
        "breadcrumbs_ties", "della", "della_linear", "model_stock", "nuslerp", "multislerp", "karcher",
        "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"}


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


# ---- the methods of mergekit 0.1.5 (nuslerp ... ramplus_tl): formulas and edge cases


def spherical(v0, v1, t):
    """SLERP of two flat vectors written out in float64 scalars."""
    a, b = v0.double(), v1.double()
    cosine = float(a @ b) / (float(a.norm()) * float(b.norm()))
    theta = math.acos(max(-1.0, min(1.0, cosine)))
    return ((math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)).float()


def test_nuslerp_interpolates_task_vectors_at_the_weights_ratio():
    torch.manual_seed(11)
    base = torch.randn(4, 6)
    a, b = base + torch.randn(4, 6), base + torch.randn(4, 6)
    out = run("nuslerp", [a, b], base, [{"weight": 1.0}, {"weight": 3.0}])  # t = 3 / 4
    expected = base + spherical((a - base).flatten(), (b - base).flatten(), 0.75).view(4, 6)
    torch.testing.assert_close(out, expected)
    # without a base: the models themselves; weights summing to about zero: t = 0.5
    torch.testing.assert_close(run("nuslerp", [a, b], None, [{"weight": 1.0}, {"weight": -1.0}]),
                               spherical(a.flatten(), b.flatten(), 0.5).view(4, 6))


def test_nuslerp_rows_and_columns():
    torch.manual_seed(12)
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    models = [{"weight": 0.4}, {"weight": 0.6}]
    rows = run("nuslerp", [a, b], None, models, nuslerp_flatten=False)
    columns = run("nuslerp", [a, b], None, models, nuslerp_flatten=False, nuslerp_row_wise=True)
    torch.testing.assert_close(rows, torch.stack([spherical(a[i], b[i], 0.6) for i in range(3)]))
    torch.testing.assert_close(columns, torch.stack([spherical(a[:, j], b[:, j], 0.6) for j in range(5)], dim=1))


def test_nuslerp_parallel_and_zero_vectors():
    """Parallel vectors interpolate linearly (the linear branch, or the spherical formula at a
    tiny angle: the same to float rounding), and so do antiparallel ones: the angle comes from
    float64 sums, where cos is -1. (mergekit 0.1.5 computes it in float32, gets -0.99999994 for
    v and -2v and takes the spherical branch at its singularity: [-2046.44, 4092.88, -1023.22].)
    A zero vector has no direction and counts as orthogonal (theta = pi/2): the other is scaled
    by sin(t pi/2), not t."""
    v = torch.tensor([1.0, -2.0, 0.5])
    models = [{"weight": 0.75}, {"weight": 0.25}]  # t = 0.25
    torch.testing.assert_close(run("nuslerp", [v, 3 * v], None, models), 0.75 * v + 0.25 * 3 * v)
    axis = torch.tensor([2.0, 0.0, 0.0])  # cos exactly -1
    torch.testing.assert_close(run("nuslerp", [axis, -2 * axis], None, models), 0.75 * axis - 0.5 * axis)
    torch.testing.assert_close(run("nuslerp", [v, -2 * v], None, models), 0.75 * v - 0.5 * v)
    zero = torch.zeros(3)
    torch.testing.assert_close(run("nuslerp", [zero, v], None, models), math.sin(0.25 * math.pi / 2) * v)
    torch.testing.assert_close(run("nuslerp", [v, zero], None, models), math.sin(0.75 * math.pi / 2) * v)
    base = torch.tensor([0.3, 0.3, 0.3])
    assert torch.equal(run("nuslerp", [base, base], base, models), base)  # no change: the base


def test_multislerp_of_unit_vectors_lies_on_the_sphere_at_the_mean_norm():
    torch.manual_seed(13)
    vectors = [torch.randn(8) for _ in range(3)]
    vectors = [v / v.norm() * n for v, n in zip(vectors, (1.0, 2.0, 4.0))]
    weights = [0.2, 0.3, 0.5]
    out = run("multislerp", vectors, None, [{"weight": w} for w in weights])
    assert float(out.norm()) == pytest.approx(0.2 * 1 + 0.3 * 2 + 0.5 * 4, rel=1e-5)
    # the direction: the exponential map of the weighted tangent vectors at the normalized mean
    units = [v / v.norm() for v in vectors]
    mean = sum(w * u for w, u in zip(weights, units))
    mean = mean / mean.norm()
    tangent = sum(w * (u - (u @ mean) * mean) for w, u in zip(weights, units))
    length = tangent.norm()
    expected = mean * torch.cos(length) + tangent / length * torch.sin(length)
    torch.testing.assert_close(out / out.norm(), expected)
    # normalize_weights: false takes the weights as they are (here: all doubled, norm doubled)
    raw = run("multislerp", vectors, None, [{"weight": 2 * w} for w in weights], normalize_weights=False)
    assert float(raw.norm()) == pytest.approx(2 * float(out.norm()), rel=1e-3)


def test_multislerp_one_model_parallel_and_cancelling():
    base = torch.tensor([1.0, 1.0])
    v = torch.tensor([3.0, 4.0])
    assert torch.equal(run("multislerp", [base + v], base), base + v)
    # parallel: the direction, at the weighted mean norm
    torch.testing.assert_close(run("multislerp", [base + v, base + 3 * v], base,
                                   [{"weight": 1.0}, {"weight": 1.0}]), base + 2 * v)
    # two antipodal, balanced: no mean direction, the weighted sum (here the base)
    torch.testing.assert_close(run("multislerp", [base + v, base - v], base), base)
    # a tensor no model changed: the base (mergekit raises for three or more models)
    torch.testing.assert_close(run("multislerp", [base, base, base], base), base)
    with pytest.raises(MergeflowError, match="multislerp: the weighted mean of the models' directions is zero"):
        run("multislerp", [base + v, base - v, base + v, base - v], base)
    with pytest.raises(MergeflowError, match="sum to zero"):
        run("multislerp", [base + v, base - v], base, [{"weight": 1.0}, {"weight": -1.0}])


def test_karcher_of_two_orthogonal_vectors_is_the_bisector_at_the_mean_norm():
    a, b = torch.tensor([2.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])
    out = run("karcher", [a, b], None)
    torch.testing.assert_close(out, 3.0 * torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))


def test_karcher_mean_of_three_directions_balances_their_log_maps():
    torch.manual_seed(14)
    vectors = [torch.randn(6) for _ in range(3)]
    out = run("karcher", vectors, None, max_iter=100, tol=1e-7)
    mean = out / out.norm()
    assert float(out.norm()) == pytest.approx(sum(float(v.norm()) for v in vectors) / 3, rel=1e-5)
    log_maps = []
    for v in vectors:
        unit = v / v.norm()
        cosine = float(unit @ mean)
        theta = math.acos(max(-1.0, min(1.0, cosine)))
        log_maps.append(theta / math.sin(theta) * (unit - cosine * mean))
    assert float(sum(log_maps).norm()) < 1e-5  # the Karcher mean's defining condition


def test_karcher_parallel_zero_and_tiny_vectors():
    v = torch.tensor([1.0, 2.0, 2.0])
    torch.testing.assert_close(run("karcher", [v, 2 * v], None), 1.5 * v)  # parallel: the mean
    torch.testing.assert_close(run("karcher", [v, torch.zeros(3)], None), 0.5 * v)  # zero: in the scale only
    assert torch.equal(run("karcher", [v], None), v)
    tiny = torch.full((3,), 1e-7)  # every norm at most tol: no direction, zero (as mergekit)
    assert torch.equal(run("karcher", [tiny, 2 * tiny], None), torch.zeros(3))
    # antipodal: the mean direction cancels; the first direction, at the mean norm
    torch.testing.assert_close(run("karcher", [v, -v], None), v)


def test_sce_weights_by_energy_and_erases_disagreeing_signs():
    base = torch.zeros(4)
    d1 = torch.tensor([1.0, -1.0, 2.0, 0.0])
    d2 = torch.tensor([3.0, 1.0, -1.0, 0.0])
    w1, w2 = float((d1 ** 2).mean()), float((d2 ** 2).mean())
    w1, w2 = w1 / (w1 + w2), w2 / (w1 + w2)
    # signs of the sums: +, +, +, + (0 counts as +); entry 1: only d2 agrees; entry 2: only d1;
    # entry 3: nobody (zero never agrees) -> 0
    expected = torch.tensor([(w1 * 1 + w2 * 3) / (w1 + w2), 1.0, 2.0, 0.0])
    torch.testing.assert_close(run("sce", [d1, d2], base), expected)


def test_sce_select_topk_keeps_the_most_varying_entries():
    base = torch.zeros(5)
    d1 = torch.tensor([1.0, 1.0, 4.0, 0.0, -2.0])
    d2 = torch.tensor([1.0, 2.0, 0.0, 0.5, 2.0])
    # variances: 0, 0.25, 4, 0.0625, 4: four vary; int(4 * 0.5) = 2 kept: entries 2 and 4
    # entry 2: d2's 0 never agrees, d1's 4 alone; entry 4: +2 and -2 sum to 0, elected +: d2's 2
    out = run("sce", [d1, d2], base, select_topk=0.5)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 4.0, 0.0, 2.0]))
    assert torch.equal(run("sce", [d1, d2], base, select_topk=0.0), base)
    assert torch.equal(run("sce", [d1], base, select_topk=0.5), base)  # one model varies nowhere


def test_nearswap_takes_near_entries_and_keeps_far_ones():
    base = torch.tensor([0.0, 0.0, 0.0, 0.0])
    other = torch.tensor([0.05, -0.1, 0.4, 0.0])
    out = run("nearswap", [other], base, t=0.1)
    # share min(1, 0.1 / |diff|): 1, 1, 0.25, 1
    torch.testing.assert_close(out, torch.tensor([0.05, -0.1, 0.1, 0.0]))
    assert torch.equal(run("nearswap", [other], base, t=0.0), base)
    assert torch.equal(run("nearswap", [other], base, t=-1.0), base)


def test_arcee_fusion_takes_only_the_outlying_important_entries():
    torch.manual_seed(15)
    base = torch.randn(16, 32)
    model = base + 0.01 * torch.randn(16, 32)
    model[3, 7] += 2.0  # one large, important change
    out = run("arcee_fusion", [model], base)
    # importance: |change| times the KL divergence of the row's softmax from the base row's
    p, q = torch.softmax(model, -1) + 1e-8, torch.softmax(base, -1) + 1e-8
    importance = (model - base).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
    ordered = importance.flatten().sort().values
    n = ordered.numel() - 1
    q1, median, q3 = ordered[n // 4], ordered[n // 2], ordered[3 * n // 4]
    expected = torch.where(importance >= median + 1.5 * (q3 - q1), model, base)
    assert torch.equal(out, expected)
    changed = (out != base).nonzero().tolist()
    assert [3, 7] in changed and len(changed) < 0.2 * base.numel()  # row 3 diverges most
    assert torch.equal(run("arcee_fusion", [base.clone()], base), base)  # no change: the base


def test_ram_averages_the_changes_beyond_epsilon():
    base = torch.zeros(4)
    d1 = torch.tensor([0.5, 0.001, 0.3, 0.0])
    d2 = torch.tensor([0.1, 0.2, 0.001, 0.0])
    out = run("ram", [d1, d2], base, epsilon=0.01)
    torch.testing.assert_close(out, torch.tensor([0.3, 0.2, 0.3, 0.0]))


def test_ramplus_boosts_each_models_unique_changes_by_its_overlap():
    base = torch.zeros(6)
    d1 = torch.tensor([0.5, 0.4, 0.3, 0.2, 0.0, 0.0])  # 1 shared (entry 0), 3 unique
    d2 = torch.tensor([0.1, 0.0, 0.0, 0.0, 0.6, 0.0])  # 1 shared, 1 unique
    out = run("ramplus_tl", [d1, d2], base, epsilon=0.01, r=0.5, alpha=0.5)
    boost1 = 1 + 0.5 * min(1 / 3, 0.5)
    boost2 = 1 + 0.5 * min(1 / 1, 0.5)
    expected = torch.tensor([0.3, 0.4 * boost1, 0.3 * boost1, 0.2 * boost1, 0.6 * boost2, 0.0])
    torch.testing.assert_close(out, expected)
    # r = 0: RAM
    torch.testing.assert_close(run("ramplus_tl", [d1, d2], base, epsilon=0.01, r=0.0),
                               run("ram", [d1, d2], base, epsilon=0.01))


NEW_METHOD_PARAMS = {"nearswap": {"t": 0.3}, "sce": {"select_topk": 0.4},
                     "nuslerp": {"nuslerp_flatten": False}}


@pytest.mark.parametrize("name", ["nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion",
                                  "ram", "ramplus_tl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_new_methods_honour_out_and_workspace_and_keep_sources(name, dtype):
    torch.manual_seed(16)
    method = get_method(name)
    count = method.max_models or 3
    base = torch.randn(40, 30).to(dtype)
    tensors = [(base.float() + 0.1 * torch.randn(40, 30)).to(dtype) for _ in range(count)]
    copies = [t.clone() for t in tensors + [base]]
    model_params = [{**method.model_defaults, "weight": w} for w in (0.5, 0.3, 0.2)[:count]]
    params = {**method.method_defaults, **NEW_METHOD_PARAMS.get(name, {})}
    given_base = base if method.uses_base else None
    fresh = method.function(tensors, given_base, model_params, params, None)
    assert fresh.dtype == dtype and fresh.shape == base.shape
    for _ in range(2):
        ws = Workspace(cache=True)
        out = torch.empty_like(base)
        assert method.function(tensors, given_base, model_params, params, None, ws, out) is out
        assert torch.equal(out, fresh)
    assert all(torch.equal(a, b) for a, b in zip(tensors + [base], copies))  # sources untouched
