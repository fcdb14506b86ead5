"""A search over models whose vocabularies differ: the config's ``tokenizer_source`` lets the check
pass them, every parameter merge (calibration, search, baseline) writes the output vocabulary,
and the resident merger scores candidates through it. Bad settings are named before any job."""

import copy
from pathlib import Path

import pandas as pd
import pytest

from factories import with_added_tokens
from mergeflow.baseline import baseline_model
from mergeflow.check import run_model_check
from mergeflow.config import check_config, validate_config
from mergeflow.errors import MergeflowError
from mergeflow.evaluate import EvalSettings, load_tokenizer
from mergeflow.evolve.stages import EvolveConfig
from mergeflow.merge import merge_to_dir, recipe_from_yaml
from stage_runs import run_generations


@pytest.fixture(scope="module")
def tok_config(stages, tmp_path_factory):
    """The stages' config with the lang expert replaced by a copy holding two added tokens."""
    config, _, files, paths = stages
    lang_tok = with_added_tokens(Path(paths["lang"]), tmp_path_factory.mktemp("tok") / "lang_tok",
                                 ["<tool>", "<call>"], seed=3)
    config = copy.deepcopy(config)
    config["models"]["lang"] = {"path": lang_tok}
    config["tokenizer_source"] = "union"
    return validate_config(config), files, {**paths, "lang": lang_tok}


def test_the_check_passes_differing_vocabularies_only_with_a_tokenizer_source(tok_config, tmp_path):
    config, _, _ = tok_config
    report = run_model_check("lang", config["models"], "base", tmp_path / "lang.json", "union")
    assert report["vocab_size"] == 83
    with pytest.raises(MergeflowError, match=r"model 'lang': token '<tool>' \(id 81\) is not in the base 'base' "
                                             r"vocabulary; set the config's tokenizer_source"):
        run_model_check("lang", config["models"], "base", tmp_path / "refused.json")
    assert not (tmp_path / "refused.json").exists()


def test_bad_tokenizer_sources_are_named(tok_config):
    config, _, _ = tok_config
    with pytest.raises(MergeflowError, match="tokenizer_source 'vocab' is neither base, union nor one of models"):
        check_config({**config, "tokenizer_source": "vocab"})
    dfs = copy.deepcopy(config)
    dfs["runs"]["full"]["evolve"]["search_space"] = {"kind": "dis"}
    with pytest.raises(MergeflowError, match=r"runs\.full\.evolve\.search_space\.kind is 'dis': tokenizer_source"):
        check_config(validate_config(dfs))


def test_a_search_calibration_and_baseline_merge_through_the_union_vocabulary(tok_config, tmp_path):
    from mergeflow.calibrate import random_merge_responses
    from mergeflow.data import read_split

    config, files, paths = tok_config
    cfg = EvolveConfig.from_config(config, "full")
    assert cfg.space().tokenizer_source == "union"
    history = pd.read_parquet(run_generations(cfg, config, {"math_l2": {"split": files["split"]}}, tmp_path, 1))
    assert (history["problem"] == "").all() and history["fitness_math_l2"].between(0, 1).all()
    best = recipe_from_yaml(history.sort_values("loss")["recipe"].iloc[0])
    assert best.tokenizer_source == "union"
    merged = merge_to_dir(best, tmp_path / "best")
    vocab = load_tokenizer(merged).get_vocab()
    assert len(vocab) == 83 and {"<tool>", "<call>"} <= set(vocab)

    items = read_split(files["split"]).head(8)
    space_cfg = {**config["irt"]["calibration"]["search_space"], "tokenizer_source": "union"}
    responses = random_merge_responses(paths["base"], [paths["math"], paths["lang"]], space_cfg, 2, 0, items,
                                       "mc_loglik", " ", EvalSettings.from_config(config["evaluation"]))
    assert len(responses) == 16 and set(responses["correct"]) <= {0, 1}

    baseline_model({**config["baseline"], "tokenizer_source": "union"}, paths["base"], [paths["math"], paths["lang"]],
                   str(tmp_path / "baseline.yaml"), str(tmp_path / "baseline"))
    assert len(load_tokenizer(tmp_path / "baseline").get_vocab()) == 83
