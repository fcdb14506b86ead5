"""What every fitness kind shares: a task's scorer at a rung, and merging and scoring one candidate.

A generation's candidates climb the kind's rungs (one rung for ``full`` and ``anchors``): at
rung r a candidate answers that rung's items of each task, reusing its answers from lower rungs
(only the items it has not seen are evaluated), and the kind turns all its answers at the rung
into an estimate of the search split's accuracy with an sd. The sources stay resident and each
candidate is written into one preallocated model (see :class:`mergeflow.merge.InMemoryMerger`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

from mergeflow.evaluate import EvalSettings, chat_keys, evaluate_items
from mergeflow.evolve.history import RESULTS

log = logging.getLogger(__name__)


@dataclass
class TaskFitness:
    """One task's fitness at one rung: the items a candidate answers there and, for estimated
    fitness, the estimator (answers by item id -> an ``Estimate`` with ``value`` and ``sd``);
    without one, the fitness is the accuracy on the items. A label-free fitness has ``score``
    instead, (model, tokenizer, settings) -> (fitness, sd) on the items: then no item is answered
    right or wrong, and no gold answer is read."""

    task: str
    items: pd.DataFrame
    scorer: str
    delimiter: str = " "
    estimator: Callable | None = None
    chat: dict = field(default_factory=dict)  # the task's own chat keys (see EvalSettings.for_task)
    score: Callable[[Any, Any, EvalSettings], tuple[float, float]] | None = None

    @classmethod
    def of(cls, ctx: "FitnessContext", items: pd.DataFrame, estimator: Callable | None = None) -> "TaskFitness":
        """The scorer of ``ctx``'s task over ``items``: its scorer, delimiter and chat keys."""
        tcfg = ctx.task_config
        return cls(ctx.task, items, tcfg["scorer"], tcfg["target_delimiter"], estimator, chat_keys(tcfg))

    def new_items(self, known: dict) -> pd.DataFrame:
        """The items whose answers are not in ``known`` (item id -> 0/1)."""
        return self.items[~self.items["item_id"].isin(known)]

    def answer(self, model, tokenizer, settings: EvalSettings, known: dict) -> dict:
        """Answers (item id -> 0/1) to every item of the rung, evaluating only the new ones."""
        todo = self.new_items(known)
        answers = {item: known[item] for item in self.items["item_id"] if item in known}
        if len(todo):
            responses = evaluate_items(model, tokenizer, todo, self.scorer, settings.for_task(self.chat), self.delimiter)
            answers.update(zip(responses["item_id"], responses["correct"].astype(int)))
        return answers

    def estimate(self, answers: dict) -> tuple[float, float]:
        """The fitness and its sd from the answers to this rung's items."""
        if self.estimator is None:
            p = sum(answers[item] for item in self.items["item_id"]) / len(self.items)
            return float(p), math.sqrt(p * (1 - p) / len(self.items))
        estimate = self.estimator({item: answers[item] for item in self.items["item_id"]})
        return float(estimate.value), float(estimate.sd)


@dataclass(frozen=True)
class FitnessContext:
    """What a kind builds a task's scorer from (its ``task_fitness``): the task, its config
    section and the files the kind needs for it (need name -> path), the run's ``fitness``
    mapping, the endpoints' and the base model's names (how estimators find them in an IRT
    fit), the run's seed, and the generation and rung being scored."""

    task: str
    task_config: dict
    files: dict[str, str]
    fitness: dict
    endpoints: tuple[str, ...] = ()
    base: str = ""
    seed: int = 0
    generation: int = 0
    rung: int = 0


@dataclass
class ScoredCandidate:
    """A candidate just scored, as a kind's ``extras`` hook sees it: the resident merger (its
    model holds the candidate's merge), the tokenizer, the search space, the candidate's genome
    and recipe seed, the tasks' scorers, the evaluation settings and the scores."""

    merger: Any
    tokenizer: Any
    space: Any
    genome: np.ndarray
    seed: int
    tasks: list[TaskFitness]
    settings: EvalSettings
    result: "CandidateResult"


@dataclass(frozen=True)
class FitnessKind:
    """A registered fitness kind.

    - ``needs(fitness_cfg)``: the files it reads per task, by name; the workflow maps each name
      to a path in one place (:data:`mergeflow.fitness.NEED_PATHS`):
      ``split`` (the search split), ``anchors`` (the anchor set ``anchor_set`` names), ``irt``
      (the task's IRT fit, ``items.parquet``), ``calibration`` (the calibration population's
      responses), ``teacher`` (a teacher model's outputs on the search split, read without its
      answers: the teach stage's file).
    - ``estimates(fitness_cfg, split_size)``: whether the fitness the search ends on is an
      estimate of the accuracy on a search split of ``split_size`` items (then the final merge
      is checked against that split).
    - ``task_fitness(ctx)``: the task's scorer at a rung of a generation (:class:`FitnessContext`).
    - ``rungs(fitness_cfg)``: how many rungs a generation's candidates climb (default 1).
    - ``first_rung(fitness_cfg, generation)``: the rung a generation's candidates all start at
      (default 0; Hyperband-style brackets start some generations higher).
    - ``promoted(fitness_cfg, population, step)``: how many candidates move on from the
      ``step``-th rung they climb (0: the generation's first rung) to the next (kinds with several
      rungs).
    - ``anchor_set(fitness_cfg)``: the anchor set it reads (``strategy``, ``n``, ``seed``).
    - ``check(config, run)``: cross-checks of the run's fitness against the rest of the
      validated config that the schema cannot express; raises ``MergeflowError`` naming the key.
    - ``extra_columns`` and ``extras(fitness_cfg, scored)``: more per-task values the fitness
      job computes for each candidate (a :class:`ScoredCandidate`), task -> column -> value
      (a number or a vector; NaN ones for a candidate with a problem). The job writes them into
      its shard, the history keeps the objectives' weighted mean of each, and the tell hands
      them to the optimizer by column name (``optimizer.tell(candidate, loss, **extras)``).
    - ``result``: what the search ends on (:data:`mergeflow.evolve.history.RESULTS`): ``best``, the
      candidate of lowest loss at the highest rung reached, or ``last``, the best of the last
      generation (a search that moves its candidates a step at a time, each of whose fitnesses
      rests on too few items to pick across steps by).
    - ``gradient_genes(space)``: the genes of ``space`` its gradients move beside an evolutionary
      optimizer that moves the rest (:class:`mergeflow.evolve.search.Hybrid`); None or empty: none.
    - ``seeded_keys``: the keys of its mapping (paths of keys) that a run's seed should move
      when a search is repeated over seeds (anchor sets, rung items, minibatches).
    - ``flat_keys``: the keys the older flat spelling ``fitness: KIND`` set beside it, read into
      the mapping by ``mergeflow.config.upgrade_config``.
    - ``reads_answers(fitness_cfg)``: whether it reads the search split's gold answers; only a
      fitness that does not can search a task whose search prompts come without them
      (``tasks.<task>.search_source``).
    - ``fitness_label(fitness_cfg)``: what the fitness is where it is not an accuracy (or an
      estimate of one) but, say, a label-free loss's negative, as figures name it; None for an
      accuracy (figures then draw it in percent).
    - ``batch_invariant``: whether what its jobs write follows from the answers alone, not from the
      evaluation's batch size (:data:`mergeflow.evaluate.ANSWER_NEUTRAL`); then the batch size is
      not among their parameters.
    """

    name: str
    needs: Callable[[dict], tuple[str, ...]]
    estimates: Callable[[dict, int], bool]
    task_fitness: Callable[[FitnessContext], TaskFitness]
    rungs: Callable[[dict], int] = lambda fitness_cfg: 1
    first_rung: Callable[[dict, int], int] = lambda fitness_cfg, generation: 0
    promoted: Callable[[dict, int, int], int] | None = None
    anchor_set: Callable[[dict], dict] | None = None
    check: Callable[[dict, str], None] = lambda config, run: None
    extra_columns: tuple[str, ...] = ()
    extras: Callable[[dict, ScoredCandidate], dict[str, dict[str, Any]]] | None = None
    result: str = "best"
    gradient_genes: Callable[[Any], tuple[int, ...]] | None = None
    seeded_keys: tuple[tuple[str, ...], ...] = ()
    flat_keys: tuple[str, ...] = ()
    batch_invariant: bool = True
    reads_answers: Callable[[dict], bool] = lambda fitness_cfg: True
    fitness_label: Callable[[dict], str | None] = lambda fitness_cfg: None

    def __post_init__(self) -> None:
        if self.result not in RESULTS:
            raise ValueError(f"fitness kind {self.name!r}: result {self.result!r} is not one of {RESULTS}")
        if (self.extras is None) != (not self.extra_columns):
            raise ValueError(f"fitness kind {self.name!r}: extras and extra_columns go together")

    def climbed(self, fitness_cfg: dict, generation: int) -> range:
        """The rungs generation ``generation``'s candidates climb: from its first to the top."""
        return range(self.first_rung(fitness_cfg, generation), self.rungs(fitness_cfg))

    def reseeded(self, fitness_cfg: dict, seed: int) -> dict:
        """A copy of ``fitness_cfg`` whose ``seeded_keys`` are all ``seed``."""
        out = copy.deepcopy(fitness_cfg)
        for path in self.seeded_keys:
            node = out
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = seed
        return out


@dataclass
class CandidateResult:
    """Per-task fitness, sd, answers and newly evaluated items of one candidate at one rung;
    ``problem`` says why it got the worst fitness."""

    fitness: dict[str, float]
    sd: dict[str, float]
    answers: dict[str, dict]
    items: dict[str, int]
    problem: str | None
    wall_s: float


def evaluate_candidate(merger, tokenizer, recipe, tasks: list[TaskFitness], settings: EvalSettings,
                       known: dict[str, dict] | None = None, problem: str | None = None) -> CandidateResult:
    """Merge ``recipe`` in memory (or assemble a layer path) and score it on each task's items it
    has not answered yet (``known``: task -> item id -> 0/1); non-finite weights or fitness become
    a problem. A ``problem`` given (a path deeper than the space allows) skips both: the
    candidate gets the worst loss having cost no item."""
    t0 = time.perf_counter()
    known = known or {}
    fitness = {t.task: float("nan") for t in tasks}
    sd = {t.task: float("nan") for t in tasks}
    answers: dict[str, dict] = {t.task: {} for t in tasks}
    items = {t.task: len(t.new_items(known.get(t.task, {}))) if problem is None else 0 for t in tasks}
    if problem is not None:
        log.warning("candidate gets the worst fitness without evaluation: %s", problem)
        return CandidateResult(fitness, sd, answers, items, problem, time.perf_counter() - t0)
    model = merger.merge(recipe) if any(items.values()) else None
    bad = merger.nonfinite_tensors() if model is not None else []
    if bad:
        problem = f"merged weights hold NaN or Inf in {len(bad)} tensor(s), e.g. {bad[0]!r}"
    else:
        problem = None
        for task in tasks:
            if task.score is not None:  # label-free: no answers
                fitness[task.task], sd[task.task] = task.score(model, tokenizer, settings)
            else:
                answers[task.task] = task.answer(model, tokenizer, settings, known.get(task.task, {}))
                fitness[task.task], sd[task.task] = task.estimate(answers[task.task])
            if not math.isfinite(fitness[task.task]):
                problem = f"fitness on task {task.task!r} is not finite"
    if problem:
        log.warning("candidate gets the worst fitness: %s", problem)
    return CandidateResult(fitness, sd, answers, items, problem, time.perf_counter() - t0)
