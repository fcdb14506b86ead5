"""Anchor items (MERGE³'s Extract step): a few items whose responses stand for the whole split.

Strategies, each returning ``n`` anchors whose weights sum to 1:

* ``random``: uniform without replacement; stratified by subscenario when the items have one
  (proportional allocation), each anchor weighted by its stratum's share of the items divided by
  the anchors drawn from it.
* ``correctness``: K-means (K = n) on the items' response vectors over the calibration models;
  the anchor of a cluster is its member nearest the centroid, weighted by the cluster's share of
  the items.
* ``irt``: the same on the items' posterior mean parameters (α₁..α_d, β).
"""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
import pandas as pd

from mergeflow.errors import MergeflowError
from mergeflow.irt import STRATEGIES
from mergeflow.irt.fit import IRTFit, item_key
from mergeflow.irt.responses import ResponseMatrix

ANCHOR_COLUMNS = ["item_id", "weight", "strategy", "seed"]


def select_anchors(
    matrix: ResponseMatrix | None,
    fit: IRTFit | None,
    strategy: str = "random",
    n: int = 100,
    seed: int = 0,
    subscenario: Mapping | pd.Series | None = None,
) -> pd.DataFrame:
    """Pick ``n`` anchor items; returns a frame with ``item_id, weight, strategy, seed`` and,
    when ``matrix`` is given, ``variance``.

    ``matrix`` is needed for ``random`` and ``correctness``; ``fit`` for ``irt`` (whose item
    universe is the fit's items). ``subscenario`` (item_id -> label) overrides the matrix's own
    labels for stratifying ``random``.

    Each anchor stands for a stratum (its cluster, or its subscenario for random anchors); its
    ``variance`` is p̄(1 − p̄) of a draw from that stratum, p̄ a model's accuracy on the stratum,
    averaged over the matrix's models. The weighted mean's variance is then the stratified
    Σ w² · variance, which credits what stratifying gains over a simple random sample. (The
    anchor's own deviation from its cluster on these models would be smaller, but the clusters
    were fitted to them: on ChemBench's held-out models that in-sample figure covered 66–71%.)
    """
    if strategy not in STRATEGIES:
        raise MergeflowError(f"anchor strategy {strategy!r}: expected one of {STRATEGIES}")
    if strategy == "irt":
        if fit is None:
            raise MergeflowError("anchor strategy 'irt' needs an IRT fit")
        items = list(fit.item_ids)
    else:
        if matrix is None:
            raise MergeflowError(f"anchor strategy {strategy!r} needs a response matrix")
        items = list(matrix.items)
    _check_size(n, len(items))
    rng = np.random.default_rng(seed)
    if strategy == "random":
        labels = _labels(matrix, subscenario, items)
        positions, weights = _stratified_random(labels, n, rng)
    else:
        features = _correctness_features(matrix) if strategy == "correctness" else _irt_features(fit)
        positions, weights, labels = _cluster_anchors(features, n, seed, rng)
    frame = pd.DataFrame({
        "item_id": [items[position] for position in positions],
        "weight": weights,
        "strategy": strategy,
        "seed": seed,
    })[ANCHOR_COLUMNS]
    if matrix is not None:
        frame["variance"] = _stratum_variances(matrix, items, positions, labels)
    return frame


def _stratum_variances(matrix: ResponseMatrix, items: list, positions: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per anchor: the mean over ``matrix``'s models of p̄(1 − p̄), p̄ the model's accuracy on the
    anchor's stratum (the items that share its label)."""
    columns = pd.Index([item_key(item) for item in matrix.items]).get_indexer([item_key(item) for item in items])
    values = np.full((matrix.matrix.shape[0], len(items)), np.nan)
    known = columns >= 0
    values[:, known] = matrix.matrix[:, columns[known]]
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for position in positions:
            stratum = np.nanmean(values[:, labels == labels[position]], axis=1)
            out.append(float(np.nanmean(stratum * (1 - stratum))))
    return np.nan_to_num(np.array(out), nan=0.25)


def read_anchors(path) -> pd.DataFrame:
    """Read an anchors parquet and check its columns and weights."""
    frame = pd.read_parquet(path)
    missing = [column for column in ANCHOR_COLUMNS if column not in frame.columns]
    if missing:
        raise MergeflowError(f"anchors file {path} lacks columns {missing}")
    validate_anchors(frame, str(path))
    return frame


def validate_anchors(anchors: pd.DataFrame, name: str = "anchors") -> None:
    for column in ("item_id", "weight"):
        if column not in anchors.columns:
            raise MergeflowError(f"{name} has no column {column!r}")
    if anchors.empty:
        raise MergeflowError(f"{name} is empty")
    if anchors["item_id"].duplicated().any():
        raise MergeflowError(f"{name} lists item {anchors['item_id'][anchors['item_id'].duplicated()].iloc[0]!r} twice")
    weights = anchors["weight"].to_numpy(dtype=float)
    if (weights < 0).any() or not np.isfinite(weights).all() or weights.sum() <= 0:
        raise MergeflowError(f"{name}: weights must be finite, non-negative and not all zero")


def _check_size(n: int, n_items: int) -> None:
    if n < 1:
        raise MergeflowError(f"number of anchors n={n}: must be at least 1")
    if n > n_items:
        raise MergeflowError(f"number of anchors n={n} exceeds the {n_items} items available")


def _labels(matrix: ResponseMatrix, subscenario, items: list) -> np.ndarray:
    """Each item's subscenario label; one common label when there are none."""
    mapping = subscenario if subscenario is not None else matrix.subscenarios
    if mapping is None or len(mapping) == 0:
        return np.full(len(items), "")
    if isinstance(mapping, pd.Series):
        mapping = mapping.to_dict()
    labels = [mapping.get(item) for item in items]
    return np.array(["" if label is None else str(label) for label in labels])


def _stratified_random(labels: np.ndarray, n: int,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Proportional stratified sampling; a single stratum is plain uniform sampling."""
    strata, counts = np.unique(labels, return_counts=True)
    allocation = _largest_remainder(counts, n)
    positions, weights = [], []
    for stratum, count, take in zip(strata, counts, allocation):
        if take == 0:
            continue
        members = np.flatnonzero(labels == stratum)
        positions.append(rng.choice(members, size=take, replace=False))
        weights.append(np.full(take, count / labels.size / take))
    return np.concatenate(positions), np.concatenate(weights)


def _largest_remainder(counts: np.ndarray, n: int) -> np.ndarray:
    """Proportional integer allocation of n over strata, at most ``count`` per stratum."""
    quota = counts / counts.sum() * n
    allocation = np.minimum(np.floor(quota).astype(int), counts)
    order = np.argsort(-(quota - np.floor(quota)), kind="stable")
    while allocation.sum() < n:
        for stratum in order:
            if allocation.sum() == n:
                break
            if allocation[stratum] < counts[stratum]:
                allocation[stratum] += 1
    return allocation


def _correctness_features(matrix: ResponseMatrix) -> np.ndarray:
    """Items × models correctness, missing cells filled with the item's mean (0.5 if none)."""
    values = matrix.matrix.T.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        item_mean = np.nanmean(values, axis=1)
    item_mean = np.where(np.isnan(item_mean), 0.5, item_mean)
    missing = np.isnan(values)
    values[missing] = np.broadcast_to(item_mean[:, None], values.shape)[missing]
    return values


def _irt_features(fit: IRTFit) -> np.ndarray:
    return np.column_stack([fit.alpha_mean(), fit.beta_mean()])


def _cluster_anchors(features: np.ndarray, n: int, seed: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """K-means with K = n; one representative per cluster, weighted by the cluster's mass;
    also every item's cluster.

    When there are fewer distinct feature vectors than n, some clusters come back empty; the
    missing anchors are then drawn at random from the largest clusters, which share their
    cluster's weight equally with its representative.
    """
    # scikit-learn (about a second to import) only where anchors are clustered: the searches that
    # read an anchor set, and the workflow's config check, import this module too
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        kmeans = KMeans(n_clusters=n, n_init=1, random_state=seed).fit(features)
    labels = kmeans.labels_
    distances = np.linalg.norm(features - kmeans.cluster_centers_[labels], axis=1)
    members = {cluster: np.flatnonzero(labels == cluster) for cluster in np.unique(labels)}
    chosen: dict[int, list[int]] = {
        cluster: [int(idx[np.argmin(distances[idx])])] for cluster, idx in members.items()
    }
    while sum(len(picks) for picks in chosen.values()) < n:
        spare = {cluster: np.setdiff1d(members[cluster], chosen[cluster]) for cluster in chosen}
        cluster = max(spare, key=lambda c: (spare[c].size / (len(chosen[c]) + 1), -c))
        chosen[cluster].append(int(rng.choice(spare[cluster])))
    positions, weights = [], []
    for cluster, picks in chosen.items():
        mass = members[cluster].size / features.shape[0]
        positions.extend(picks)
        weights.extend([mass / len(picks)] * len(picks))
    return np.array(positions), np.array(weights), labels
