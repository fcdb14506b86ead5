"""Where things live: the result paths a run writes and the local directory of each model.

Every stage reads models from local directories: a model's ``path``, the directory the fetch
stage writes a hub model to, the zoo's, or another run's final merge. This module only names
paths; it reads nothing.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = Path("results")


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


def hub_model_dir(spec: dict) -> Path:
    """Where the fetch stage puts a hub model: ``results/hub/ORG--NAME[@REVISION]``."""
    revision = spec.get("revision")
    return RESULTS / "hub" / (spec["hub"].replace("/", "--") + (f"@{revision}" if revision else ""))


def run_merge_dir(run: str) -> Path:
    """Where a run's final merge is written (``final_merge``): what ``{run: NAME}`` models read."""
    return RESULTS / "runs" / run / "final" / "merge"


def local_model_dir(spec: dict) -> Path:
    """A model's local directory: its ``path``, another run's final merge, or the directory its
    hub id is fetched to."""
    if "path" in spec:
        return Path(spec["path"])
    if "run" in spec:
        return run_merge_dir(spec["run"])
    return hub_model_dir(spec)


def model_location(spec: dict) -> str:
    """What the merger and ``from_pretrained`` are given: always a local directory."""
    return str(local_model_dir(spec))
