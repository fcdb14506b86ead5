# Input functions and config cross-checks shared by every stage.
import sys
from pathlib import Path

# The library is importable here without an install; jobs find it through the link
# workflow/scripts/mergeflow, since Snakemake puts a script's directory on its sys.path.
sys.path.insert(0, str(Path(workflow.basedir) / "workflow"))

from mergeflow.config import (
    validate_config,
    local_model_dir,
    run_tasks,
    zoo_model_dirs,
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
CONDA_ENV = "../../envs/mergeflow.yaml"


wildcard_constraints:
    task="|".join(config["tasks"]),
    split="|".join(SPLITS),
    model="|".join(MODELS),
    run="|".join(config["runs"]),


def model_inputs(name):
    """The local directory of a model, so that zoo models are built first; hub models need none."""
    path = local_model_dir(config["models"][name])
    return [str(path)] if path is not None else []


def all_model_inputs(wildcards):
    return [p for name in MODELS for p in model_inputs(name)]


def task_source_input(wildcards):
    source = config["tasks"][wildcards.task]["source"]
    return [source["path"]] if "path" in source else []


def split_files(task):
    return {split: f"results/data/{task}/{split}.parquet" for split in SPLITS}


def all_split_files(wildcards):
    return [p for task in config["tasks"] for p in split_files(task).values()]


def respond_model_input(wildcards):
    return model_inputs(wildcards.model)


def final_responses(wildcards):
    return [f"results/responses/{task}/test/{model}.parquet" for task in run_tasks(config, wildcards.run)
            for model in EVAL_MODELS]


def final_outputs():
    outputs = []
    for run in config["runs"]:
        outputs += [f"results/runs/{run}/final/summary.md", f"results/runs/{run}/provenance.json"]
    return outputs
