"""Accuracy estimators: correctness of the simple cases, uncertainty, speed, bad input."""

import time

import numpy as np
import pandas as pd
import pytest

from mergeflow.errors import MergeflowError
from mergeflow.irt.anchors import select_anchors
from mergeflow.irt import ESTIMATORS as METHODS
from mergeflow.irt.estimators import Estimator, estimate_accuracy
from mergeflow.irt.model import fit_irt
from mergeflow.irt.simulate import simulate_irt


@pytest.fixture(scope="module")
def data():
    sim = simulate_irt(50, 400, seed=5)
    train = sim.matrix.select_models(sim.matrix.models[:40])
    fit = fit_irt(train, steps=150, min_steps=150)
    return sim, train, fit


def responses_of(sim, row):
    return pd.Series(sim.matrix.matrix[row], index=sim.matrix.items)


def test_mean_is_the_anchor_weighted_mean():
    anchors = pd.DataFrame({"item_id": ["a", "b", "c"], "weight": [0.5, 0.25, 0.25]})
    estimate = estimate_accuracy("mean", anchors, {"a": 1, "b": 0, "c": 1})
    assert estimate.value == pytest.approx(0.75)
    assert estimate.sd > 0


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_value_and_an_sd(data, method):
    sim, train, fit = data
    anchors = select_anchors(train, fit, strategy="irt", n=30, seed=0)
    estimator = Estimator(method, anchors, fit, endpoint_thetas=fit.models[:3], calibration=train)
    estimate = estimator(responses_of(sim, 45))
    assert 0.0 <= estimate.value <= 1.0
    assert 0.0 < estimate.sd < 0.5
    if method in ("gpirt", "gmpirt"):
        assert 0.0 <= estimate.lam <= 1.0


def test_irt_estimate_is_exact_when_every_item_is_an_anchor(data):
    sim, _, fit = data
    anchors = pd.DataFrame({"item_id": fit.item_ids, "weight": 1.0})
    y = responses_of(sim, 47)
    assert estimate_accuracy("pirt", anchors, y, fit).value == pytest.approx(y.mean())


def test_pirt_beats_the_anchor_mean_on_average(data):
    sim, train, fit = data
    anchors = select_anchors(train, fit, strategy="random", n=20, seed=1)
    errors = {}
    for method in ("mean", "pirt"):
        estimator = Estimator(method, anchors, fit)
        errors[method] = np.mean([abs(estimator(responses_of(sim, j)).value - sim.matrix.matrix[j].mean())
                                  for j in range(40, 50)])
    assert errors["pirt"] < errors["mean"] + 0.02


def test_a_single_estimate_is_fast(data):
    sim, train, fit = data
    anchors = select_anchors(train, fit, strategy="irt", n=100, seed=0)
    for method in METHODS:
        estimator = Estimator(method, anchors, fit, endpoint_thetas=fit.models[:3], calibration=train)
        y = responses_of(sim, 41)
        rounds = []
        for _ in range(3):  # the best of three rounds: another process on the cores only slows some
            started = time.perf_counter()
            for _ in range(10):
                estimator(y)
            rounds.append((time.perf_counter() - started) / 10)
        assert min(rounds) < 0.1, (method, rounds)


def test_bad_estimator_input(data):
    sim, train, fit = data
    anchors = select_anchors(train, fit, strategy="random", n=10, seed=0)
    first = anchors["item_id"].iloc[0]
    partial = responses_of(sim, 42).drop(index=first)
    with pytest.raises(MergeflowError, match="no response for anchor"):
        Estimator("pirt", anchors, fit)(partial)
    with pytest.raises(MergeflowError, match="not 0 or 1"):
        Estimator("pirt", anchors, fit)(responses_of(sim, 42).replace({1.0: 0.5}))
    with pytest.raises(MergeflowError, match="endpoint"):
        Estimator("mpirt", anchors, fit)
    with pytest.raises(MergeflowError, match="needs an IRT fit"):
        Estimator("gpirt", anchors, None)
    with pytest.raises(MergeflowError, match="estimator"):
        Estimator("magic", anchors, fit)


def test_blend_weight_rules():
    from mergeflow.irt.estimators import blend_weight

    anchor = np.array([0.1, -0.1, 0.1, -0.1])
    irt = np.array([0.02, 0.02, 0.02, 0.02])
    assert blend_weight(anchor, irt, "variance") == pytest.approx(0.0004 / (0.0004 + 0.01))
    fitted = blend_weight(anchor, irt, "fitted")
    assert 0.0 <= fitted <= 1.0
    grid = np.linspace(0, 1, 1001)
    best = grid[np.argmin([np.mean((w * anchor + (1 - w) * irt) ** 2) for w in grid])]
    assert fitted == pytest.approx(best, abs=1e-3)


def test_multidimensional_fit_with_every_method():
    sim = simulate_irt(30, 120, seed=8, dim=2)
    train = sim.matrix.select_models(sim.matrix.models[:25])
    fit = fit_irt(train, kind="m2pl", dim=2, steps=60, min_steps=60)
    anchors = select_anchors(train, fit, strategy="irt", n=15, seed=0)
    for method in METHODS:
        estimate = Estimator(method, anchors, fit, endpoint_thetas=fit.models[:2], calibration=train)(
            responses_of(sim, 28))
        assert 0.0 <= estimate.value <= 1.0 and estimate.sd > 0
        if method != "mean":
            assert len(estimate.theta) == 2


def test_mpirt_sees_a_merge_better_than_both_parents_and_says_how_sure_it_is():
    """Endpoints at θ = −0.5 and 0, the base at −1, and held-out "merges" at θ = 1.2: a convex
    combination of the endpoints could not go past 0; the affine form around the base does, and
    ±1.96 sd covers the truth about 95% of the time instead of collapsing."""
    theta = np.concatenate([[-1.0, -0.5, 0.0], np.linspace(-1.5, 1.5, 40), np.full(40, 1.2)])
    sim = simulate_irt(len(theta), 1000, seed=3, theta=theta)
    train = sim.matrix.select_models(sim.matrix.models[:43])
    fit = fit_irt(train, steps=300, min_steps=300)
    truth = sim.probabilities()[43:].mean(axis=1)
    anchors = select_anchors(train, fit, strategy="irt", n=50, seed=0)
    estimator = Estimator("mpirt", anchors, fit, endpoint_thetas=fit.models[1:3], origin_theta=fit.models[0])
    better_parent = sim.probabilities()[2].mean()
    estimates = [estimator(responses_of(sim, row)) for row in range(43, 83)]
    values, sds = np.array([e.value for e in estimates]), np.array([e.sd for e in estimates])
    assert np.mean(values) > better_parent + 0.1  # not capped at the better parent
    assert np.mean(np.abs(values - truth)) < 0.04
    assert 0.85 <= np.mean(np.abs(values - truth) <= 1.96 * sds) <= 1.0
    assert sds.min() > 0.01
