"""The ``anchors`` fitness kind (MERGE³'s Estimate): candidates answer the anchor items only and
an IRT estimator gives the search split's accuracy; its checks name the key at fault."""

import copy

import pandas as pd
import pytest

from mergeflow.config import validate_config
from mergeflow.errors import MergeflowError
from mergeflow.evolve import history as hist
from mergeflow.evolve.stages import EvolveConfig
from stage_runs import run_generations


def test_two_generations_of_ask_fitness_tell_answer_the_anchors_only(stages, tmp_path):
    config, _, files, _ = stages
    cfg = EvolveConfig.from_config(config, "anchored")
    needs = cfg.kind.needs(cfg.fitness)
    assert needs == ("split", "anchors", "irt", "calibration")
    history = pd.read_parquet(run_generations(cfg, config, {"math_l2": {n: files[n] for n in needs}}, tmp_path, 2))
    assert len(history) == 6 and set(history["items"]) == {8} and (history["problem"] == "").all()
    assert history["fitness_math_l2"].between(0, 1).all() and history["sd_math_l2"].gt(0).all()
    best = hist.best_row(history, cfg.result)
    assert (tmp_path / "gen_1" / "best" / "recipe.yaml").read_text() == best["recipe"]


def test_an_estimator_without_an_irt_population_is_named(stages):
    config = copy.deepcopy(stages[0])
    config["irt"]["calibration"]["random_merges"] = 0
    with pytest.raises(MergeflowError, match=r"runs\.anchored\.evolve\.fitness\.estimator 'gmpirt' needs an IRT fit"):
        validate_config(config)


def test_more_anchors_than_the_search_split_are_named(stages):
    config = copy.deepcopy(stages[0])
    config["runs"]["anchored"]["evolve"]["fitness"]["anchors"]["n"] = 41
    with pytest.raises(MergeflowError, match=r"runs\.anchored\.evolve\.fitness\.anchors\.n: 41 anchor items, more "
                                             r"than the search split of task 'math_l2' \(40"):
        validate_config(config)


def test_the_flat_spelling_reads_into_the_mapping():
    """``fitness: anchors`` with the kind's keys beside it, as older configs wrote it."""
    from mergeflow.config import upgrade_config

    config = {"runs": {"r": {"evolve": {"fitness": "anchors", "estimator": "pirt", "anchors": {"n": 5}}},
                       "f": {"evolve": {"fitness": "full", "estimator": "pirt"}}}}
    upgrade_config(config)
    assert config["runs"]["r"]["evolve"] == {"fitness": {"kind": "anchors", "estimator": "pirt", "anchors": {"n": 5}}}
    assert config["runs"]["f"]["evolve"] == {"fitness": {"kind": "full"}}  # a key the kind does not read is dropped
