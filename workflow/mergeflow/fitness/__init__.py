"""Fitness kinds: how a candidate merge is scored on each objective during a search.

A kind is one module here plus one entry in :data:`FITNESS`; its config keys are one definition
in the schema (``fitness_<kind>``; the schema's ``fitness.kind`` enum is this registry's keys,
which a test checks). Each kind declares the files it needs per task and builds the task's
scorer from them (:class:`FitnessKind`).
"""

from __future__ import annotations

from mergeflow.fitness import anchors, full, multi_fidelity
from mergeflow.fitness.base import CandidateResult, FitnessKind, TaskFitness, evaluate_candidate

FITNESS: dict[str, FitnessKind] = {kind.name: kind for kind in [full.KIND, anchors.KIND, multi_fidelity.KIND]}

__all__ = ["FITNESS", "CandidateResult", "FitnessKind", "TaskFitness", "evaluate_candidate"]
