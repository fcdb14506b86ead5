"""Data-flow merging in the workflow: a PS search, then a DFS search over {the PS merge, lang}
(a run's final merge as a source model), and a DIS search, in one micro Snakemake run."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml

from test_workflow import kill_when, micro_config, resume, snakemake, snakemake_command


def paths_config() -> dict:
    """The micro config's zoo, tasks and models (so a copy of its finished run has them done) and
    data-flow runs instead of its runs."""
    config = micro_config()
    config["models"]["ps"] = {"run": "ps"}
    evolve = {"objectives": {"math_l2": 1.0}, "population": 3, "generations": 2, "fitness": {"kind": "full"}}
    config["runs"] = {
        "ps": {"tasks": ["math_l2"], "evolve": {**evolve, "search_space": {
            "method": "task_arithmetic", "parameters": {"weight": {"min": 0.0, "max": 1.5}}}}},
        # PS+DFS: the PS merge is model A; paths deeper than 5 layers get the worst loss
        "psdfs": {"tasks": ["math_l2"], "evolve": {**evolve, "population": 4, "generations": 3, "sigma": 0.3,
                                                   "search_space": {"kind": "dfs", "a": "ps", "b": "lang",
                                                                    "repeats": 2, "max_layers": 5}}},
        "dis": {"tasks": ["math_l2"], "evolve": {**evolve, "init": {"math": 1.0}, "search_space": {
            "kind": "dis", "models": ["math", "lang"], "max_layers": 4}}},
    }
    return config


@pytest.fixture(scope="module")
def path_run(finished_run, tmp_path_factory):
    """The data-flow runs, in a copy of the finished micro run: its zoo, data, responses and IRT
    fits are up to date there, so only the new runs and the summaries are computed."""
    workdir = tmp_path_factory.mktemp("paths")
    shutil.copytree(finished_run[0], workdir, symlinks=True, dirs_exist_ok=True)
    config = paths_config()
    result = snakemake(workdir, config)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, config


@pytest.mark.slow
def test_ps_then_dfs_runs_end_to_end(path_run):
    from transformers import AutoConfig

    workdir, _ = path_run
    runs = workdir / "results" / "runs"
    history = pd.read_parquet(runs / "psdfs" / "evolve" / "history.parquet")
    assert len(history) == 12
    ps_merge = "results/runs/ps/final/merge"
    first = yaml.safe_load(history.sort_values(["generation", "index"]).iloc[0]["recipe"])
    assert first["merge_method"] == "passthrough" and first["base_model"] == ps_merge
    # deeper than max_layers: the worst loss, no item spent
    deep = history[history["problem"].str.contains("deeper than max_layers")]
    assert (deep["loss"] == 1.0).all() and (deep["items"] == 0).all()
    assert (history.loc[history["problem"] == "", "items"] == 60).all()
    # the final merge is a plain Llama of the path's depth, scored on the test split, its card lists the path
    merge = runs / "psdfs" / "final" / "merge"
    best = yaml.safe_load((merge / "mergeflow_recipe.yaml").read_text())
    depth = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in best["slices"])
    loaded = AutoConfig.from_pretrained(merge)
    assert loaded.num_hidden_layers == depth and loaded.architectures == ["LlamaForCausalLM"]
    assert not hasattr(loaded, "auto_map")
    table = pd.read_parquet(runs / "psdfs" / "final" / "test.parquet")
    assert set(table["model"]) >= {"merged", "math", "lang", "base"}
    card = (runs / "psdfs" / "final" / "model" / "README.md").read_text()
    assert "## Layer path" in card and "| hop | model | layer | input scale |" in card and "## Evaluation" in card
    dis = pd.read_parquet(runs / "dis" / "evolve" / "history.parquet")
    assert len(dis) == 6 and "merged (psdfs)" in (workdir / "results" / "summary.md").read_text()


@pytest.mark.slow
def test_a_changed_ps_search_reruns_the_dfs_search(path_run, tmp_path):
    """The DFS run reads the PS run's final merge: changing only the PS search plans both again,
    and not the DIS run's search."""
    from test_workflow import planned_jobs

    workdir, config = path_run
    assert "Nothing to be done" in snakemake(workdir, config, "-n").stdout
    changed = json.loads(json.dumps(config))
    changed["runs"]["ps"]["evolve"]["search_space"]["parameters"]["weight"]["max"] = 1.2
    jobs = planned_jobs(snakemake(workdir, changed, "-n").stdout)
    assert any(j.startswith("tell[") and "run=psdfs" in j for j in jobs)
    assert any(j.startswith("tell[") and "run=ps," in j for j in jobs)
    # the DIS run's search and merge stay (its provenance, which records the whole config, is redone)
    search = ("ask[", "fitness[", "tell[", "history[", "final_merge[", "final_respond[")
    assert not [j for j in jobs if "run=dis" in j and j.startswith(search)], jobs


@pytest.mark.slow
def test_killed_dfs_search_resumes_to_the_same_history(path_run, tmp_path):
    """SIGKILL the DFS search during generation 1, rerun with --rerun-incomplete: the same bytes."""
    workdir, config = path_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, symlinks=True)
    shutil.rmtree(copy / "results" / "runs" / "psdfs" / "evolve")
    target = "results/runs/psdfs/evolve/history.parquet"
    cmd = snakemake_command(copy, config, target)
    kill_when(cmd, copy / "results" / "runs" / "psdfs" / "evolve" / "gen_1" / "candidates.parquet",
              "the run ended before generation 1 was scored")
    assert not (copy / target).exists()
    resume(cmd)
    assert (copy / target).read_bytes() == (workdir / target).read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (lambda c: c["runs"]["psdfs"]["evolve"]["search_space"].update(repeats=0),
     "runs.psdfs.evolve.search_space.repeats: 0 is less than the minimum of 1"),
    (lambda c: c["runs"]["psdfs"]["evolve"]["search_space"].update(b="nobody"),
     "runs.psdfs.evolve.search_space names model 'nobody', which is not one of models"),
    (lambda c: c["runs"]["psdfs"]["evolve"]["search_space"].update(scale={"min": 0.0, "max": 1.0}),
     "runs.psdfs.evolve.search_space.scale.min: 0.0 is not positive"),
    (lambda c: c["runs"]["dis"]["evolve"]["search_space"].update(scale={"min": -0.5, "max": 2.0}),
     "runs.dis.evolve.search_space.scale.min: -0.5 is not positive"),
    (lambda c: c["models"].update(ps={"run": "psdfs"}),
     "runs psdfs -> psdfs read each other's final merge in a circle"),
    (lambda c: c.update(endpoints=["math", "ps"]), "model 'ps' is a run's final merge and cannot be the base_model"),
])
def test_bad_data_flow_configs_stop_before_any_job(tmp_path, change, message):
    """What the workflow does at parse time (common.smk), before any job: each message names the key."""
    from mergeflow.config import validate_config
    from mergeflow.errors import MergeflowError
    from mergeflow.evolve.stages import EvolveConfig

    config = paths_config()
    change(config)
    with pytest.raises(MergeflowError) as err:
        validate_config(config)
        for run in config["runs"]:
            EvolveConfig.from_config(config, run)
    assert message in str(err.value)


@pytest.mark.slow
def test_a_source_with_another_hidden_size_stops_the_workflow(tmp_path):
    config = paths_config()
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "config.json").write_text(json.dumps({"hidden_size": 96, "num_hidden_layers": 2}))
    lang = tmp_path / "lang"
    lang.mkdir()
    (lang / "config.json").write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 2}))
    config["models"].update(wide={"path": str(wide)}, lang={"path": str(lang)})
    config["runs"]["dis"]["evolve"]["search_space"]["models"] = ["lang", "wide"]
    config["runs"]["dis"]["evolve"]["search_space"]["base_model"] = "lang"
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0
    assert ("runs.dis.evolve.search_space: model 'wide' has hidden_size 96, model 'lang' 32"
            in result.stdout + result.stderr), result.stderr[-2000:]
    assert not (tmp_path / "results").exists()
