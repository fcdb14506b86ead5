"""A model directory's safetensors weight files, found without torch: the merge reads its tensors
from them (:class:`mergeflow.merge.sources.ModelSource`) and the workflow fingerprints them while
it parses its rules (:func:`mergeflow.check.weights_fingerprint`)."""

from __future__ import annotations

import json
from pathlib import Path

from mergeflow.errors import MergeflowError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def weight_files(model_dir: Path, owner: str) -> list[Path]:
    """The safetensors files of ``model_dir`` in the order their tensors are read: the shards its
    index names (in the index's order), else ``model.safetensors``, else every ``*.safetensors``,
    sorted. ``owner`` (``"model 'math'"``) opens the message of each error: a missing directory,
    a shard the index names but the directory lacks, no safetensors file at all (pickled weights
    are named, never loaded)."""
    if not model_dir.is_dir():
        raise MergeflowError(f"{owner}: directory {str(model_dir)!r} does not exist")
    index = model_dir / INDEX_FILE
    if index.is_file():
        shards = list(dict.fromkeys(json.loads(index.read_text()).get("weight_map", {}).values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise MergeflowError(f"{owner}: safetensors file {missing[0]!r} named in {INDEX_FILE} is missing "
                                 f"from {str(model_dir)!r}")
        return [model_dir / s for s in shards]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    hint = (f"; its weights {pickles} are pickled, which mergeflow never loads: convert them to safetensors"
            if pickles else "")
    raise MergeflowError(f"{owner}: no safetensors file in {str(model_dir)!r}{hint}")
