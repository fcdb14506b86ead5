# Input functions and config cross-checks shared by every stage.
import os
import re
import sys
from pathlib import Path

# The library of this checkout, here and in every job, even when `pip install -e .` last ran in
# another checkout: Snakemake appends a script's directory to sys.path, after site-packages, so
# jobs get it first through PYTHONPATH (inherited by script jobs, also on cluster nodes).
LIBRARY = str(Path(workflow.basedir) / "workflow")
sys.path.insert(0, LIBRARY)
os.environ.update(PYTHONPATH=os.pathsep.join(
    [LIBRARY] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != LIBRARY]))

from mergeflow.config import (
    hub_model_dir,
    local_model_dir,
    model_location,
    run_tasks,
    validate_config,
    zoo_task_files,
)
from mergeflow.errors import MergeflowError

# Schema (keys, types, defaults) and cross-references, before any job is planned.
try:
    validate_config(config)
except MergeflowError as err:
    raise WorkflowError(str(err))

def canonical(value):
    """A config subtree with keys sorted, so that params compare equal when only key order changed."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


SPLITS = ["search", "test"]
MODELS = list(config["models"])
EVAL_MODELS = [config["base_model"]] + list(config["endpoints"])
BASELINE = "baseline"
# Models of the final tables: the endpoints and, once a run searches, the uniform baseline merge.
TABLE_MODELS = EVAL_MODELS + ([BASELINE] if any("evolve" in r for r in config["runs"].values()) else [])
# Where merges read their sources: the base and the endpoints (always local directories).
BASE_LOCATION = model_location(config["models"][config["base_model"]])
SOURCE_LOCATIONS = [model_location(config["models"][m]) for m in config["endpoints"]]
CONDA_ENV = "../../envs/mergeflow.yaml"
# Hub models by the name of the directory the fetch stage writes them to.
HUB_MODELS = {hub_model_dir(spec).name: spec for spec in config["models"].values() if "hub" in spec}


wildcard_constraints:
    task="|".join(config["tasks"]),
    split="|".join(SPLITS),
    model="|".join(MODELS + [BASELINE]),
    g=r"\d+",
    k=r"\d+",
    run="|".join(config["runs"]),


def model_inputs(name):
    """The local directory of a model, so that zoo models are built and hub models fetched first."""
    return [str(local_model_dir(config["models"][name]))]


def all_model_inputs(wildcards):
    return [p for name in MODELS for p in model_inputs(name)]


def task_source_input(wildcards):
    source = config["tasks"][wildcards.task]["source"]
    return [source["path"]] if "path" in source else []


def respond_model_input(wildcards):
    if wildcards.model == BASELINE:
        return [model_spec(BASELINE)["path"]]
    return model_inputs(wildcards.model)


# --- evolution runs ---------------------------------------------------------------------------
from dataclasses import asdict

from mergeflow.evolve.stages import EvolveConfig, ask, evaluate_shard, tell
from mergeflow.logs import job_log, pin_threads

EVOLVE = {run: EvolveConfig.from_config(config, run) for run in config["runs"] if "evolve" in config["runs"][run]}


def generations(run):
    return config["runs"][run]["evolve"]["generations"]


def evolve_params(wildcards):
    """The run's search settings; the number of generations is left out so that extending a
    finished search reruns nothing it already did."""
    return canonical(asdict(EVOLVE[wildcards.run]))


def evolve_dir(run):
    return f"results/runs/{run}/evolve"


def anchors_file(run, task):
    a = EVOLVE[run].anchors
    return f"results/anchors/{task}/{a.get('strategy', 'irt')}-{a.get('n', 20)}-seed{a.get('seed', 0)}.parquet"


def search_model_inputs(wildcards):
    return [p for name in [config["base_model"], *config["endpoints"]] for p in model_inputs(name)]


def evaluate_files(wildcards):
    """Task -> file maps for evaluate: input lists cannot say which file is whose task."""
    cfg = EVOLVE[wildcards.run]
    files = {"splits": {t: f"results/data/{t}/search.parquet" for t in cfg.tasks}}
    if cfg.fitness == "anchors":
        files["anchors"] = {t: anchors_file(wildcards.run, t) for t in cfg.tasks}
        files["irt"] = {t: f"results/irt/{t}" for t in cfg.tasks}
    return canonical(files)


def evaluate_inputs(wildcards):
    files = evaluate_files(wildcards)
    return {
        "candidates": f"{evolve_dir(wildcards.run)}/gen_{wildcards.g}/candidates.parquet",
        "models": search_model_inputs(wildcards),
        "splits": list(files["splits"].values()),
        "anchors": list(files.get("anchors", {}).values()),
        "irt": [f"{d}/items.parquet" for d in files.get("irt", {}).values()],
    }


def previous_generation(wildcards):
    g = int(wildcards.g)
    if g == 0:
        return {}
    prev = f"{evolve_dir(wildcards.run)}/gen_{g - 1}"
    return {"state": f"{prev}/optimizer.pkl", "history": f"{prev}/history.parquet"}


def shard_files(wildcards):
    return [f"{evolve_dir(wildcards.run)}/gen_{wildcards.g}/fitness_{k}.parquet"
            for k in range(EVOLVE[wildcards.run].shards)]


def last_generation(run):
    return f"{evolve_dir(run)}/gen_{generations(run) - 1}"


def calibration_checkpoints(wildcards):
    if not (config.get("zoo") and config["irt"]["calibration"]["checkpoints"]):
        return []
    return [f"results/zoo/checkpoints/{e}" for e in sorted(config["zoo"]["experts"])]


def endpoint_search_responses(wildcards):
    return [f"results/responses/{wildcards.task}/search/{m}.parquet" for m in EVAL_MODELS]


def model_spec(name):
    if name == BASELINE:
        return {"path": "results/baseline/model"}
    return config["models"][name]


# The final merge is scored on each task's test split (responses/) and, after a search on
# anchors, on its objectives' whole search split too (search_responses/), to check the estimates.
FINAL_SPLITS = {"responses": "test", "search_responses": "search"}


def final_split_file(wildcards):
    return f"results/data/{wildcards.task}/{FINAL_SPLITS[wildcards.scored]}.parquet"


def estimate_checked_tasks(run):
    """The objectives of a search on anchors: its final merge's estimates are checked on them."""
    if run not in EVOLVE or EVOLVE[run].fitness != "anchors":
        return []
    return EVOLVE[run].tasks if config["runs"][run]["evolve"]["check_estimate"] else []


def final_table_inputs(wildcards):
    run = wildcards.run
    tasks = run_tasks(config, run)
    inputs = {"responses": [f"results/responses/{t}/test/{m}.parquet" for t in tasks for m in TABLE_MODELS]}
    if run in EVOLVE:
        inputs["merged"] = [f"results/runs/{run}/final/responses/{t}.parquet" for t in tasks]
        inputs["history"] = f"{evolve_dir(run)}/history.parquet"
        inputs["merged_search"] = [f"results/runs/{run}/final/search_responses/{t}.parquet"
                                   for t in estimate_checked_tasks(run)]
    return inputs


def pareto_test_tasks(wildcards):
    """Task -> test split, scorer and delimiter for scoring a run's Pareto members."""
    return canonical({t: {"split": f"results/data/{t}/test.parquet", "scorer": config["tasks"][t]["scorer"],
                          "delimiter": config["tasks"][t].get("target_delimiter", " ")}
                      for t in run_tasks(config, wildcards.run)})


def all_outputs():
    outputs = []
    for run in config["runs"]:
        outputs += [f"results/runs/{run}/final/summary.md", f"results/runs/{run}/provenance.json"]
        if run in EVOLVE and EVOLVE[run].multi_objective:
            outputs.append(f"results/runs/{run}/final/pareto.md")
        if run in EVOLVE and EVOLVE[run].save_weights:
            outputs += [f"{evolve_dir(run)}/gen_{g}/best/model" for g in range(generations(run))]
    if EVOLVE:
        outputs.append("results/summary.md")
    return outputs


# Adapters of the evolution loop's `run:` jobs (see evolve.smk).
def ask_job(input, output, params, wildcards, log):
    with job_log(log[0]):
        ask(EvolveConfig(**params.evolve), int(wildcards.g), input.get("state"), input.get("history"),
            output.candidates, output.state)


def evaluate_job(input, output, params, wildcards, threads, log):
    with job_log(log[0]):
        pin_threads(threads)
        evaluate_shard(EvolveConfig(**params.evolve), params.tasks, params.evaluation, params.endpoints,
                       int(wildcards.g), int(wildcards.k), input.candidates, params.files["splits"],
                       params.files.get("anchors", {}), params.files.get("irt", {}), output[0])


def tell_job(input, output, params, wildcards, log):
    with job_log(log[0]):
        tell(EvolveConfig(**params.evolve), int(wildcards.g), input.asked, input.candidates, list(input.fitness),
             input.get("history"), output.state, output.history, output.best)
