"""``provenance.json``: what produced a run's results — config, package versions, commit, seeds.

It holds no timestamps or host names, so the same config on the same checkout gives the same file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("mergeflow", "snakemake", "torch", "transformers", "tokenizers", "safetensors", "datasets",
            "pyro-ppl", "nevergrad", "pandas", "pyarrow", "numpy")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(repo: Path) -> dict[str, str | bool | None]:
    """The checkout's commit and whether it had uncommitted changes to tracked files."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip() != ""
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def seeds(config: dict, run: str) -> dict[str, int]:
    out = {"seed": config["seed"], "run_seed": config["runs"][run]["seed"]}
    if config.get("zoo"):
        out["zoo_seed"] = config["zoo"]["seed"]
    return out


def write_provenance(config: dict, run: str, out: str | Path) -> dict:
    record = {
        "run": run,
        "config": config,
        "seeds": seeds(config, run),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "git": git_commit(Path(__file__).resolve().parents[2]),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return record
