"""The workflow on a live one-node Slurm cluster through Snakemake's executor plugin and
profiles/slurm, against a local run of the same config: the same bytes.

Needs root (the cluster's daemons), Debian's slurm-wlm and munge (tests/cluster/start-slurm.sh
installs them) and ``pip install -e ".[slurm]"``; without them it is skipped, saying which is
missing. Run it alone with ``python -m pytest -q -m cluster``.
"""

import importlib.util
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from test_workflow import micro_config, snakemake_command

REPO = Path(__file__).resolve().parents[1]
START = REPO / "tests" / "cluster" / "start-slurm.sh"
STOP = REPO / "tests" / "cluster" / "stop-slurm.sh"
# The node declares this much memory (whatever the machine has), so that profiles/slurm's
# requests (up to 32 GB per model job) fit it as they stand.
NODE_MEM_MB = "65536"

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def cluster_config() -> dict:
    """The micro config, smaller still so the cluster run takes minutes: one task, a search on the
    whole split over two shards (parallel jobs) and one on IRT anchors (calibration, the IRT fit,
    the anchors), two generations each."""
    config = micro_config()
    config["tasks"] = {"math_l2": config["tasks"]["math_l2"]}
    evolve = {"objectives": {"math_l2": 1.0}, "population": 3, "generations": 2,
              "search_space": config["runs"]["full"]["evolve"]["search_space"]}
    config["runs"] = {
        "full": {"tasks": ["math_l2"], "evolve": {**evolve, "fitness": {"kind": "full"}, "shards": 2}},
        "anchored": {"tasks": ["math_l2"],
                     "evolve": {**evolve, "fitness": {"kind": "anchors", "anchors": {"strategy": "irt", "n": 10}}}},
    }
    return config


def slurm_command(workdir: Path, config: dict, *args: str) -> list[str]:
    """The workflow under profiles/slurm, as the README says, with status checks every few
    seconds instead of the plugin's 40 (jobs here take seconds)."""
    local = snakemake_command(workdir, config)
    cores = local.index("--cores")
    return [*local[:cores], *local[cores + 2:], "--workflow-profile", str(REPO / "profiles" / "slurm"),
            "--slurm-init-seconds-before-status-checks", "2", "--slurm-keep-successful-logs", *args]


def run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def why_no_cluster() -> str | None:
    if os.geteuid() != 0:
        return "the one-node Slurm cluster needs root (tests/cluster/start-slurm.sh runs its daemons)"
    missing = [tool for tool in ("slurmctld", "slurmd", "munged", "sbatch", "squeue") if not shutil.which(tool)]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): run tests/cluster/start-slurm.sh as root"
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return "the Slurm executor plugin is not installed: pip install -e \".[slurm]\""
    return None


@pytest.fixture(scope="module")
def slurm() -> Iterator[Path]:
    """A running one-node cluster (started here, and stopped after, unless it already ran);
    yields its state directory."""
    reason = why_no_cluster()
    if reason:
        pytest.skip(reason)
    state = Path(os.environ.get("MERGEFLOW_SLURM_STATE", "/var/tmp/mergeflow-slurm"))
    was_running = subprocess.run(["scontrol", "ping"], capture_output=True, text=True).returncode == 0
    started = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "MERGEFLOW_SLURM_MEM_MB": NODE_MEM_MB})
    if started.returncode != 0:
        pytest.skip(f"Slurm could not be started: {(started.stdout + started.stderr)[-1500:]}")
    yield state
    if not was_running:
        subprocess.run(["bash", str(STOP)], capture_output=True, text=True, timeout=120)


def slurm_jobs(run_id: str) -> dict[str, dict[str, str]]:
    """The jobs Slurm ran under one Snakemake run ID (the job name the plugin gives them): their
    state, partition and comment (rule_{rule}_wildcards_{values}) from squeue, which keeps
    finished jobs MinJobAge seconds, and their start and end from the job completion log."""
    out = subprocess.run(["squeue", "--states=all", "--noheader", "--name", run_id, "--format=%i|%T|%P|%k"],
                         capture_output=True, text=True, check=True).stdout
    jobs = {}
    for line in out.splitlines():
        job_id, state, partition, comment = line.split("|", 3)
        jobs[job_id] = {"state": state, "partition": partition, "comment": comment}
    return jobs


def completion_log(state_dir: Path) -> dict[str, dict[str, str]]:
    """JobId -> the fields of its line in the job completion log (jobcomp/filetxt): every job
    that ended, with its state and its submit, start and end times."""
    jobs = {}
    for line in (state_dir / "log" / "jobcomp.log").read_text().splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        jobs[fields["JobId"]] = fields
    return jobs


def outputs(workdir: Path) -> dict[str, bytes]:
    """What must be the same bytes: every generation's history, each run's history, and the final
    merge's answers on the test split."""
    results = workdir / "results" / "runs"
    files = sorted(results.glob("*/evolve/gen_*/history.parquet")) + sorted(results.glob("*/evolve/history.parquet"))
    files += sorted(results.glob("*/final/responses/*.parquet"))
    return {str(p.relative_to(workdir)): p.read_bytes() for p in files}


def final_table(workdir: Path, run: str) -> pd.DataFrame:
    """A run's final table less the search's wall time (the one column that is a measurement)."""
    return pd.read_parquet(workdir / "results" / "runs" / run / "final" / "test.parquet").drop(columns="search_wall_s")


def cancel_when_running(comment: str, log: Path, proc: subprocess.Popen, timeout: float) -> str:
    """scancel the job whose comment is ``comment`` once its own log shows it at work; its id."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        out = subprocess.run(["squeue", "--noheader", "--states=RUNNING", "--format=%i|%k"],
                             capture_output=True, text=True).stdout
        running = [line.split("|", 1)[0] for line in out.splitlines() if line.split("|", 1)[1] == comment]
        if running and log.exists():
            subprocess.run(["scancel", running[0]], check=True)
            return running[0]
        time.sleep(0.2)
    raise AssertionError(f"no running job {comment} to cancel (the run ended or took too long)")


def test_cluster_run_is_the_local_run(slurm, tmp_path):
    """The workflow under profiles/slurm: models are scored in Slurm jobs (fitness shards side by
    side, responses, the IRT fit), ask/tell on the submitting host; a fitness job cancelled with
    scancel mid-run is retried; the histories and final tables are the bytes of a local run."""
    config = cluster_config()
    local = tmp_path / "local"
    local.mkdir()
    # one core, as each Slurm job has: the zoo trains on every core a run is given
    result = run(snakemake_command(local, config, cores=1), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]

    workdir = tmp_path / "slurm"
    workdir.mkdir()
    started = time.time()
    # stderr to a file: a pipe nobody reads while we wait would fill up and stall Snakemake
    with open(tmp_path / "slurm.log", "w") as err:
        proc = subprocess.Popen(slurm_command(workdir, config), stdout=subprocess.DEVNULL, stderr=err, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            victim = cancel_when_running("rule_fitness_wildcards_full_1_0_0",
                                         workdir / "results/logs/evolve/full/gen_1/rung_0/fitness_0.log", proc, 900)
            proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=60)
    elapsed = time.time() - started
    log = (tmp_path / "slurm.log").read_text()
    assert proc.returncode == 0, log[-6000:]
    print(f"cluster run: {elapsed:.0f} s")

    # the same bytes as the local run: histories, the final merges' answers; the same final tables
    expected, got = outputs(local), outputs(workdir)
    assert len(expected) == 2 * (2 + 1) + 2 and sorted(got) == sorted(expected)
    assert [name for name in expected if got[name] != expected[name]] == []
    for name in config["runs"]:
        pd.testing.assert_frame_equal(final_table(workdir, name), final_table(local, name), check_exact=True)

    # Slurm ran the jobs that score models; the evolution loop's bookkeeping ran here
    run_id = re.search(r"SLURM run ID: (\S+)", log).group(1)
    jobs = slurm_jobs(run_id)
    ended = completion_log(slurm)
    for job_id, job in sorted(jobs.items(), key=lambda item: int(item[0])):
        times = ended.get(job_id, {})
        print(job_id, job["state"], job["partition"], job["comment"], times.get("StartTime"), times.get("EndTime"))
    rules = [job["comment"].split("_wildcards_")[0].removeprefix("rule_") for job in jobs.values()]
    for rule in ("zoo_base", "respond", "calibrate", "fit_irt", "select_anchors", "fitness", "final_merge",
                 "final_respond", "provenance"):
        assert rule in rules, rule
    assert not {"ask", "tell", "promote", "history", "final_table", "results_readme"} & set(rules)
    assert {job["partition"] for job in jobs.values()} == {"cpu"}
    assert {ended[i]["JobState"] for i in jobs} == {job["state"] for job in jobs.values()} == {"COMPLETED", "CANCELLED"}
    # 2 generations x 2 shards + 2 x 1 shard, and the cancelled one's second attempt
    assert rules.count("fitness") == 2 * 2 + 2 + 1
    assert jobs[victim]["state"] == "CANCELLED" and jobs[victim]["comment"] == "rule_fitness_wildcards_full_1_0_0"
    assert [job["state"] for i, job in jobs.items() if i != victim and job["comment"] == jobs[victim]["comment"]] == [
        "COMPLETED"]
    assert [i for i, job in jobs.items() if job["state"] != "COMPLETED"] == [victim]
    # a generation's shards were in Slurm's hands at once: each submitted before the other ended
    shards = [ended[i] for i, job in jobs.items() if job["comment"].startswith("rule_fitness_wildcards_full_0_0_")]
    assert len(shards) == 2
    assert max(s["SubmitTime"] for s in shards) < min(s["EndTime"] for s in shards), shards
    # a second run does nothing
    again = run(slurm_command(workdir, config, "-n"), timeout=300)
    assert "Nothing to be done" in again.stdout + again.stderr
