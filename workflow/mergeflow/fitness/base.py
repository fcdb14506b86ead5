"""What every fitness kind shares: a task's scorer, and merging and scoring one candidate.

The sources stay resident and each candidate is written into one preallocated model (see
:class:`mergeflow.merge.InMemoryMerger`); a kind only decides which items a candidate answers
and how its answers become an estimate of the search split's accuracy.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import pandas as pd

if TYPE_CHECKING:
    from mergeflow.evaluate import EvalSettings
    from mergeflow.evolve.stages import EvolveConfig

log = logging.getLogger(__name__)


@dataclass
class TaskFitness:
    """One task's fitness: the items scored per candidate and, for estimated fitness, the
    estimator (answers by item id -> an ``Estimate`` with ``value`` and ``sd``)."""

    task: str
    items: pd.DataFrame
    scorer: str
    delimiter: str = " "
    estimator: Callable | None = None

    def score(self, model, tokenizer, settings: "EvalSettings") -> tuple[float, float]:
        from mergeflow.evaluate import evaluate_items

        responses = evaluate_items(model, tokenizer, self.items, self.scorer, settings, self.delimiter)
        if self.estimator is None:
            p = float(responses["correct"].mean())
            return p, math.sqrt(p * (1 - p) / len(responses))
        estimate = self.estimator(dict(zip(responses["item_id"], responses["correct"])))
        return float(estimate.value), float(estimate.sd)


@dataclass(frozen=True)
class FitnessKind:
    """A registered fitness kind.

    ``needs``: the files it reads per task, by name; the workflow maps each name to a path in
    one place (``NEED_PATHS`` in ``workflow/rules/evolve.smk``): ``split`` (the search split),
    ``anchors`` (the anchor set the kind's config names), ``irt`` (the task's IRT fit,
    ``items.parquet``). ``estimates``: its fitness is an estimate of the whole search split's
    accuracy, so the final merge is checked against that split. ``task_fitness(task, tcfg,
    files, cfg)`` builds the task's scorer from the task's config and those files.
    """

    name: str
    needs: tuple[str, ...]
    estimates: bool
    task_fitness: Callable[[str, dict, dict[str, str], "EvolveConfig"], TaskFitness]


@dataclass
class CandidateResult:
    """Per-task fitness, sd and items of one candidate; ``problem`` says why it got the worst fitness."""

    fitness: dict[str, float]
    sd: dict[str, float]
    items: dict[str, int]
    problem: str | None
    wall_s: float


def evaluate_candidate(merger, tokenizer, recipe, tasks: list[TaskFitness], settings: "EvalSettings") -> CandidateResult:
    """Merge ``recipe`` in memory and score it; non-finite weights or fitness become a problem."""
    t0 = time.perf_counter()
    model = merger.merge(recipe)
    bad = merger.nonfinite_tensors()
    fitness = {t.task: float("nan") for t in tasks}
    sd = {t.task: float("nan") for t in tasks}
    if bad:
        problem = f"merged weights hold NaN or Inf in {len(bad)} tensor(s), e.g. {bad[0]!r}"
    else:
        problem = None
        for task in tasks:
            fitness[task.task], sd[task.task] = task.score(model, tokenizer, settings)
            if not math.isfinite(fitness[task.task]):
                problem = f"fitness on task {task.task!r} is not finite"
    if problem:
        log.warning("candidate gets the worst fitness: %s", problem)
    return CandidateResult(fitness, sd, {t.task: len(t.items) for t in tasks}, problem, time.perf_counter() - t0)
