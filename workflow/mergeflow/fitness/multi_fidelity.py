"""``multi_fidelity`` fitness: successive halving inside each generation, where the fidelity is
the number of items (Su & Geiping's multi-fidelity search, with MERGE³'s IRT estimators at the
rungs below the whole split).

All P candidates answer rung 0's items; the best ⌈P/η⌉ move on to rung 1, and so on. A rung's
items are a superset of the rung below's (nested), so a promoted candidate answers only the items
it has not seen yet. Rung 0 is the anchor set (``lowest: anchors``, its size ``rungs[0]``) or a
seeded random subset of the search split (``lowest: random``); every higher rung adds items from
one seeded permutation of the rest of the split. At every rung the candidate's fitness is an
estimate of its accuracy on the whole search split with an sd — the run's ``estimator`` on the
answers so far (its anchors' weights at an anchor rung, equal weights on a random one), or the
accuracy itself where the rung is the whole split — so the optimizer is told every candidate on
one scale. ``promote: ucb`` ranks by estimate + sd instead of the estimate.

``brackets`` (Hyperband-style, optional): generation g starts all P candidates at rung
``brackets[g mod len(brackets)]`` instead of rung 0 and halves from there, so that in a fixed
cycle some generations rank every candidate on more items (and cost more).

Keys (schema ``fitness_multi_fidelity``): ``rungs``, ``eta``, ``lowest``, ``estimator``,
``anchors`` (``strategy``, ``seed``), ``promote``, ``brackets``, ``seed``.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pandas as pd

from mergeflow.data import read_split
from mergeflow.errors import MergeflowError
from mergeflow.fitness.anchors import anchor_items, check_irt_population, estimator_for
from mergeflow.fitness.anchors import needs as estimator_needs
from mergeflow.fitness.base import FitnessContext, FitnessKind, TaskFitness


def rung_items(task: str, fitness_cfg: dict, files: dict[str, str], rung: int) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """Rung ``rung``'s items of the search split, their weights (columns ``item_id``,
    ``weight``; at an anchor rung the anchor set itself), and the size of the whole split."""
    size = fitness_cfg["rungs"][rung]
    if fitness_cfg["lowest"] == "anchors":
        items, lowest, anchors = anchor_items(task, files)
    else:
        items, lowest, anchors = read_split(files["split"]), None, None
    rest = items if lowest is None else items[~items["item_id"].isin(set(lowest["item_id"]))]
    # one seeded order of the rest of the split per task: the rungs take nested prefixes of it
    rng = np.random.default_rng([fitness_cfg["seed"], zlib.crc32(task.encode())])
    order = rest.iloc[rng.permutation(len(rest))]
    chosen = order.iloc[: size - (0 if lowest is None else len(lowest))]
    if lowest is not None and rung == 0:
        return lowest, anchors, len(items)  # with the anchors' stratum variances
    subset = chosen if lowest is None else pd.concat([lowest, chosen])
    subset = items[items["item_id"].isin(set(subset["item_id"]))].reset_index(drop=True)  # split order
    weights = pd.DataFrame({"item_id": subset["item_id"], "weight": 1.0 / len(subset)})
    return subset, weights, len(items)


def task_fitness(ctx: FitnessContext) -> TaskFitness:
    items, weights, split_size = rung_items(ctx.task, ctx.fitness, ctx.files, ctx.rung)
    estimator = None if len(items) == split_size else estimator_for(ctx, weights)
    return TaskFitness.of(ctx, items, estimator)


def first_rung(fitness_cfg: dict, generation: int) -> int:
    """The rung generation ``generation`` starts at: its bracket in the cycle, else rung 0."""
    brackets = fitness_cfg.get("brackets") or [0]
    return brackets[generation % len(brackets)]


def promoted(fitness_cfg: dict, population: int, step: int) -> int:
    """Candidates that move on from the ``step``-th rung climbed: ⌈P / η^(step + 1)⌉."""
    return math.ceil(population / fitness_cfg["eta"] ** (step + 1))


def check(config: dict, run: str) -> None:
    """Rungs that increase and fit every objective's search split, a population that can be
    halved at every rung, and an IRT fit where the estimator needs one."""
    evolve = config["runs"][run]["evolve"]
    fitness_cfg, where = evolve["fitness"], f"config: runs.{run}.evolve"
    rungs, eta = fitness_cfg["rungs"], fitness_cfg["eta"]
    if any(b <= a for a, b in zip(rungs, rungs[1:])):
        raise MergeflowError(f"{where}.fitness.rungs {rungs}: each rung must have more items than the one below")
    for task in evolve["objectives"]:
        size = config["tasks"][task]["splits"]["search"]
        if rungs[-1] > size:
            raise MergeflowError(f"{where}.fitness.rungs: the top rung has {rungs[-1]} items, more than task {task!r}'s "
                                 f"search split ({size}, tasks.{task}.splits.search)")
    # each rung must keep fewer candidates than the one below: more than η^(R-2) at rung 0
    smallest = math.floor(eta ** (len(rungs) - 2)) + 1
    if evolve["population"] < smallest:
        raise MergeflowError(f"{where}.population {evolve['population']} is too small for {len(rungs)} rungs at eta "
                             f"{eta}: successive halving needs at least {smallest} candidates")
    top = [b for b in fitness_cfg.get("brackets") or [] if b >= len(rungs)]
    if top:
        raise MergeflowError(f"{where}.fitness.brackets {fitness_cfg['brackets']}: a bracket starts at rung {top[0]}, "
                             f"but the rungs are 0 to {len(rungs) - 1}")
    check_irt_population(config, run)


def needs(fitness_cfg: dict) -> tuple[str, ...]:
    return ("split",) + (("anchors",) if fitness_cfg["lowest"] == "anchors" else ()) + estimator_needs(fitness_cfg)


KIND = FitnessKind(
    "multi_fidelity", needs=needs,
    # the search ends on estimates unless its top rung is the whole split
    estimates=lambda fitness_cfg, split_size: fitness_cfg["rungs"][-1] < split_size,
    task_fitness=task_fitness, rungs=lambda fitness_cfg: len(fitness_cfg["rungs"]), first_rung=first_rung,
    promoted=promoted,
    anchor_set=lambda fitness_cfg: {**fitness_cfg["anchors"], "n": fitness_cfg["rungs"][0]}, check=check,
    seeded_keys=(("anchors", "seed"), ("seed",)),  # the anchor rung's set, and the higher rungs' items
)
