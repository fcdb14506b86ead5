"""``full`` fitness: accuracy on the task's whole search split."""

from __future__ import annotations

from mergeflow.fitness.base import FitnessKind, TaskFitness


def task_fitness(task: str, tcfg: dict, files: dict[str, str], cfg, rung: int = 0,
                 generation: int = 0) -> TaskFitness:
    from mergeflow.data import read_split

    return TaskFitness(task, read_split(files["split"]), tcfg["scorer"], tcfg["target_delimiter"])


KIND = FitnessKind("full", needs=lambda fitness_cfg: ("split",), estimates=lambda fitness_cfg, split_size: False,
                   task_fitness=task_fitness)
