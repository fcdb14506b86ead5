"""Fitness of a merge recipe: merge in memory, score on the search split or on anchors.

``full`` fitness is the accuracy on the whole search split. ``anchors`` fitness scores the
candidate on the anchor items only and asks an IRT estimator (MERGE³'s Estimate step) for the
full-split accuracy and its posterior predictive sd. Either way the sources stay resident and
each candidate is written into one preallocated model.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import pandas as pd

from mergeflow.evaluate import EvalSettings, evaluate_items

log = logging.getLogger(__name__)


@dataclass
class TaskFitness:
    """One task's fitness: the items scored per candidate and, for anchors, the estimator."""

    task: str
    items: pd.DataFrame
    scorer: str
    delimiter: str = " "
    estimator: object | None = None  # mergeflow.irt.estimators.Estimator for anchored fitness

    def score(self, model, tokenizer, settings: EvalSettings) -> tuple[float, float]:
        responses = evaluate_items(model, tokenizer, self.items, self.scorer, settings, self.delimiter)
        if self.estimator is None:
            p = float(responses["correct"].mean())
            return p, math.sqrt(p * (1 - p) / len(responses))
        estimate = self.estimator(dict(zip(responses["item_id"], responses["correct"])))
        return float(estimate.value), float(estimate.sd)


@dataclass
class CandidateResult:
    """Per-task fitness and sd of one candidate; ``problem`` says why it got the worst fitness."""

    fitness: dict[str, float]
    sd: dict[str, float]
    items: int
    problem: str | None
    wall_s: float


def evaluate_candidate(merger, tokenizer, recipe, tasks: list[TaskFitness], settings: EvalSettings) -> CandidateResult:
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
    return CandidateResult(fitness, sd, sum(len(t.items) for t in tasks), problem, time.perf_counter() - t0)
