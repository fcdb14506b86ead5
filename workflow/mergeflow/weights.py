"""A model directory's safetensors weight files, found without torch: the merge reads its tensors
from them (:class:`mergeflow.merge.sources.ModelSource`) and the workflow fingerprints them while
it parses its rules (:func:`mergeflow.check.weights_fingerprint`)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from mergeflow.errors import MergeflowError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file, in words that name the real reason (a symlink loop, a
    link to nothing, no permission, a directory); None when it can be, or when nothing is there
    at all (the caller says what was expected)."""
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"{str(path)!r} is a symbolic link loop"
        if err.errno == errno.ENOENT:
            return f"{str(path)!r} is a link to {os.readlink(path)!r}, which does not exist" if path.is_symlink() else None
        return f"{str(path)!r} cannot be read: {err.strerror}"
    if path.is_dir():
        return f"{str(path)!r} is a directory, not a file"
    if not os.access(path, os.R_OK):
        return f"{str(path)!r} cannot be read: permission denied"
    return None


def weight_files(model_dir: Path, owner: str) -> list[Path]:
    """The safetensors files of ``model_dir`` in the order their tensors are read: the shards its
    index names (in the index's order), else ``model.safetensors``, else every ``*.safetensors``,
    sorted. ``owner`` (``"model 'math'"``) opens the message of each error: a missing directory,
    a shard the index names but the directory lacks, no safetensors file at all (pickled weights
    are named, never loaded)."""
    if not model_dir.is_dir():
        raise MergeflowError(f"{owner}: directory {str(model_dir)!r} does not exist")
    index = model_dir / INDEX_FILE
    if problem := file_problem(index):
        raise MergeflowError(f"{owner}: {problem}")
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
    for file in files:
        if problem := file_problem(file):
            raise MergeflowError(f"{owner}: weight file {problem}")
    if files:
        return files
    pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
    hint = (f"; its weights {pickles} are pickled, which mergeflow never loads: convert them to safetensors"
            if pickles else "")
    raise MergeflowError(f"{owner}: no safetensors file in {str(model_dir)!r}{hint}")
