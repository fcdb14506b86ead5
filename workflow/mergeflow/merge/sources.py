"""Read access to HF model directories holding safetensors weights, one tensor at a time."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mergeflow.errors import MergeflowError, SourceFileError
from mergeflow.merge.params import layer_index
from mergeflow.weights import file_problem, weight_files

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, from the safetensors header (no data read)."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # of the tensor's first byte in the file

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


def read_header(file: Path, model: str | Path | None = None) -> dict:
    """The JSON header of a safetensors file, checked to describe no more data than the file
    holds; its ``__data_start__`` is the offset of the data in the file.

    A file it cannot read (truncated, corrupt) raises ``SourceFileError`` naming the file and,
    when given, its ``model``."""
    owner = f"model {str(model)!r}: " if model is not None else ""
    try:
        size = file.stat().st_size
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if 8 + length > size:
                raise ValueError(f"its header claims {length} bytes but the file has {size}")
            header = json.loads(handle.read(length))
        end = max((meta["data_offsets"][1] for name, meta in header.items() if name != "__metadata__"), default=0)
    except (OSError, struct.error, ValueError, KeyError, TypeError, IndexError) as err:
        raise SourceFileError(f"{owner}weight file {str(file)!r} is not a readable safetensors file "
                              f"(truncated or corrupt?): {err}") from err
    if 8 + length + end > size:
        raise SourceFileError(f"{owner}weight file {str(file)!r} is truncated: its header describes "
                              f"{8 + length + end} bytes but the file has {size}")
    header["__data_start__"] = 8 + length
    return header


class ModelSource:
    """A model directory: its config and a lazy, tensor-by-tensor view of its weights. Errors name
    the model by ``name`` (a config's name for it), else by its directory."""

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = str(self.path) if name is None else name
        files = weight_files(self.path, f"model {self.name!r}")
        config_file = self.path / "config.json"
        if problem := file_problem(config_file):
            raise MergeflowError(f"model {self.name!r}: {problem}")
        if not config_file.is_file():
            raise MergeflowError(f"model {self.name!r}: no config.json in {str(self.path)!r}")
        self.config: dict = json.loads(config_file.read_text())
        self.tensors: dict[str, TensorInfo] = self._index_tensors(files)

    def _index_tensors(self, files: list[Path]) -> dict[str, TensorInfo]:
        tensors = {}
        for file in files:
            header = read_header(file, self.name)
            start = header.pop("__data_start__")
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                tensors[name] = TensorInfo(file, SAFETENSORS_DTYPES[meta["dtype"]], tuple(meta["shape"]),
                                           start + meta["data_offsets"][0])
        return tensors

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name -> shape, from the headers."""
        return {name: info.shape for name, info in self.tensors.items()}

    @property
    def num_layers(self) -> int:
        """Transformer blocks: from the config, else counted from the tensor names."""
        if isinstance(self.config.get("num_hidden_layers"), int):
            return self.config["num_hidden_layers"]
        indices = {layer_index(name) for name in self.tensors} - {None}
        return max(indices) + 1 if indices else 0

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MergeflowError(f"tensor {name!r} is missing from model {self.name!r}") from None

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor. The file is mapped only for this read, so memory stays bounded."""
        info = self.info(name)
        try:
            with safe_open(info.file, framework="pt") as handle:
                return handle.get_tensor(name)
        except (OSError, SafetensorError) as err:
            raise SourceFileError(f"model {self.name!r}: cannot read tensor {name!r} from weight file "
                                  f"{str(info.file)!r}: {err}") from err

    def read_range(self, name: str, start: int, out: torch.Tensor) -> torch.Tensor:
        """Read the flat entries ``[start, start + out.numel())`` of a tensor into ``out`` (a
        contiguous tensor of the tensor's dtype) with plain file reads: unlike a memory map, no
        page of the file counts towards this process's memory, and no tensor is allocated."""
        info = self.info(name)
        if out.dtype != info.dtype or not out.is_contiguous() or start + out.numel() > info.numel:
            raise MergeflowError(f"read_range of tensor {name!r}: bad buffer or range")
        target = memoryview(out.view(-1).view(torch.uint8).numpy())
        try:
            with open(info.file, "rb") as handle:
                handle.seek(info.offset + start * out.element_size())
                read = handle.readinto(target)
        except OSError as err:
            raise SourceFileError(f"model {self.name!r}: cannot read tensor {name!r} from weight file "
                                  f"{str(info.file)!r}: {err}") from err
        if read != len(target):
            raise SourceFileError(f"model {self.name!r}: weight file {str(info.file)!r} ended "
                                  f"inside tensor {name!r}")
        return out
