"""``provenance.json``: what produced a run's results — config, package versions, commit, seeds.

It holds no timestamps or host names, so the same config on the same checkout and machine gives
the same file. It does name the CPU and GPUs: float results differ across hardware.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("mergeflow", "snakemake", "torch", "transformers", "tokenizers", "safetensors", "datasets",
            "pyro-ppl", "nevergrad", "pandas", "pyarrow", "numpy", "matplotlib")


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


def hardware() -> dict[str, object]:
    """The CPU model and core count, and the GPUs torch sees (CUDA kernels differ by card too)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus: list[str] = []
    try:
        import torch  # heavy, and only to name the GPUs: the provenance job is light bookkeeping

        if torch.cuda.is_available():
            gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return {"machine": platform.machine(), "system": platform.system(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "gpus": gpus}


def seeds(config: dict, run: str) -> dict[str, int]:
    out = {"seed": config["seed"], "run_seed": config["runs"][run]["seed"]}
    if config.get("zoo"):
        out["zoo_seed"] = config["zoo"]["seed"]
    return out


def model_fingerprints(checks: list[str | Path]) -> dict[str, dict]:
    """Which weights a run read: per model, its check report's fingerprint, location and size."""
    reports = [json.loads(Path(c).read_text()) for c in checks]
    return {r["model"]: {key: r[key] for key in ("fingerprint", "location", "parameters")} for r in reports}


def zoo_fingerprint(config: dict, models: dict[str, dict]) -> str | None:
    """One digest of the embedded zoo's weights (its models' fingerprints): the zoo trained on
    another machine differs (CPU kernels), and this tells two zoos apart."""
    from mergeflow.locations import zoo_model_dirs

    zoo = {str(path) for path in zoo_model_dirs(config).values()}
    mine = sorted((name, entry["fingerprint"]) for name, entry in models.items() if entry["location"] in zoo)
    return hashlib.sha256(json.dumps(mine).encode()).hexdigest()[:16] if mine else None


def write_provenance(config: dict, run: str, out: str | Path, checks: list[str | Path] = ()) -> dict:
    """The run's record: its config, seeds, the fingerprints of the weights it read (``checks``:
    their check reports) and the zoo's, versions, commit and hardware."""
    models = model_fingerprints(checks)
    record = {
        "run": run,
        "config": config,
        "seeds": seeds(config, run),
        "models": models,
        "zoo_fingerprint": zoo_fingerprint(config, models),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "git": git_commit(Path(__file__).resolve().parents[2]),
        "hardware": hardware(),
    }
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return record
