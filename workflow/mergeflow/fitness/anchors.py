"""``anchors`` fitness (MERGE³'s Estimate): a candidate answers the anchor items only, and an
IRT estimator turns those answers into the search split's accuracy with its posterior sd.

Keys (schema ``fitness_anchors``): ``estimator`` (mean, pirt, gpirt, mpirt, gmpirt) and
``anchors`` (``strategy``, ``n``, ``seed``: which anchor set of ``results/anchors/`` is used).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mergeflow.data import read_split
from mergeflow.errors import MergeflowError
from mergeflow.fitness.base import FitnessContext, FitnessKind, TaskFitness
from mergeflow.irt.anchors import read_anchors
from mergeflow.irt.estimators import Estimator
from mergeflow.irt.fit import load_irt
from mergeflow.irt.responses import load_response_matrix

# estimators whose ability is tied to the endpoints' (their names in the IRT fit)
ENDPOINT_ESTIMATORS = ("mpirt", "gmpirt")


def needs(fitness_cfg: dict) -> tuple[str, ...]:
    """The IRT fit and the calibration population (how far the IRT estimate errs there, and
    the blends' λ and ρ) for every estimator but ``mean``."""
    return ("irt", "calibration") if fitness_cfg["estimator"] != "mean" else ()


def estimator_for(ctx: FitnessContext, items: pd.DataFrame) -> Estimator:
    """The run's estimator (``ctx.fitness["estimator"]``) over ``items`` (columns ``item_id``,
    ``weight``): the accuracy on the search split from the answers to those items alone. An
    endpoint estimator measures ability from the base model; every IRT estimator is calibrated
    on the calibration population."""
    name, files = ctx.fitness["estimator"], ctx.files
    fit = load_irt(Path(files["irt"]).parent) if name != "mean" else None
    thetas = list(ctx.endpoints) if name in ENDPOINT_ESTIMATORS else None
    origin = ctx.base if name in ENDPOINT_ESTIMATORS and ctx.base else None
    calibration = load_response_matrix(files["calibration"]) if name != "mean" else None
    return Estimator(name, items, fit, endpoint_thetas=thetas, calibration=calibration, seed=ctx.seed,
                     origin_theta=origin)


def anchor_items(task: str, files: dict[str, str]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The search split, its rows that are anchors (in split order), and the anchor set."""
    anchors = read_anchors(files["anchors"])
    items = read_split(files["split"])
    ids = set(anchors["item_id"].astype(str))
    subset = items[items["item_id"].astype(str).isin(ids)].reset_index(drop=True)
    if len(subset) != len(ids):
        raise MergeflowError(f"task {task!r}: {len(ids) - len(subset)} anchor items of {files['anchors']!r} are not "
                             f"in the search split {files['split']!r}")
    return items, subset, anchors


def check_irt_population(config: dict, run: str) -> None:
    """An estimator other than ``mean`` needs an IRT fit, and the fit a calibration population."""
    estimator = config["runs"][run]["evolve"]["fitness"]["estimator"]
    calibration = config["irt"]["calibration"]
    checkpoints = bool(config.get("zoo")) and calibration["checkpoints"]
    if estimator != "mean" and not (calibration["random_merges"] or checkpoints or calibration["responses"]):
        raise MergeflowError(
            f"config: runs.{run}.evolve.fitness.estimator {estimator!r} needs an IRT fit, but irt.calibration has no "
            "population to fit it to: set irt.calibration.random_merges, give irt.calibration.responses, or use "
            "estimator 'mean'")


def check(config: dict, run: str) -> None:
    """An IRT fit where the estimator needs one, and an anchor set that fits in every objective's
    search split."""
    check_irt_population(config, run)
    evolve = config["runs"][run]["evolve"]
    n = evolve["fitness"]["anchors"]["n"]
    for task in evolve["objectives"]:
        size = config["tasks"][task]["splits"]["search"]
        if n > size:
            raise MergeflowError(f"config: runs.{run}.evolve.fitness.anchors.n: {n} anchor items, more than the search "
                                 f"split of task {task!r} ({size}, tasks.{task}.splits.search)")


def task_fitness(ctx: FitnessContext) -> TaskFitness:
    _, subset, anchors = anchor_items(ctx.task, ctx.files)
    return TaskFitness.of(ctx, subset, estimator_for(ctx, anchors))


KIND = FitnessKind("anchors", needs=lambda fitness_cfg: ("split", "anchors") + needs(fitness_cfg),
                   estimates=lambda fitness_cfg, split_size: True, task_fitness=task_fitness,
                   anchor_set=lambda fitness_cfg: fitness_cfg["anchors"], check=check,
                   seeded_keys=(("anchors", "seed"),), flat_keys=("estimator", "anchors"))
