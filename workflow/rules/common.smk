# What several stages share: the library on the path, the validated config, the run's searches,
# model locations and wildcard constraints. Input functions used by one stage are in functions/{stage}.smk,
# included by that stage's .smk.
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

# The library of this checkout, here and in every job, even when `pip install -e .` last ran in
# another checkout: Snakemake appends a script's directory to sys.path, after site-packages, so
# jobs get it first through PYTHONPATH (inherited by script jobs, also on cluster nodes).
LIBRARY = str(Path(workflow.basedir) / "workflow")
sys.path.insert(0, LIBRARY)
os.environ.update(PYTHONPATH=os.pathsep.join(
    [LIBRARY] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != LIBRARY]))

from mergeflow.config import run_tasks, search_model_names, task_evaluation, validate_config
from mergeflow.data import task_files
from mergeflow.locations import (
    hub_model_dir, local_model_dir, merge_tokenizer_source, model_check_file, model_location, zoo_task_files,
)
from mergeflow.errors import MergeflowError
from mergeflow.evaluate import ANSWER_NEUTRAL, chat_keys
from mergeflow.evolve.stages import EvolveConfig
from mergeflow.fitness import NEED_PATHS, need_paths
from mergeflow.runlock import live_run, record_run, release_run
from mergeflow.scheduling import one_pending_reevaluation

# One live run per working directory (mergeflow.runlock): `snakemake --unlock` while a run is
# live would let a second start beside it and rewrite its files; refused (the unlock parses the
# workflow, so here), as is that second run (when it starts: a dry run only reads).
def refuse_beside_live_run(what):
    live = live_run()
    if live is not None:
        raise WorkflowError(f"a run is live in this directory (Snakemake process {live['pid']}, started "
                            f"{live['started']}): {what}; wait for it to end, or stop it (kill {live['pid']}) "
                            "and then run again")


if workflow.is_main_process and "--unlock" in sys.argv:
    refuse_beside_live_run("--unlock would let a second run start beside it and rewrite its files")


onstart:
    refuse_beside_live_run("a second run would rewrite its files")
    record_run()
    one_pending_reevaluation(workflow.scheduler)  # Snakemake's timer chains (mergeflow/scheduling.py)


onsuccess:
    release_run()


onerror:
    release_run()


# Schema (keys, types, defaults) and cross-references, then each run's search, before any job
# is planned.
try:
    validate_config(config)
    EVOLVE = {run: EvolveConfig.from_config(config, run) for run in config["runs"] if "evolve" in config["runs"][run]}
except MergeflowError as err:
    raise WorkflowError(str(err))


def canonical(value):
    """A config subtree with keys sorted, so that params compare equal when only key order changed."""
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def answer_settings(evaluation, batch_invariant=True):
    """The evaluation settings of a job's params: those that can change an answer. The batch size
    changes none (mergeflow.evaluate.ANSWER_NEUTRAL), so changing it reruns nothing; the job reads
    it from the config (job_evaluation). Where a job's output follows the batches (a fitness kind
    that is not batch_invariant) it stays a parameter."""
    return canonical({k: v for k, v in evaluation.items() if not (batch_invariant and k in ANSWER_NEUTRAL)})


SPLITS = ["search", "test"]
MODELS = list(config["models"])
EVAL_MODELS = [config["base_model"]] + list(config["endpoints"])
BASELINE = "baseline"
# Models of the final tables: the endpoints and, once a run searches, the uniform baseline merge.
TABLE_MODELS = EVAL_MODELS + ([BASELINE] if EVOLVE else [])
# Where merges read their sources: the base and the endpoints (always local directories).
BASE_LOCATION = model_location(config["models"][config["base_model"]])
SOURCE_LOCATIONS = [model_location(config["models"][m]) for m in config["endpoints"]]
# The vocabulary parameter merges write (config tokenizer_source): {} when unset, so the params
# of the merging rules are those of before.
MERGE_TOKENIZER = {"tokenizer_source": merge_tokenizer_source(config)} if config.get("tokenizer_source") else {}
CONDA_ENV = "../../envs/mergeflow.yaml"


# Where a cluster executor (profiles/slurm) sends each job (config: cluster); a local run ignores
# these resources. Jobs that run models go to the GPU partition with a GPU when their device is not
# cpu; every other job, and every job of a CPU-only config, to the CPU partition.
CPU_JOB = {"slurm_partition": config["cluster"]["partitions"]["cpu"]}


def device_job(device: str) -> dict[str, str]:
    if device == "cpu":
        return CPU_JOB
    return {"slurm_partition": config["cluster"]["partitions"]["gpu"], "gres": config["cluster"]["gres"]}


# respond, calibrate, fitness, final_respond, pareto_members, and provenance (it names the hardware)
MODEL_JOB = device_job(config["evaluation"]["device"])
IRT_JOB = device_job(config["irt"]["device"])  # fit_irt


def all_cores() -> int:
    """Every core a local run was given (--cores). Under a cluster executor the submitting process
    has no cores to give and each job sees the cores of its node: there 1, in the submitter and in
    the job alike (raise it with --set-threads RULE=N, which reaches the jobs too)."""
    if workflow.remote_exec:
        return 1
    try:
        return max(1, workflow.cores)
    except WorkflowError:  # the submitting process of a cluster executor: no --cores
        return 1


wildcard_constraints:
    task="|".join(config["tasks"]),
    split="|".join(SPLITS),
    model="|".join(MODELS + [BASELINE]),
    g=r"\d+",
    k=r"\d+",
    r=r"\d+",
    run="|".join(config["runs"]),


def model_inputs(name):
    """The local directory of a model, so that zoo models are built and hub models fetched first."""
    return [str(local_model_dir(config["models"][name]))]


def model_check(name):
    """The check of a model against the base (check_model): every job that reads the model needs it.
    Its file is named by the digest of what it checked (check_inputs, functions/check.smk)."""
    return str(model_check_file(name, check_inputs(name)))


def merged_model_names(run):
    """The models a run's merges read: its search space's models (a data-flow run's A and B, which
    may be another run's final merge), else the base and the endpoints."""
    return search_model_names(config, run) if run in EVOLVE else [config["base_model"], *config["endpoints"]]


def run_model_names(run):
    """Every model a run reads: its merges' and its table's (the base and the endpoints)."""
    return list(dict.fromkeys([*merged_model_names(run), config["base_model"], *config["endpoints"]]))


def search_model_inputs(wildcards):
    """What a run's merges read (merged_model_names), and their checks."""
    names = merged_model_names(getattr(wildcards, "run", None))
    return [p for name in names for p in model_inputs(name)] + [model_check(name) for name in names]


def generations(run):
    return config["runs"][run]["evolve"]["generations"]


def evolve_dir(run):
    return f"results/runs/{run}/evolve"


def last_generation(run):
    return f"{evolve_dir(run)}/gen_{generations(run) - 1}"


def all_outputs():
    outputs = []
    for run in config["runs"]:
        outputs += [f"results/runs/{run}/final/summary.md", f"results/runs/{run}/provenance.json"]
        if run in EVOLVE and EVOLVE[run].multi_objective:
            outputs.append(f"results/runs/{run}/final/pareto.md")
        if run in EVOLVE and EVOLVE[run].save_weights:
            outputs += [f"{evolve_dir(run)}/gen_{g}/best/model" for g in range(generations(run))]
        if run in EVOLVE:
            outputs.append(f"results/runs/{run}/final/model")
    if EVOLVE:
        outputs.append("results/summary.md")
    # every model's check, the report's figures and the README of results/ (functions/report.smk)
    return outputs + [model_check(name) for name in MODELS] + all_figures() + ["results/README.md"]
