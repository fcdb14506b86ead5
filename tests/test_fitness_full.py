"""The ``full`` fitness kind: every candidate answers the whole search split, in-process as the
rules call the stages."""

import numpy as np
import pandas as pd
import torch
import yaml

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


def test_a_search_choosing_among_the_newer_methods_runs_and_replays(stages, tmp_path):
    """Two generations on the tiny zoo over a space whose per-group method is one of the methods
    mergekit 0.1.5 added (with SCE's select_topk searched): every candidate merges and scores,
    the optimizer rebuilt from the history alone asks what the pickle asks, and the best row's
    recipe merges again into the model that scored it."""
    from mergeflow.evolve.search import replay
    from mergeflow.evolve.stages import restore_optimizer
    from mergeflow.merge import InMemoryMerger, recipe_from_yaml
    from stage_runs import with_run

    config, _, files, paths = stages
    space = {"method": ["nuslerp", "multislerp", "karcher", "sce", "ramplus_tl", "model_stock"], "layer_groups": 2,
             "parameters": {"weight": {"min": 0.1, "max": 1.5}}, "method_parameters": {"select_topk": {"min": 0.2, "max": 1.0}}}
    config = with_run(config, "newer", search_space=space, population=4)
    cfg = EvolveConfig.from_config(config, "newer")
    previous = run_generations(cfg, config, {"math_l2": {"split": files["split"]}}, tmp_path, 2)
    history = pd.read_parquet(previous)
    assert len(history) == 8 and (history["problem"] == "").all() and history["fitness_math_l2"].between(0, 1).all()
    chosen = {s["merge_method"] for r in history["recipe"] for s in yaml.safe_load(r)["slices"]}
    assert len(chosen) >= 3, chosen  # the genomes choose among the methods
    pickled = restore_optimizer(cfg, cfg.search_settings(), str(tmp_path / "gen_1" / "optimizer.pkl"), previous)
    replayed = replay(cfg.search_settings(), history, None, cfg.kind.extra_columns)
    np.testing.assert_array_equal(pickled.ask().value, replayed.ask().value)
    best = hist.best_row(history, cfg.result)
    recipe = recipe_from_yaml(best["recipe"])
    again = recipe_from_yaml(cfg.space().to_recipe(np.asarray(best["genome"]), seed=recipe.seed).to_yaml())
    assert again == recipe  # the genome alone gives the recipe back
    merger = InMemoryMerger([paths["math"], paths["lang"]], base_model=paths["base"])
    first = {k: v.clone() for k, v in merger.merge(recipe).state_dict().items()}
    second = merger.merge(again).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
