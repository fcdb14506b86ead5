"""Streaming merge to an HF model directory, one block of one tensor in memory at a time.

Shards are written as the tensors are merged: every shard's safetensors header is known in
advance from the plan (names, shapes, output dtype), so each merged block goes straight to
disk. Sources are read a block at a time with plain file reads into reused buffers, so peak
memory is a few blocks (plus one float32 copy of a tensor for magnitude trims), not a model
and not a tensor per source.
"""

from __future__ import annotations

import json
import queue
import shutil
import struct
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator

import torch

from mergeflow.dtypes import dtype_name
from mergeflow.errors import MergeflowError
from mergeflow.merge.plan import (
    MergePlan, ReadRange, TensorPlan, check_finite, merge_tensor_blocks, open_sources, plan_merge,
)
from mergeflow.merge.recipe import Recipe, recipe_hash, save_recipe
from mergeflow.merge.sources import DTYPE_CODES, ModelSource
from mergeflow.merge.vocab import align_sources, fill_rows, plan_vocabulary
from mergeflow.outputs import check_output_dir, staged_dir
from mergeflow.weights import INDEX_FILE

DEFAULT_MAX_SHARD_SIZE = 2 * 1024**3
RECIPE_FILE = "mergeflow_recipe.yaml"
TOKENIZER_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json",
]


def _tensor_bytes(plan: TensorPlan, dtype: torch.dtype) -> int:
    count = 1
    for size in plan.shape:
        count *= size
    return count * torch.empty((), dtype=dtype).element_size()


def assign_shards(plans: list[TensorPlan], dtype: torch.dtype, max_shard_size: int) -> list[list[TensorPlan]]:
    """Consecutive tensors grouped into shards of at most ``max_shard_size`` bytes (a single
    larger tensor gets a shard of its own)."""
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for plan in plans:
        nbytes = _tensor_bytes(plan, dtype)
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(plan)
        size += nbytes
    return shards


def shard_header(plans: list[TensorPlan], dtype: torch.dtype) -> bytes:
    """The safetensors header (length prefix included) for tensors written in this order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for plan in plans:
        nbytes = _tensor_bytes(plan, dtype)
        header[plan.name] = {"dtype": DTYPE_CODES[dtype], "shape": list(plan.shape),
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded


class _Writer:
    """Writes blocks to a file on a second thread (file writes release the GIL), so writing
    overlaps merging; at most ``depth`` blocks wait."""

    def __init__(self, handle: BinaryIO, depth: int = 2):
        self.handle = handle
        self.pending: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (data := self.pending.get()) is not None:
            if self.error is None:
                try:
                    self.handle.write(data)
                except BaseException as err:  # re-raised on the merging thread
                    self.error = err

    def write(self, tensor: torch.Tensor) -> None:
        """Queue a copy of ``tensor``'s bytes (the caller reuses its buffers)."""
        if self.error is not None:
            raise self.error
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        self.pending.put(flat.view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


@contextmanager
def _one_compute_thread(device: torch.device) -> Iterator[None]:
    """Run torch's CPU operations on one thread for the duration. The merge's operations are
    memory-bound and, on blocks, short: a second thread gains little, and when another process
    holds a core every parallel operation waits for a descheduled thread (measured: an add on
    4 MiB 5x slower with 2 threads than 1 on 2 busy cores). The other core writes the output."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _block_reader(sources: dict[str, ModelSource], device: torch.device,
                  dtype: torch.dtype) -> tuple[ReadRange, dict]:
    """A ``ReadRange`` over ``sources`` reading into one reused buffer per (model, tensor);
    clear the returned dict of buffers after each tensor."""
    buffers: dict[tuple[str, str], torch.Tensor] = {}

    def read(model: str, name: str, start: int, stop: int) -> torch.Tensor:
        info = sources[model].info(name)
        buffer = buffers.get((model, name))
        if buffer is None or buffer.numel() < stop - start:
            buffer = buffers[(model, name)] = torch.empty(stop - start, dtype=info.dtype)
        block = sources[model].read_range(name, start, buffer[:stop - start])
        check_finite(block, name, model)
        return block.to(device=device, dtype=dtype)

    return read, buffers


def _output_config(plan: MergePlan, sources: dict[str, ModelSource]) -> dict:
    config = dict(sources[plan.template].config)
    config["num_hidden_layers"] = plan.num_layers
    # transformers < 5 reads torch_dtype, >= 5 reads dtype
    config["torch_dtype"] = dtype_name(plan.out_dtype)
    config["dtype"] = dtype_name(plan.out_dtype)
    return config


def _copy_tokenizer(source_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, out_dir / name)
            copied.append(name)
    return copied


def model_card(recipe: Recipe, lineage: list[str] | None = None) -> str:
    """The README of a merged model; ``lineage`` lines (where it came from) close it."""
    models = "\n".join(f"- `{path}`" for path in recipe.model_paths())
    return (
        "---\nlibrary_name: transformers\ntags:\n- merge\n- mergeflow\n---\n"
        f"# Merged model\n\nMerged with mergeflow using the `{recipe.merge_method}` method"
        + (f" on base `{recipe.base_model}`" if recipe.base_model else "")
        + f".\n\n## Source models\n\n{models}\n\n## Recipe\n\n"
        "The recipe below (also in `" + RECIPE_FILE + "`) reproduces this merge with "
        "`mergeflow merge`; without the mergeflow extensions (`seed`, per-slice "
        "`merge_method`) it is a mergekit configuration.\n\n"
        f"```yaml\n{recipe.to_yaml()}```\n"
        + ("" if lineage is None else
           "\n".join(["", "## Lineage", "", f"- recipe hash: `{recipe_hash(recipe)}`", *lineage]) + "\n")
    )


def merge_to_dir(recipe: Recipe, out_dir: str | Path, device: str = "cpu",
                 dtype: str | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
                 force: bool = False, lineage: list[str] | None = None) -> Path:
    """Merge ``recipe`` into an HF model directory ``out_dir``, whole or not at all.

    ``dtype`` overrides the output dtype. Writes sharded safetensors with
    ``model.safetensors.index.json``, ``config.json``, the tokenizer of ``tokenizer_source``
    (default: the base model), a model card ``README.md`` (closing with the ``lineage`` lines,
    if given) and the recipe. Models whose vocabularies differ are merged over the output
    vocabulary of ``tokenizer_source`` (:mod:`mergeflow.merge.vocab`), whose tokenizer is
    written and whose size ``config.json`` says. Everything is written into a staging directory
    beside ``out_dir`` that replaces it only once complete; a non-empty ``out_dir`` is refused
    unless ``force``, a directory of a model the recipe reads always
    (:func:`mergeflow.outputs.staged_dir`).
    """
    protected = recipe.model_paths() + ([recipe.tokenizer_model] if recipe.tokenizer_model else [])
    check_output_dir(out_dir, force=force, protected=protected)
    sources = open_sources(recipe)
    tokenizer_dir = Path(recipe.tokenizer_model or recipe.base_model or recipe.model_paths()[0])
    if not tokenizer_dir.is_dir():
        raise MergeflowError(f"tokenizer_source {str(tokenizer_dir)!r} is not a directory")
    vocab = plan_vocabulary(recipe, sources)  # None: one vocabulary, the tensors as they are
    if vocab is not None:
        sources = align_sources(sources, vocab)
    plan = plan_merge(recipe, sources, out_dtype=dtype)
    if vocab is not None:
        fill_rows(plan, recipe, sources, vocab)
    needed = sum(_tensor_bytes(t, plan.out_dtype) for t in plan.tensors)
    with staged_dir(out_dir, force=force, protected=protected, needed=needed) as out:
        _write_merge(plan, sources, out, torch.device(device), max_shard_size)
        if vocab is None:
            _copy_tokenizer(tokenizer_dir, out)
        else:
            vocab.tokenizer.save_pretrained(out)
        (out / "README.md").write_text(model_card(recipe, lineage))
        save_recipe(recipe, out / RECIPE_FILE)
    return Path(out_dir)


def _write_merge(plan: MergePlan, sources: dict[str, ModelSource], out: Path,
                 torch_device: torch.device, max_shard_size: int) -> None:
    """The weights (shards and their index), ``config.json`` and ``generation_config.json``."""
    read, buffers = _block_reader(sources, torch_device, plan.compute_dtype)
    shards = assign_shards(plan.tensors, plan.out_dtype, max_shard_size)
    weight_map = {}
    total_size = 0
    with _one_compute_thread(torch_device):
        for number, shard in enumerate(shards, start=1):
            file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            with open(out / file_name, "wb") as handle:
                handle.write(shard_header(shard, plan.out_dtype))
                writer = _Writer(handle)
                try:
                    for tensor_plan in shard:
                        for block in merge_tensor_blocks(tensor_plan, read, torch_device):
                            writer.write(block.to(plan.out_dtype))
                        buffers.clear()
                        weight_map[tensor_plan.name] = file_name
                        total_size += _tensor_bytes(tensor_plan, plan.out_dtype)
                finally:
                    writer.close()
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(_output_config(plan, sources), indent=2))
    template_dir = sources[plan.template].path
    if (template_dir / "generation_config.json").is_file():
        shutil.copyfile(template_dir / "generation_config.json", out / "generation_config.json")
