"""Experts fine-tuned by the workflow (``models: {NAME: {finetune: ...}}``): the training run on the
tiny zoo's base, its determinism, and bad recipes named before any model is loaded."""

import copy
import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from mergeflow.config import validate_config
from mergeflow.errors import MergeflowError
from mergeflow.evaluate import EvalSettings, evaluate_items, load_causal_lm
from mergeflow.finetune import finetune
from mergeflow.locations import finetune_model_dir, local_model_dir


def pairs_file(path, n: int = 64):
    """Two digits, and the answer is the second: a skill the tiny base lacks and learns in a few
    dozen steps (the zoo's word-level tokenizer knows digits, not words like "plus")."""
    rows = [{"a": a, "b": b, "sum": b} for a in range(10) for b in range(10)][:n]
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def recipe(source, **keys) -> dict:
    return {"finetune": {"from": "base", "source": {"path": str(source)}, "template": "{a} plus {b} is",
                         "answer": "sum", "steps": 100, "batch_size": 16, "lr": 0.003, **keys}}


def config_with(models: dict) -> dict:
    return {"models": models, "base_model": "base", "endpoints": [m for m in models if m != "base"],
            "tasks": {"t": {"source": {"path": __file__}, "template": "{q}", "answer": "a", "scorer": "exact_match",
                            "splits": {"search": 1, "test": 1}}},
            "runs": {"table": {}}}


def test_a_fine_tune_learns_its_pairs_and_is_reproducible(tiny_zoo, tmp_path):
    source = pairs_file(tmp_path / "sums.parquet")
    spec = recipe(source)
    torch.set_num_threads(1)
    finetune("adder", spec, tiny_zoo / "base", tmp_path / "a")
    finetune("adder", spec, tiny_zoo / "base", tmp_path / "b")
    record = json.loads((tmp_path / "a" / "finetune.json").read_text())
    assert record["pairs"] == 64 and len(record["losses"]) == 100
    assert record["loss"]["last10"] < 0.5 * record["loss"]["first"]
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(tiny_zoo / "base" / "model.safetensors")
    assert torch.equal(a["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # embeddings stay
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])

    # it answers the pairs it was trained on by generation, stopping at the EOS it learned
    settings = EvalSettings.from_config({"max_new_tokens": 4})
    items = pd.DataFrame({"item_id": [str(i) for i in range(64)], "prompt": [f"{r.a} plus {r.b} is" for r in
                          pd.read_parquet(source).itertuples()], "choices": [[]] * 64, "answer": -1,
                          "target": [str(s) for s in pd.read_parquet(source)["sum"]]})
    scores = {}
    for name, path in (("base", tiny_zoo / "base"), ("tuned", tmp_path / "a")):
        model, tokenizer = load_causal_lm(path, settings)
        scores[name] = evaluate_items(model, tokenizer, items, "exact_match", settings)["correct"].mean()
    assert scores["tuned"] > scores["base"] + 0.2, scores


def test_a_fine_tune_lives_in_results_finetune_named_by_its_recipe(tmp_path):
    source = pairs_file(tmp_path / "sums.parquet")
    first, second = recipe(source), recipe(source, steps=101)
    assert str(finetune_model_dir(first)).startswith("results/finetune/base-")
    assert finetune_model_dir(first) == local_model_dir(copy.deepcopy(first))
    assert finetune_model_dir(first) != finetune_model_dir(second)


def test_too_few_pairs_for_a_batch_are_named(tiny_zoo, tmp_path):
    source = pairs_file(tmp_path / "sums.parquet", n=8)
    with pytest.raises(MergeflowError, match=r"models\.adder\.finetune: the source has 8 pairs, fewer than one batch"):
        finetune("adder", recipe(source), tiny_zoo / "base", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_column_the_data_lacks_is_named(tiny_zoo, tmp_path):
    source = pairs_file(tmp_path / "sums.parquet")
    with pytest.raises(MergeflowError, match=r"models\.adder\.finetune: template or answer names column\(s\) \['total'\]"):
        finetune("adder", recipe(source, answer="total"), tiny_zoo / "base", tmp_path / "out")


@pytest.mark.parametrize("models, message", [
    ({"adder": {"finetune": {"from": "nobody"}}}, r"model 'adder': finetune\.from 'nobody' is not one of models"),
    ({"adder": {"finetune": {"from": "other"}}, "other": {"finetune": {"from": "adder"}}},
     r"models adder -> other -> adder are fine-tuned from each other in a circle"),
    ({"adder": {"finetune": {"source": {"path": "/no/such.parquet"}}}},
     r"model 'adder': finetune\.source: file '/no/such\.parquet' does not exist"),
    ({"adder": {"finetune": {"template": "{a} plus {} is"}}}, r"models\.adder\.finetune\.template: field \{\} .* is not a column name"),
])
def test_bad_recipes_are_named_before_any_job(tmp_path, models, message):
    source = pairs_file(tmp_path / "sums.parquet")
    full = {"base": {"path": str(tmp_path)}}
    for name, spec in models.items():
        full[name] = recipe(source)
        full[name]["finetune"].update(spec["finetune"])
    with pytest.raises(MergeflowError, match=message):
        validate_config(config_with(full))


@pytest.mark.slow
def test_the_workflow_fine_tunes_an_expert_once_and_again_when_its_recipe_changes(tiny_zoo, tmp_path):
    """finetune_model writes the expert the check then reads; a second run does nothing; a changed
    step count trains a new directory beside the old, which stays as it was."""
    from test_workflow import check_report, planned_jobs, snakemake

    source = pairs_file(tmp_path / "sums.parquet")
    config = config_with({"base": {"path": str(tiny_zoo / "base")}, "adder": recipe(source, steps=5)})
    first = validate_config(copy.deepcopy(config))["models"]["adder"]
    result = snakemake(tmp_path, config, "check_models")
    assert result.returncode == 0, result.stderr[-3000:]
    trained = tmp_path / finetune_model_dir(first)
    assert json.loads((trained / "finetune.json").read_text())["finetune"]["steps"] == 5
    assert check_report(tmp_path, "adder")["fingerprint"]
    again = snakemake(tmp_path, config, "-n", "check_models")
    assert again.returncode == 0 and planned_jobs(again.stdout) == [], again.stdout[-2000:]

    before = (trained / "model.safetensors").read_bytes()
    config["models"]["adder"]["finetune"]["steps"] = 6
    changed = snakemake(tmp_path, config, "-n", "check_models")
    second = finetune_model_dir(validate_config(copy.deepcopy(config))["models"]["adder"])
    assert planned_jobs(changed.stdout) == ["check_model[model=adder]", "check_models", f"finetune_model[slug={second.name}]"]
    assert (trained / "model.safetensors").read_bytes() == before
