"""A micro end-to-end run of the Snakemake workflow in a temporary directory (a smaller zoo)."""

import copy
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mergeflow.evolve.history import best_row

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
    config["irt"] = {"steps": 200, "calibration": {"random_merges": 6}}
    # the zoo's models, not the default's merges of its own runs (replaced below)
    config["models"] = {name: model for name, model in config["models"].items() if "run" not in model}
    space = {"method": "task_arithmetic", "layer_groups": 2, "parameters": {"weight": {"min": 0.0, "max": 1.5}}}
    evolve = {"objectives": {"math_l2": 1.0}, "population": 3, "generations": 3, "search_space": space}
    config["runs"] = {
        # two objectives (key order differs from sorted order) over two shards, searched as a
        # multi-objective problem: a Pareto set, each member materialised and tested
        "full": {"tasks": ["math_l2", "math_l1"],
                 "evolve": {**evolve, "fitness": {"kind": "full"}, "shards": 2, "multi_objective": True,
                            "objectives": {"math_l2": 1.0, "math_l1": 0.5}}},
        "anchored": {"tasks": ["math_l2"],
                     "evolve": {**evolve, "fitness": {"kind": "anchors", "anchors": {"strategy": "irt", "n": 10}}}},
        # successive halving over two shards: 4 candidates on the 10 anchors, 2 on 30 items, 1 on all 60
        "multi": {"tasks": ["math_l2"],
                  "evolve": {**evolve, "population": 4, "shards": 2,
                             "fitness": {"kind": "multi_fidelity", "rungs": [10, 30, 60], "eta": 2}}},
        # gradient descent on the genome: 2 Adam steps of 20 items
        "gradient": {"tasks": ["math_l2"],
                     "evolve": {**evolve, "population": 1, "generations": 2, "optimizer": "Adam",
                                "fitness": {"kind": "gradient", "batch": 20}}},
    }
    return config


def snakemake_command(workdir: Path, config: dict, *args: str, cores: int = 2) -> list[str]:
    """The workflow on ``config`` (written to ``workdir/config.yaml``) in ``workdir``, two jobs at
    a time by default: most of a micro run is jobs starting Python, and the CI machine has two
    cores. (The zoo trains on every core it is given, so runs compared byte for byte use one
    ``cores``.)"""
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
            "--configfile", str(path), "--cores", str(cores), *args]


def snakemake(workdir: Path, config: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(snakemake_command(workdir, config, *args), capture_output=True, text=True,
                          timeout=900, env=env)


def planned_jobs(dry_run_output: str) -> list[str]:
    """'rule[wildcards]' for each job a dry run plans (a check's digest left out: check_report)."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", dry_run_output):
        m = re.match(r"(?:local)?rule (\w+):", block)
        if m:
            w = re.search(r"wildcards: (.*)", block)
            wildcards = re.sub(r", digest=\w+", "", w.group(1)) if w else None
            jobs.append(m.group(1) + (f"[{wildcards}]" if w else ""))
    return sorted(jobs)


def check_report(workdir: Path, name: str) -> dict:
    """A model's check report (results/check/NAME/DIGEST.json); the test's run wrote one."""
    reports = list((Path(workdir) / "results" / "check" / name).glob("*.json"))
    assert len(reports) == 1, reports
    return json.loads(reports[0].read_text())


@pytest.mark.slow
def test_run_writes_every_stage(finished_run):
    workdir, _ = finished_run
    results = workdir / "results"
    for name in ["base", "math", "lang"]:
        assert (results / "zoo" / name / "model.safetensors").exists()
    for name in ["base", "math", "lang"]:
        assert check_report(workdir, name)["fingerprint"]
    for task in ["math_l2", "math_l1"]:
        for split in ["search", "test"]:
            assert len(pd.read_parquet(results / "data" / task / f"{split}.parquet")) == (60 if split == "search" else 40)
        for model in ["base", "math", "lang"]:
            responses = pd.read_parquet(results / "responses" / task / "test" / f"{model}.parquet")
            # each choice's log-likelihood for multiple choice, the greedy answer for generation
            kept = "choice_logliks" if task == "math_l2" else "generation"
            assert set(responses.columns) == {"item_id", "correct", "loglik", kept} and len(responses) == 40
    table = pd.read_parquet(results / "runs" / "full" / "final" / "test.parquet")
    assert sorted(table["model"].unique()) == ["base", "baseline", "lang", "math", "merged"]
    summary = (results / "runs" / "full" / "final" / "summary.md").read_text()
    assert "| math |" in summary and "math_l1" in summary and "| merged |" in summary
    for name in ["items.parquet", "posterior.safetensors", "fit.json"]:
        assert (results / "irt" / "math_l2" / name).exists()
    anchors = pd.read_parquet(results / "anchors" / "math_l2" / "irt-10-seed0.parquet")
    assert len(anchors) == 10 and abs(anchors["weight"].sum() - 1) < 1e-6
    for run, items in [("full", 60), ("anchored", 10)]:
        history = pd.read_parquet(results / "runs" / run / "evolve" / "history.parquet")
        assert len(history) == 9 and set(history["items"]) == {items * (2 if run == "full" else 1)}
        for g in range(3):
            assert (results / "runs" / run / "evolve" / f"gen_{g}" / "best" / "recipe.yaml").exists()
            assert (results / "runs" / run / "evolve" / f"gen_{g}" / "optimizer.pkl").exists()
        assert "## Lineage" in (results / "runs" / run / "final" / "model" / "README.md").read_text()
    full = pd.read_parquet(results / "runs" / "full" / "evolve" / "history.parquet")
    expected = (full["fitness_math_l2"] + 0.5 * full["fitness_math_l1"]) / 1.5
    assert (full["fitness"] - expected).abs().max() < 1e-12
    assert set(full["items_math_l2"]) == set(full["items_math_l1"]) == {60}  # per objective, with several
    assert sorted(p.name for p in (results / "runs" / "full" / "evolve" / "gen_0" / "rung_0").glob("*")) == [
        "fitness_0.parquet", "fitness_1.parquet", "responses_0.parquet", "responses_1.parquet"]
    front = pd.read_parquet(results / "runs" / "full" / "final" / "pareto.parquet")
    tested = pd.read_parquet(results / "runs" / "full" / "final" / "pareto_test.parquet")
    points = front.drop_duplicates(["fitness_math_l2", "fitness_math_l1"])
    assert len(tested) == 2 * len(points) and set(tested["task"]) == {"math_l2", "math_l1"}
    assert set(tested["recipe_hash"]) <= set(front["recipe_hash"]) and tested["accuracy"].between(0, 1).all()
    members = sorted((results / "runs" / "full" / "final" / "pareto_models").glob("member_*"))
    assert len(members) == len(points) and all((m / "model.safetensors.index.json").exists() for m in members)
    assert "Pareto member 0" in (members[0] / "README.md").read_text()
    assert "| member |" in (results / "runs" / "full" / "final" / "pareto.md").read_text()
    comparison = (results / "summary.md").read_text()
    assert "merged (full)" in comparison and "merged (anchored)" in comparison and "merged (multi)" in comparison
    # successive halving: per generation 4 candidates on 10 anchors, 2 on 30 items, 1 on all 60
    multi = pd.read_parquet(results / "runs" / "multi" / "evolve" / "history.parquet")
    for _, generation in multi.groupby("generation"):
        assert sorted(generation["rung"]) == [0, 0, 1, 2] and sorted(generation["items"]) == [10, 10, 30, 60]
    assert best_row(multi, "best")["rung"] == 2
    assert not (results / "runs" / "multi" / "final" / "search_responses").exists()  # its top rung is exact
    # the search on anchors: its estimate of the merge it chose, against the whole search split
    anchored = pd.read_parquet(results / "runs" / "anchored" / "final" / "test.parquet").set_index("model")
    best = best_row(pd.read_parquet(results / "runs" / "anchored" / "evolve" / "history.parquet"), "best")
    search = pd.read_parquet(results / "runs" / "anchored" / "final" / "search_responses" / "math_l2.parquet")
    merged = anchored.loc["merged"]
    assert merged["estimated_fitness"] == best["fitness_math_l2"] and merged["estimated_sd"] == best["sd_math_l2"]
    assert merged["search_split_accuracy"] == search["correct"].mean() and merged["search_split_items"] == 60
    assert merged["estimate_items"] == 10
    assert "## The search's estimate of its merge" in (results / "runs" / "anchored" / "final" / "summary.md").read_text()
    # the gradient search: one candidate per Adam step on 20 items, its gradient told; its merge is
    # the last step's, checked against the whole search split
    gradient = pd.read_parquet(results / "runs" / "gradient" / "evolve" / "history.parquet")
    assert list(gradient["items"]) == [20, 20] and len(gradient["gradient"].iloc[0]) == 4
    assert best_row(gradient, "last")["generation"] == 1
    stepped = pd.read_parquet(results / "runs" / "gradient" / "final" / "test.parquet").set_index("model")
    assert stepped.loc["merged", "estimate_items"] == 20 and stepped.loc["merged", "search_split_items"] == 60
    assert "| merged (anchored) | math_l2 |" in comparison
    assert "estimated_fitness" not in pd.read_parquet(results / "runs" / "full" / "final" / "test.parquet")
    assert not (results / "runs" / "full" / "final" / "search_responses").exists()
    provenance = yaml.safe_load((results / "runs" / "full" / "provenance.json").read_text())
    assert provenance["seeds"]["seed"] == 0 and provenance["packages"]["torch"]
    assert "commit" in provenance["git"] and provenance["hardware"]["cpu"]
    # the report's figures, the published final models and the results README
    for run in ("full", "anchored", "multi", "gradient"):
        for figure in ("search_progress", "best_genome"):
            assert (results / "runs" / run / "figures" / f"{figure}.png").stat().st_size > 5000
        card = (results / "runs" / run / "final" / "model" / "README.md").read_text()
        meta = yaml.safe_load(card.split("---\n")[1])
        assert meta["tags"] == ["merge", "mergeflow"] and meta["base_model"] == ["base", "math", "lang"]
        assert "## Evaluation" in card and "| math_l2 | 40 |" in card
        weights = results / "runs" / run / "final" / "merge" / "model-00001-of-00001.safetensors"
        published = results / "runs" / run / "final" / "model" / weights.name
        assert published.stat().st_ino == weights.stat().st_ino  # hard links: no second copy
    assert (results / "runs" / "full" / "figures" / "pareto_front.png").exists()
    assert not (results / "runs" / "anchored" / "figures" / "pareto_front.png").exists()
    for figure in ("irt_math_l2", "accuracy", "search_cost"):
        assert (results / "figures" / f"{figure}.png").stat().st_size > 5000
    readme = (results / "README.md").read_text()
    assert provenance["git"]["commit"] in readme and "![search progress of run multi]" in readme
    assert "config `config.yaml`" in readme and str(workdir) not in readme  # the config as the project names it
    assert "## Which weights" in readme and "The embedded zoo's fingerprint" in readme
    assert provenance["models"]["math"]["fingerprint"][:16] in readme
    assert "Adam, learning rate" in readme and "Adam, sigma" not in readme
    assert "torch==" in (results / "requirements.txt").read_text()


@pytest.mark.slow
def test_fitness_jobs_after_the_first_find_the_sources_resident(finished_run):
    """The default profile runs the evolution loop inside the Snakemake process: one source load."""
    workdir, _ = finished_run
    logs = sorted((workdir / "results" / "logs" / "evolve").glob("*/gen_*/rung_*/fitness_*.log"))
    loads = [log for log in logs if "loading 3 source models" in log.read_text()]
    assert len(logs) == 6 + 3 + 18 + 2 and len(loads) == 1, [log.relative_to(workdir) for log in loads]
    assert all("already resident" in log.read_text() for log in logs if log not in loads)


@pytest.mark.slow
def test_report_holds_every_results_table_and_figure(finished_run):
    """``snakemake --report`` packs the overall summary, each run's table, the Pareto table and
    every figure, with their captions."""
    import zipfile

    workdir, config = finished_run
    result = snakemake(workdir, config, "--report", "report.zip")
    assert result.returncode == 0, result.stderr[-4000:]
    names = zipfile.ZipFile(workdir / "report.zip").namelist()
    packed = sorted(Path(n).name for n in names if n.startswith("report/data/raw/"))
    figures = ["accuracy.png", "irt_math_l2.png", "pareto_front.png", "search_cost.png"]
    figures += ["best_genome.png"] * 4 + ["search_progress.png"] * 4
    assert packed == sorted(["pareto.md"] + ["summary.md"] * 5 + figures), packed
    html = next(n for n in names if n.endswith("report.html"))
    page = zipfile.ZipFile(workdir / "report.zip").read(html).decode()
    for caption in ("Test-split accuracy of every run", "how the search went", "the genome of its final merge",
                    "the Pareto front in the space", "how good the IRT-based cheap fitness is",
                    "Test-split accuracy of every model on every task", "What each search cost"):
        assert caption in page, caption


@pytest.mark.slow
def test_second_run_does_nothing(finished_run):
    workdir, config = finished_run
    result = snakemake(workdir, config, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.slow
def test_template_change_reruns_only_that_task(finished_run):
    workdir, config = finished_run
    config = yaml.safe_load(yaml.safe_dump(config))
    config["tasks"]["math_l1"]["template"] = "{question} "
    result = snakemake(workdir, config, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout)
    # math_l1 is an objective of the 'full' search, so that search is redone; the zoo, the IRT
    # stages and the 'anchored' search (math_l2 only) are not
    # (ask(0) reads no data, so only its successors are redone)
    full_search = [f"ask[run=full, g={g}]" for g in (1, 2)] + [f"tell[run=full, g={g}]" for g in range(3)]
    full_search += [f"fitness[run=full, g={g}, r=0, k={k}]" for g in range(3) for k in (0, 1)]
    assert jobs == sorted([
        "all", "data[task=math_l1]", "final_table[run=full]", "compare_runs", "provenance[run=full]", "provenance[run=anchored]",
        "provenance[run=multi]", "provenance[run=gradient]",
        *[f"respond[task=math_l1, split=test, model={m}]" for m in ["base", "math", "lang", "baseline"]],
        *full_search, "history[run=full]", "final_merge[run=full]", "final_model[run=full]", "pareto_front[run=full]",
        "pareto_members[run=full]", *[f"final_respond[run=full, scored=responses, task={t}]" for t in ["math_l2", "math_l1"]],
        "search_progress[run=full]", "best_genome[run=full]", "pareto_figure[run=full]", "accuracy_figure", "cost_figure",
        "results_readme",
    ])


@pytest.mark.slow
def test_an_unrelated_model_reruns_nothing(finished_run):
    """Adding a model that no search or table reads plans its own check and no scoring or search;
    the config's record (provenance) and the README that cites it are redone."""
    workdir, config = finished_run
    config = copy.deepcopy(config)  # keeps key order: the order of runs and objectives is a parameter
    config["models"]["extra"] = {"path": "results/zoo/checkpoints/math/step_00005"}
    result = snakemake(workdir, config, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout)
    assert "check_model[model=extra]" in jobs
    assert {j.split("[")[0] for j in jobs} <= {"check_model", "provenance", "results_readme", "all"}, jobs
    assert [j for j in jobs if j.startswith("check_model")] == ["check_model[model=extra]"]


@pytest.mark.slow
def test_estimate_check_can_be_turned_off(finished_run):
    workdir, config = finished_run
    config = yaml.safe_load(yaml.safe_dump(config))
    config["runs"]["anchored"]["evolve"]["check_estimate"] = False
    result = snakemake(workdir, config, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = planned_jobs(result.stdout)
    # only the table is redone, without the search-split check; no search is rerun
    assert "final_table[run=anchored]" in jobs and not [job for job in jobs if "fitness" in job or "respond" in job]


@pytest.mark.slow
def test_more_generations_run_only_the_new_ones(finished_run):
    workdir, config = finished_run
    config = yaml.safe_load(yaml.safe_dump(config))
    config["runs"]["full"]["evolve"]["generations"] = 5
    result = snakemake(workdir, config, "-n")
    planned = planned_jobs(result.stdout)
    jobs = [j for j in planned if j.split("[")[0] in ("ask", "fitness", "tell")]
    assert jobs == sorted([f"{rule}[run=full, g={g}]" for rule in ("ask", "tell") for g in (3, 4)]
                          + [f"fitness[run=full, g={g}, r=0, k={k}]" for g in (3, 4) for k in (0, 1)])
    # of the report, that run's figures, the summary figures and the README, nothing else
    report = [j for j in planned if j.split("[")[0] in ("search_progress", "best_genome", "pareto_figure",
                                                        "irt_fit_figure", "accuracy_figure", "cost_figure",
                                                        "results_readme")]
    assert report == sorted(["search_progress[run=full]", "best_genome[run=full]", "pareto_figure[run=full]",
                             "accuracy_figure", "cost_figure", "results_readme"])


@pytest.mark.slow
def test_a_bracketed_generation_plans_no_jobs_below_its_first_rung(finished_run):
    """Brackets [0, 1] on the successive-halving run: generation 1 starts at rung 1, so it has no
    rung-0 fitness or promote jobs; generations 0 and 2 climb all three rungs."""
    workdir, config = finished_run
    config = yaml.safe_load(yaml.safe_dump(config))
    config["runs"]["multi"]["evolve"]["fitness"]["brackets"] = [0, 1]
    planned = planned_jobs(snakemake(workdir, config, "-n").stdout)
    rungs = {0: (0, 1, 2), 1: (1, 2), 2: (0, 1, 2)}
    assert [j for j in planned if j.startswith("fitness[run=multi")] == sorted(
        f"fitness[run=multi, g={g}, r={r}, k={k}]" for g, climbed in rungs.items() for r in climbed for k in (0, 1))
    assert [j for j in planned if j.startswith("promote[run=multi")] == sorted(
        f"promote[run=multi, g={g}, r={r}]" for g, climbed in rungs.items() for r in climbed[:-1])


def kill_when(cmd: list[str], marker: Path, why: str) -> None:
    """Start ``cmd`` and SIGKILL it, jobs included, as soon as ``marker`` exists (``why``: the
    failure message if the run ends first)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not marker.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert marker.exists() and proc.poll() is None, why
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def resume(cmd: list[str]) -> None:
    """Resume a killed run as the README says: a SIGKILL leaves Snakemake's lock behind, so unlock,
    then rerun with --rerun-incomplete."""
    subprocess.run(cmd + ["--unlock"], capture_output=True, text=True, timeout=120, check=True)
    result = subprocess.run(cmd + ["--rerun-incomplete"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_history(finished_run, tmp_path):
    """SIGKILL a multi-fidelity search during generation 1, rerun with --rerun-incomplete: same bytes."""
    workdir, config = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy, symlinks=True)
    shutil.rmtree(copy / "results" / "runs" / "multi" / "evolve")
    target = "results/runs/multi/evolve/history.parquet"
    cmd = snakemake_command(copy, config, target)
    kill_when(cmd, copy / "results" / "runs" / "multi" / "evolve" / "gen_1" / "rung_0" / "promoted.parquet",
              "the run ended before generation 2 started")
    assert not (copy / target).exists()
    finished = copy / "results" / "runs" / "multi" / "evolve" / "gen_0" / "history.parquet"
    before = finished.stat().st_mtime_ns
    resume(cmd)
    assert finished.stat().st_mtime_ns == before  # the finished generation was not redone
    assert (copy / target).read_bytes() == (workdir / target).read_bytes()


def planned_resources(dry_run_output: str) -> dict[str, dict[str, str]]:
    """rule -> the resources a dry run shows for its jobs (the last job's, if several)."""
    resources = {}
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", dry_run_output):
        m = re.match(r"(?:local)?rule (\w+):", block)
        r = re.search(r"resources: (.*)", block)
        if m:
            resources[m.group(1)] = dict(kv.split("=", 1) for kv in r.group(1).split(", ")) if r else {}
    return resources


@pytest.mark.slow
def test_cluster_resources_follow_the_config(tmp_path):
    """Under a GPU device the jobs that run models ask a cluster for the GPU partition and gres,
    every other submitted job for the CPU partition (config: cluster); the IRT fit follows
    irt.device; the local jobs ask for none."""
    config = micro_config()
    config["evaluation"]["device"] = "cuda"
    config["cluster"] = {"partitions": {"cpu": "short", "gpu": "a100"}, "gres": "gpu:a100:1"}
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode == 0, result.stderr[-3000:]
    planned = planned_resources(result.stdout)
    models = {"respond", "calibrate", "fitness", "final_respond", "pareto_members", "provenance"}
    local = {"ask", "promote", "tell", "history", "final_table", "compare_runs", "pareto_front", "final_model",
             "search_progress", "best_genome", "pareto_figure", "irt_fit_figure", "accuracy_figure", "cost_figure",
             "results_readme", "all"}
    assert models | local <= set(planned) and "fit_irt" in planned and "zoo_base" in planned
    for rule, resources in planned.items():
        if rule in models:
            assert (resources.get("slurm_partition"), resources.get("gres")) == ("a100", "gpu:a100:1"), rule
        elif rule in local:
            assert "slurm_partition" not in resources and "gres" not in resources, rule
        else:
            assert resources.get("slurm_partition") == "short" and "gres" not in resources, rule
    config["irt"]["device"] = "cuda"
    config["evaluation"]["device"] = "cpu"
    planned = planned_resources(snakemake(tmp_path, config, "-n").stdout)
    assert planned["fit_irt"]["gres"] == "gpu:a100:1" and planned["fit_irt"]["slurm_partition"] == "a100"
    assert {planned[rule]["slurm_partition"] for rule in models} == {"short"}


def test_unknown_config_key_is_named(tmp_path):
    config = micro_config()
    config["tasks"]["math_l2"]["tempalte"] = "{question}"
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0
    assert "config: at tasks.math_l2: Additional properties are not allowed ('tempalte' was unexpected)" in (
        result.stdout + result.stderr)


@pytest.mark.parametrize("fitness", [{"loss": "entropy"}, {"loss": "agreement", "teachers": {"math_l2": "lang"}}])
def test_a_label_free_search_plans_its_prompts_without_answers_as_the_search_split(tmp_path, fitness):
    """A task's search prompts from a file with no answer column (``search_source``), searched by
    the gradient kind's label-free loss: the data job reads that file and no job scores the
    search split (no responses, IRT or estimate check), only the test split; under ``agreement``
    the teach job gives the teacher's outputs on those prompts."""
    pd.DataFrame({"item_id": ["p0", "p1"], "question": ["a", "b"],
                  "choices": [["1", "2"], ["3", "4"]]}).to_parquet(tmp_path / "prompts.parquet")
    config = micro_config()
    config["tasks"]["math_l2"]["search_source"] = {"path": "prompts.parquet"}
    config["runs"] = {"label_free": {"tasks": ["math_l2"], "evolve": {
        "objectives": {"math_l2": 1.0}, "optimizer": "Adam", "population": 1, "generations": 2,
        "check_estimate": False, "fitness": {"kind": "gradient", "batch": 2, **fitness},
        "search_space": {"method": "task_arithmetic", "layer_groups": 2}}}}
    config["tasks"]["math_l2"]["splits"]["search"] = 2
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode == 0, result.stdout + result.stderr
    data = next(b for b in re.split(r"\n(?=(?:local)?rule \w+:)", result.stdout)
                if b.startswith("rule data:") and "task=math_l2" in b)
    assert "prompts.parquet" in data
    jobs = planned_jobs(result.stdout)
    assert not [j for j in jobs if "split=search" in j or j.split("[")[0] in ("fit_irt", "calibrate")], jobs
    taught = [j for j in jobs if j.startswith("teach")]
    assert taught == (["teach[task=math_l2, model=lang]"] if "teachers" in fitness else []), jobs


@pytest.mark.slow
@pytest.mark.parametrize("section, bad, message", [
    ("fitness", {"kind": "anchor"},
     "config: at runs.anchored.evolve.fitness.kind: 'anchor' is not one of ['full', 'anchors', 'multi_fidelity', 'gradient']"),
    ("search_space", {"kind": "dfz", "method": "ties"},
     "config: at runs.anchored.evolve.search_space.kind: 'dfz' is not one of ['parameter', 'dfs', 'dis']"),
])
def test_unknown_kind_is_named_with_the_known_kinds_before_any_job(tmp_path, section, bad, message):
    config = micro_config()
    config["runs"]["anchored"]["evolve"][section] = bad
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0 and message in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.slow
def test_missing_model_directory_is_named_before_any_job(tmp_path):
    config = micro_config()
    config["models"]["math"] = {"path": "models/not-here"}
    result = snakemake(tmp_path, config, "-n")
    assert result.returncode != 0
    assert "model 'math': directory 'models/not-here' does not exist" in result.stdout + result.stderr


def fake_hub_cache(cache: Path, repo: str, snapshots: dict[str, Path]) -> None:
    """A Hugging Face cache holding ``repo`` at each revision (name -> model directory), laid out as
    ``huggingface_hub`` writes it: refs/<revision> names a commit, snapshots/<commit> holds files."""
    root = cache / ("models--" + repo.replace("/", "--"))
    for k, (revision, model_dir) in enumerate(snapshots.items()):
        commit = f"{k + 1:x}" * 40
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / revision).write_text(commit)
        shutil.copytree(model_dir, root / "snapshots" / commit)


def offline_env(cache: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}


@pytest.mark.slow
def test_hub_endpoint_is_fetched_and_checked_offline(finished_run, tmp_path):
    """A hub endpoint: the fetch stage links the cached snapshot of its revision into results/hub/,
    the check stage reads it there, and the plan merges from that local directory."""
    workdir, config = finished_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, symlinks=True)
    cache = tmp_path / "hf-cache"
    fake_hub_cache(cache, "some-org/lang", {"main": workdir / "results" / "zoo" / "base",
                                           "v1": workdir / "results" / "zoo" / "lang"})
    config = {**config, "models": {**config["models"], "lang": {"hub": "some-org/lang", "revision": "v1"}}}
    result = snakemake(copy, config, "check_models", env=offline_env(cache))
    assert result.returncode == 0, result.stderr[-4000:]
    fetched = copy / "results" / "hub" / "some-org--lang@v1"
    record = json.loads((fetched / "fetched.json").read_text())
    assert record["commit"] == "2" * 40  # the v1 snapshot, not main's
    assert (fetched / "model.safetensors").is_symlink()
    assert (fetched / "model.safetensors").read_bytes() == (workdir / "results/zoo/lang/model.safetensors").read_bytes()
    reports = [json.loads(p.read_text()) for p in (copy / "results" / "check" / "lang").glob("*.json")]
    assert len(reports) == 2  # the zoo's lang and the hub's, side by side
    checked = next(r for r in reports if r["location"].startswith("results/hub"))
    assert checked["location"] == "results/hub/some-org--lang@v1"
    plan = snakemake(copy, config, "-n", "--forceall", "--quiet", "rules", env=offline_env(cache))
    assert "fetch_model" in plan.stdout + plan.stderr


def test_missing_hub_model_is_named(tmp_path):
    script = ("import sys; sys.path.insert(0, %r)\n"
              "from mergeflow.fetch import fetch_hub_model\n"
              "fetch_hub_model('some-org/absent', None, %r)" % (str(REPO / "workflow"), str(tmp_path / "out")))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env=offline_env(tmp_path / "empty-cache"))
    assert result.returncode != 0
    assert "hub model 'some-org/absent' (revision 'main'): cannot fetch it" in result.stderr


@pytest.mark.parametrize("example", sorted((REPO / "config" / "examples").glob("*.yaml")), ids=lambda p: p.stem)
def test_example_configs_validate(example, monkeypatch):
    """Each example is a whole config (its local models and data are not on this machine, which
    must be the only complaint; one of hub models and data validates as it is), or an overlay on
    the default (it has no ``tasks``)."""
    from snakemake.utils import update_config

    from mergeflow.config import validate_config
    from mergeflow.errors import MergeflowError
    from mergeflow.locations import zoo_model_dirs

    overlay = yaml.safe_load(example.read_text())
    config = overlay
    if "tasks" not in overlay:  # an overlay (it may add models, e.g. another run's merge)
        config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
        update_config(config, overlay)
        assert set(overlay["runs"]) <= set(validate_config(config)["runs"])
        return
    built = {str(path) for path in zoo_model_dirs(config).values()}  # the zoo's models: built by its jobs
    local = [m["path"] for m in config["models"].values() if "path" in m and m["path"] not in built] + [
        t["source"]["path"] for t in config["tasks"].values() if "path" in t.get("source", {})]
    if any("lm_eval" in t for t in config["tasks"].values()) and importlib.util.find_spec("lm_eval") is None:
        pytest.skip('lm-eval tasks need the lm-eval extra: pip install -e ".[lm-eval]"')
    if all((REPO / path).exists() for path in local):  # hub, GGUF and the repository's own files: it validates
        packages = [m["gguf"]["package"] for m in config["models"].values() if isinstance(m.get("gguf"), dict)]
        if any(importlib.util.find_spec(p) is None for p in packages):
            pytest.skip(f"GGUF packages {packages} are not all installed")
        monkeypatch.chdir(REPO)
        assert validate_config(config)["runs"]
        return
    with pytest.raises(MergeflowError, match="does not exist"):
        validate_config(config)


@pytest.mark.slow
def test_jobs_use_this_checkouts_library(finished_run, tmp_path):
    """An installed mergeflow from another checkout must not stand in for this one's in the jobs
    (Snakemake puts a script's own directory after site-packages)."""
    workdir, config = finished_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy, symlinks=True)
    other = tmp_path / "other-checkout" / "mergeflow"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("raise ImportError('the mergeflow of another checkout')\n")
    summary = copy / "results" / "summary.md"
    before = summary.stat().st_mtime_ns
    result = snakemake(copy, config, "--forcerun", "compare_runs", "results/summary.md",
                       env={**os.environ, "PYTHONPATH": str(other.parent)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary.stat().st_mtime_ns > before  # the job ran, on this checkout's library


@pytest.mark.slow
def test_a_lower_batch_size_reruns_only_what_follows_the_batches(finished_run):
    """The first thing anyone does after an out-of-memory crash: answers do not depend on the batch
    size (test_evaluate), so nothing that writes answers reruns; the gradient search, whose sums
    follow the batches, is the one kind that does."""
    workdir, config = finished_run
    lowered = {**config, "evaluation": {**config.get("evaluation", {}), "batch_size": 3}}
    plan = snakemake(workdir, lowered, "-n")
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = planned_jobs(plan.stdout)
    assert not [job for job in jobs if job.startswith(("respond[", "calibrate["))], plan.stdout[-6000:]
    # the gradient search and what follows from its merge; provenance records the changed config
    answers = [job for job in jobs if job.startswith(("fitness[", "final_respond["))]
    assert answers and all("run=gradient" in job for job in answers), answers


@pytest.mark.slow
def test_unlock_and_a_second_run_are_refused_while_a_run_is_live(tmp_path):
    """`snakemake --unlock` beside a live run would let a second run rewrite its files: refused
    while the first runs, and honoured once it is gone (a hard kill leaves its lock behind)."""
    config = micro_config()
    first = subprocess.Popen(snakemake_command(tmp_path, config, cores=1), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    record = tmp_path / ".snakemake" / "mergeflow-live-run.json"
    try:
        for _ in range(600):
            if record.exists() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert record.exists() and first.poll() is None
        unlock = snakemake(tmp_path, config, "--unlock")
        assert unlock.returncode != 0
        assert f"a run is live in this directory (Snakemake process {first.pid}" in unlock.stderr
        assert "--unlock would let a second run start beside it" in unlock.stderr
        assert snakemake(tmp_path, config, "-n").returncode == 0  # a dry run only reads
        shutil.rmtree(tmp_path / ".snakemake" / "locks")  # as an unlock by other means would
        second = snakemake(tmp_path, config)
        assert second.returncode != 0 and "a second run would rewrite its files" in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    unlock = snakemake(tmp_path, config, "--unlock")
    assert unlock.returncode == 0, unlock.stderr[-2000:]
