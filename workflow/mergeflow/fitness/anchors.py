"""``anchors`` fitness (MERGE³'s Estimate): a candidate answers the anchor items only, and an
IRT estimator turns those answers into the search split's accuracy with its posterior sd.

Keys (schema ``fitness_anchors``): ``estimator`` (mean, pirt, gpirt, mpirt, gmpirt) and
``anchors`` (``strategy``, ``n``, ``seed``: which anchor set of ``results/anchors/`` is used).
"""

from __future__ import annotations

from pathlib import Path

from mergeflow.errors import MergeflowError
from mergeflow.fitness.base import FitnessKind, TaskFitness

# estimators whose ability is tied to the endpoints' (their names in the IRT fit)
ENDPOINT_ESTIMATORS = ("mpirt", "gmpirt")


def task_fitness(task: str, tcfg: dict, files: dict[str, str], cfg) -> TaskFitness:
    from mergeflow.data import read_split
    from mergeflow.irt.anchors import read_anchors
    from mergeflow.irt.estimators import Estimator
    from mergeflow.irt.model import load_irt

    estimator_name = cfg.fitness["estimator"]
    anchors = read_anchors(files["anchors"])
    fit = load_irt(Path(files["irt"]).parent) if estimator_name != "mean" else None
    thetas = cfg.endpoints if estimator_name in ENDPOINT_ESTIMATORS else None
    estimator = Estimator(estimator_name, anchors, fit, endpoint_thetas=thetas, seed=cfg.seed)
    items = read_split(files["split"])
    ids = set(anchors["item_id"].astype(str))
    subset = items[items["item_id"].astype(str).isin(ids)].reset_index(drop=True)
    if len(subset) != len(ids):
        raise MergeflowError(f"task {task!r}: {len(ids) - len(subset)} anchor items of {files['anchors']!r} are not "
                             f"in the search split {files['split']!r}")
    return TaskFitness(task, subset, tcfg["scorer"], tcfg["target_delimiter"], estimator)


KIND = FitnessKind("anchors", needs=("split", "anchors", "irt"), estimates=True, task_fitness=task_fitness)
