"""A fitness kind is a plug-in: one defined only here, with an extra column and the ``last``
result, runs two generations through ask / fitness / tell without the stages, the history or
the optimizer's tell naming it."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from mergeflow.data import read_split
from mergeflow.evolve import history as hist
from mergeflow.evolve import search
from mergeflow.evolve.search import replay
from mergeflow.evolve.stages import EvolveConfig
from mergeflow.fitness import FITNESS, FitnessContext, FitnessKind, ScoredCandidate, TaskFitness
from stage_runs import run_generations


def task_fitness(ctx: FitnessContext) -> TaskFitness:
    """The first 10 items of the search split, another 10 each generation."""
    items = read_split(ctx.files["split"]).iloc[10 * ctx.generation:10 * (ctx.generation + 1)]
    return TaskFitness(ctx.task, items.reset_index(drop=True), ctx.task_config["scorer"],
                       ctx.task_config["target_delimiter"])


def extras(fitness_cfg: dict, scored: ScoredCandidate) -> dict[str, dict]:
    """Per task, a vector the toy optimizer is told: the fitness and the genome's first gene."""
    return {fit.task: {"toy_signal": [scored.result.fitness[fit.task], float(scored.genome[0])]}
            for fit in scored.tasks}


TOY = FitnessKind("toy", needs=lambda fitness_cfg: ("split",), estimates=lambda fitness_cfg, size: True,
                  task_fitness=task_fitness, extra_columns=("toy_signal",), extras=extras, result="last")


class Stepper:
    """A toy optimizer: one candidate per generation, each gene 0.1 higher than the last; it keeps
    what it is told."""

    def __init__(self, settings: search.SearchSettings):
        self.x, self.told = np.full(settings.dim, 0.2), []

    def ask(self) -> search.Step:
        return search.Step(self.x.copy())

    def tell(self, candidate, loss: float, toy_signal: np.ndarray) -> None:
        self.told.append((loss, toy_signal.tolist()))
        self.x = np.clip(candidate.value + 0.1, 0.0, 1.0)


@pytest.fixture
def toy_kind(monkeypatch):
    monkeypatch.setitem(FITNESS, "toy", TOY)
    monkeypatch.setitem(search.GRADIENT_OPTIMIZERS, "Stepper", Stepper)


def test_a_kind_defined_here_runs_two_generations_with_its_extra_column_and_its_result(stages, tmp_path, toy_kind):
    config, _, files, _ = stages
    cfg = dataclasses.replace(EvolveConfig.from_config(config, "full"), fitness={"kind": "toy"},
                              optimizer="Stepper", population=1)
    previous = run_generations(cfg, config, {"math_l2": {"split": files["split"]}}, tmp_path, 2)
    shard = pd.read_parquet(tmp_path / "gen_1" / "fitness_0.parquet")
    assert list(shard.columns) == [*hist.SHARD_COLUMNS, "toy_signal"] and list(shard["items"]) == [10]
    history = pd.read_parquet(previous)
    assert list(history.columns[-2:]) == ["loss_math_l2", "toy_signal"]  # the kind's extra, after the losses
    assert [g[0] for g in history["genome"]] == pytest.approx([0.2, 0.3])
    signals = [list(v) for v in history["toy_signal"]]
    assert signals == [[f, g[0]] for f, g in zip(history["fitness_math_l2"], history["genome"])]
    # the optimizer was told each row's extra, by name; a replay of the history tells it the same
    replayed = replay(cfg.search_settings(), history, None, cfg.kind.extra_columns)
    assert replayed.told == [(loss, signal) for loss, signal in zip(history["loss"], signals)]
    # the search ends on its last candidate, whatever its fitness
    assert cfg.result == "last" and hist.best_row(history, cfg.result)["generation"] == 1
    assert (tmp_path / "gen_1" / "best" / "recipe.yaml").read_text() == history["recipe"].iloc[-1]


def test_a_kind_s_extras_and_result_are_checked_when_it_is_declared():
    with pytest.raises(ValueError, match="result 'first' is not one of"):
        dataclasses.replace(TOY, result="first")
    with pytest.raises(ValueError, match="extras and extra_columns go together"):
        dataclasses.replace(TOY, extras=None)
