"""Where things live: the result paths a run writes and the local directory of each model.

Every stage reads models from local directories: a model's ``path``, the directory the fetch
stage writes a hub model to, the convert_gguf stage a GGUF model or the finetune stage a model it
trains, the zoo's, or another run's final merge. This module only names
paths; it reads nothing.
"""

from __future__ import annotations

import hashlib
import json
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


def gguf_model_dir(spec: dict) -> Path:
    """Where the convert_gguf stage puts a GGUF model: ``results/gguf/{name}``, the file's name
    without ``.gguf``, and the dtype where it is not float32."""
    source = spec["gguf"]
    stem = Path(source if isinstance(source, str) else source["file"]).name.removesuffix(".gguf")
    dtype = spec.get("dtype", "float32")
    return RESULTS / "gguf" / (stem if dtype == "float32" else f"{stem}-{dtype}")


def finetune_model_dir(spec: dict) -> Path:
    """Where the finetune stage puts a model fine-tuned here: ``results/finetune/FROM-DIGEST``, the
    digest of its ``finetune`` section, so that a changed recipe is a new model beside the old."""
    section = spec["finetune"]
    digest = hashlib.sha256(json.dumps(section, sort_keys=True).encode()).hexdigest()[:10]
    return RESULTS / "finetune" / f"{section['from']}-{digest}"


def model_check_file(name: str, inputs: dict) -> Path:
    """Where a model's check report is written: ``results/check/NAME/DIGEST.json``, the digest of
    what the check depends on (``inputs``: the model's and the base's config entries, and the
    fingerprints of weights the workflow does not write). A changed entry is a new report beside
    the old, so a check that fails destroys no earlier report, and a reverted config finds its
    report where it left it (nothing that read the model reruns)."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:10]
    return RESULTS / "check" / name / f"{digest}.json"


def run_merge_dir(run: str) -> Path:
    """Where a run's final merge is written (``final_merge``): what ``{run: NAME}`` models read."""
    return RESULTS / "runs" / run / "final" / "merge"


def local_model_dir(spec: dict) -> Path:
    """A model's local directory: its ``path``, another run's final merge, the directory its GGUF
    file is converted into, the one it is fine-tuned into, or the one its hub id is fetched to."""
    if "path" in spec:
        return Path(spec["path"])
    if "run" in spec:
        return run_merge_dir(spec["run"])
    if "gguf" in spec:
        return gguf_model_dir(spec)
    if "finetune" in spec:
        return finetune_model_dir(spec)
    return hub_model_dir(spec)


def model_location(spec: dict) -> str:
    """What the merger and ``from_pretrained`` are given: always a local directory."""
    return str(local_model_dir(spec))


def merge_tokenizer_source(config: dict) -> str | None:
    """The config's ``tokenizer_source`` as a recipe names it: ``base``, ``union`` or a model's
    directory; None when unset."""
    source = config.get("tokenizer_source")
    if source is None or source in ("base", "union"):
        return source
    return model_location(config["models"][source])
