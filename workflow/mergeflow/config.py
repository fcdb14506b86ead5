"""Cross-references in a config that a JSON schema cannot express, checked before any job runs.

The schema (``workflow/schemas/config.schema.yaml``) checks keys and types; this module checks
that names point at things that exist: the base model and endpoints are models, runs name known
tasks, local model directories exist (or are built by the zoo), task sources exist (or are
written by the zoo).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from mergeflow.errors import MergeflowError

RESULTS = Path("results")
SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"


def zoo_model_dirs(config: dict) -> dict[str, Path]:
    """Model directories that the zoo stage builds, by zoo name."""
    zoo = config.get("zoo")
    if not zoo:
        return {}
    names = ["base"] + sorted(zoo["experts"])
    return {name: RESULTS / "zoo" / name for name in names}


def zoo_task_files(config: dict) -> dict[str, Path]:
    zoo = config.get("zoo")
    if not zoo:
        return {}
    return {name: RESULTS / "zoo" / "tasks" / f"{name}.parquet" for name in zoo.get("tasks", [])}


def model_location(spec: dict) -> str:
    """What ``from_pretrained`` is given: a local directory or a hub id."""
    return spec["path"] if "path" in spec else spec["hub"]


def local_model_dir(spec: dict) -> Path | None:
    return Path(spec["path"]) if "path" in spec else None


def run_tasks(config: dict, run: str) -> list[str]:
    return list(config["runs"][run].get("tasks") or config["tasks"])


def check_config(config: dict) -> None:
    """Raise ``MergeflowError`` naming the first key whose reference cannot be resolved."""
    models = config["models"]
    if config["base_model"] not in models:
        raise MergeflowError(f"config: base_model {config['base_model']!r} is not one of models {sorted(models)}")
    for name in config["endpoints"]:
        if name not in models:
            raise MergeflowError(f"config: endpoint {name!r} is not one of models {sorted(models)}")
        if name == config["base_model"]:
            raise MergeflowError(f"config: endpoint {name!r} is also the base_model")
    built = {str(p) for p in zoo_model_dirs(config).values()}
    for name, spec in models.items():
        path = local_model_dir(spec)
        if path is not None and str(path) not in built and not path.is_dir():
            raise MergeflowError(f"config: model {name!r}: directory {str(path)!r} does not exist")
    written = {str(p) for p in zoo_task_files(config).values()}
    for task, tcfg in config["tasks"].items():
        if tcfg["scorer"] == "mc_loglik" and "choices" not in tcfg:
            raise MergeflowError(f"config: task {task!r} uses scorer mc_loglik but names no 'choices' column")
        src = tcfg["source"]
        if "path" in src and src["path"] not in written and not Path(src["path"]).exists():
            raise MergeflowError(f"config: task {task!r}: source file {src['path']!r} does not exist")
    for run, rcfg in config["runs"].items():
        for task in rcfg.get("tasks") or []:
            if task not in config["tasks"]:
                raise MergeflowError(f"config: run {run!r} names task {task!r}, which is not one of tasks {sorted(config['tasks'])}")


def load_config(path: str | Path) -> dict:
    """Read a config file, validate it against the schema (filling defaults) and cross-check it."""
    from snakemake.utils import validate

    path = Path(path)
    if not path.exists():
        raise MergeflowError(f"config file {str(path)!r} does not exist")
    config = yaml.safe_load(path.read_text())
    try:
        validate(config, str(SCHEMA))
    except Exception as err:  # snakemake wraps jsonschema's error; keep its message
        raise MergeflowError(f"config {str(path)!r}: {err}") from err
    check_config(config)
    return config
