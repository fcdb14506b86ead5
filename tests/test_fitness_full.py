"""The ``full`` fitness kind: every candidate answers the whole search split, in-process as the
rules call the stages."""

import pandas as pd

from mergeflow.evolve import history as hist
from mergeflow.evolve.stages import EvolveConfig
from stage_runs import run_generations


def test_two_generations_of_ask_fitness_tell_score_the_whole_search_split(stages, tmp_path):
    config, _, files, _ = stages
    cfg = EvolveConfig.from_config(config, "full")
    assert cfg.kind.needs(cfg.fitness) == ("split",) and cfg.result == "best"
    history = pd.read_parquet(run_generations(cfg, config, {"math_l2": {"split": files["split"]}}, tmp_path, 2))
    assert len(history) == 6 and set(history["items"]) == {40} and (history["problem"] == "").all()
    assert history["fitness_math_l2"].between(0, 1).all() and history["sd_math_l2"].gt(0).all()
    best = hist.best_row(history, cfg.result)
    assert best["loss"] == history["loss"].min()
    assert (tmp_path / "gen_1" / "best" / "recipe.yaml").read_text() == best["recipe"]
    assert "candidate 0" in (tmp_path / "gen_1" / "fitness_0.log").read_text()
