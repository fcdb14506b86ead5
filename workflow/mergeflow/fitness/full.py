"""``full`` fitness: accuracy on the task's whole search split."""

from __future__ import annotations

from mergeflow.data import read_split
from mergeflow.fitness.base import FitnessContext, FitnessKind, TaskFitness


def task_fitness(ctx: FitnessContext) -> TaskFitness:
    return TaskFitness.of(ctx, read_split(ctx.files["split"]))


KIND = FitnessKind("full", needs=lambda fitness_cfg: ("split",), estimates=lambda fitness_cfg, split_size: False,
                   task_fitness=task_fitness)
