"""Fitness kinds: how a candidate merge is scored on each objective during a search.

A kind is one module here plus one entry in :data:`FITNESS`; its config keys are one definition
in the schema (``fitness_<kind>``; the schema's ``fitness.kind`` enum is this registry's keys,
which a test checks). Each kind declares the files it needs per task, builds the task's scorer
from them and a :class:`FitnessContext`, and carries its own checks and hooks (extra columns for
the optimizer, what the search ends on, which keys a seed moves: :class:`FitnessKind`). The
stages, the history and the figures never name a kind.
"""

from __future__ import annotations

from mergeflow.fitness import anchors, full, gradient, multi_fidelity
from mergeflow.fitness.base import (
    CandidateResult, FitnessContext, FitnessKind, ScoredCandidate, TaskFitness, evaluate_candidate,
)

FITNESS: dict[str, FitnessKind] = {kind.name: kind for kind in [full.KIND, anchors.KIND, multi_fidelity.KIND,
                                                                     gradient.KIND]}


def anchors_path(task: str, anchor_set: dict, results: str = "results") -> str:
    """Where the anchor set ``anchor_set`` (``strategy``, ``n``, ``seed``) of ``task`` is written."""
    return f"{results}/anchors/{task}/{anchor_set['strategy']}-{anchor_set['n']}-seed{anchor_set['seed']}.parquet"


# What a fitness kind may need per task (its ``needs``), as paths under ``results``: the one place
# that maps them (the workflow's input functions and the benches read it).
NEED_PATHS = {
    "split": lambda task, fit, results: f"{results}/data/{task}/search.parquet",
    "anchors": lambda task, fit, results: anchors_path(task, FITNESS[fit["kind"]].anchor_set(fit), results),
    "irt": lambda task, fit, results: f"{results}/irt/{task}/items.parquet",
    "calibration": lambda task, fit, results: f"{results}/calibration/{task}.parquet",
    "teacher": lambda task, fit, results: f"{results}/teachers/{task}/{fit['teachers'][task]}.parquet",
}


def need_paths(fitness_cfg: dict, tasks: list[str], results: str = "results") -> dict[str, dict[str, str]]:
    """Per task, the path of each file the fitness ``fitness_cfg`` needs."""
    needs = FITNESS[fitness_cfg["kind"]].needs(fitness_cfg)
    return {task: {need: NEED_PATHS[need](task, fitness_cfg, results) for need in needs} for task in tasks}


__all__ = ["FITNESS", "NEED_PATHS", "CandidateResult", "FitnessContext", "FitnessKind", "ScoredCandidate",
           "TaskFitness", "anchors_path", "evaluate_candidate", "need_paths"]
