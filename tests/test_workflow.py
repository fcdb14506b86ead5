"""A micro end-to-end run of the Snakemake workflow in a temporary directory (a smaller zoo)."""

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def micro_config() -> dict:
    """The embedded default, shrunk: a smaller zoo, two tasks, small splits."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    zoo = config["zoo"]
    zoo["model"] = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 2, "max_positions": 64}
    zoo["base"]["steps"] = 20
    for expert in zoo["experts"].values():
        expert["steps"] = 10
    zoo["checkpoint_every"] = 5
    zoo["tasks"] = ["math_l1", "math_l2"]
    zoo["task_items"] = 200
    config["tasks"] = {name: config["tasks"][name] for name in ["math_l2", "math_l1"]}
    for task in config["tasks"].values():
        task["splits"] = {"search": 60, "test": 40}
    config["runs"] = {"default": {"tasks": ["math_l2", "math_l1"]}}
    return config


def snakemake(workdir: Path, config: dict, *args: str) -> subprocess.CompletedProcess:
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", str(path), "--cores", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def planned_jobs(dry_run_output: str) -> list[str]:
    """'rule[wildcards]' for each job a dry run plans."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", dry_run_output):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if m:
            w = re.search(r"wildcards: (.*)", block)
            jobs.append(m.group(1) + (f"[{w.group(1)}]" if w else ""))
    return sorted(jobs)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = micro_config()
    result = snakemake(workdir, config)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir, config


def test_run_writes_every_stage(finished_run):
    workdir, _ = finished_run
    results = workdir / "results"
    for name in ["base", "math", "lang"]:
        assert (results / "zoo" / name / "model.safetensors").exists()
    assert (results / "check.json").exists()
    for task in ["math_l2", "math_l1"]:
        for split in ["search", "test"]:
            assert len(pd.read_parquet(results / "data" / task / f"{split}.parquet")) == (60 if split == "search" else 40)
        for model in ["base", "math", "lang"]:
            responses = pd.read_parquet(results / "responses" / task / "test" / f"{model}.parquet")
            assert set(responses.columns) == {"item_id", "correct", "loglik"} and len(responses) == 40
    table = pd.read_parquet(results / "runs" / "default" / "final" / "test.parquet")
    assert sorted(table["model"].unique()) == ["base", "lang", "math"]
    summary = (results / "runs" / "default" / "final" / "summary.md").read_text()
    assert "| math |" in summary and "math_l1" in summary
    provenance = yaml.safe_load((results / "runs" / "default" / "provenance.json").read_text())
    assert provenance["seeds"]["seed"] == 0 and provenance["packages"]["torch"]
    assert "commit" in provenance["git"]


def test_second_run_does_nothing(finished_run):
    workdir, config = finished_run
    result = snakemake(workdir, config, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


def test_template_change_reruns_only_that_task(finished_run):
    workdir, config = finished_run
    config = yaml.safe_load(yaml.safe_dump(config))
    config["tasks"]["math_l1"]["template"] = "{question} "
    result = snakemake(workdir, config, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout)
    assert jobs == sorted([
        "all", "check", "data[task=math_l1]", "final[run=default]", "provenance[run=default]",
        *[f"respond[task=math_l1, split=test, model={m}]" for m in ["base", "math", "lang"]],
    ])


def test_unknown_config_key_is_named(tmp_path):
    config = micro_config()
    config["tasks"]["math_l2"]["tempalte"] = "{question}"
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0
    assert "config: at tasks.math_l2: Additional properties are not allowed ('tempalte' was unexpected)" in (
        result.stdout + result.stderr)


def test_missing_model_directory_is_named_before_any_job(tmp_path):
    config = micro_config()
    config["models"]["math"] = {"path": "models/not-here"}
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0
    assert "model 'math': directory 'models/not-here' does not exist" in result.stdout + result.stderr
