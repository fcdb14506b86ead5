"""Anchor selection: sizes, weights, stratification, degenerate inputs."""

import numpy as np
import pytest

from mergeflow.errors import MergeflowError
from mergeflow.irt.anchors import select_anchors
from mergeflow.irt.model import fit_irt
from mergeflow.irt.responses import ResponseMatrix
from mergeflow.irt.simulate import simulate_irt


@pytest.fixture(scope="module")
def data():
    sim = simulate_irt(30, 200, seed=4)
    return sim.matrix, fit_irt(sim.matrix, steps=60, min_steps=60)


@pytest.mark.parametrize("strategy", ["random", "correctness", "irt"])
def test_each_strategy_gives_n_weighted_anchors(data, strategy):
    matrix, fit = data
    anchors = select_anchors(matrix, fit, strategy=strategy, n=20, seed=3)
    assert list(anchors.columns) == ["item_id", "weight", "strategy", "seed", "variance"]
    assert anchors["variance"].between(0, 0.25).all()
    assert len(anchors) == 20 and anchors["item_id"].is_unique
    assert set(anchors["item_id"]) <= set(matrix.items)
    assert np.isclose(anchors["weight"].sum(), 1.0) and (anchors["weight"] > 0).all()
    assert (anchors["strategy"] == strategy).all() and (anchors["seed"] == 3).all()
    again = select_anchors(matrix, fit, strategy=strategy, n=20, seed=3)
    assert anchors.equals(again)


def test_stratum_variance_is_that_of_a_draw_from_the_anchors_cluster(data):
    """Random anchors stand for the whole split: p(1 - p) of each model, averaged; cluster
    anchors for their cluster, where a model's answers agree more, so the stratified variance
    of the weighted mean is below the simple random sample's."""
    matrix, fit = data
    accuracy = np.nanmean(matrix.matrix, axis=1)
    random = select_anchors(matrix, fit, strategy="random", n=20, seed=3)
    assert np.allclose(random["variance"], np.mean(accuracy * (1 - accuracy)))
    clustered = select_anchors(matrix, fit, strategy="correctness", n=20, seed=3)
    stratified = np.sum(clustered["weight"] ** 2 * clustered["variance"])
    assert stratified < np.sum(random["weight"] ** 2 * random["variance"])
    without = select_anchors(None, fit, strategy="irt", n=20, seed=3)
    assert "variance" not in without  # no responses to measure it on: the mean falls back to binomial


def test_more_anchors_than_items_is_an_error(data):
    matrix, fit = data
    with pytest.raises(MergeflowError, match="exceeds"):
        select_anchors(matrix, fit, strategy="irt", n=201)
    with pytest.raises(MergeflowError, match="at least 1"):
        select_anchors(matrix, fit, strategy="random", n=0)
    with pytest.raises(MergeflowError, match="strategy"):
        select_anchors(matrix, fit, strategy="best", n=5)


def test_random_anchors_are_stratified_by_subscenario(data):
    matrix, _ = data
    labels = {item: ("big" if item < 150 else "small") for item in matrix.items}
    anchors = select_anchors(matrix, None, strategy="random", n=20, seed=0, subscenario=labels)
    picked = [labels[item] for item in anchors["item_id"]]
    assert picked.count("big") == 15 and picked.count("small") == 5
    weights = anchors.groupby([labels[i] for i in anchors["item_id"]])["weight"].sum()
    assert np.isclose(weights["big"], 0.75) and np.isclose(weights["small"], 0.25)


def test_clustering_with_fewer_distinct_items_than_anchors():
    values = np.tile(np.array([[1.0, 0.0, 1.0, 0.0]]).T, (1, 10)).T  # 10 models, 4 items, 2 patterns
    values = np.repeat(values, 5, axis=1)  # 20 items, 2 distinct response vectors
    matrix = ResponseMatrix(values, [f"m{j}" for j in range(10)], list(range(20)))
    anchors = select_anchors(matrix, None, strategy="correctness", n=6, seed=0)
    assert len(anchors) == 6 and anchors["item_id"].is_unique
    assert np.isclose(anchors["weight"].sum(), 1.0)
