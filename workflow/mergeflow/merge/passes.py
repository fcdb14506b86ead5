"""Passes over a tensor's blocks: how a method that needs a whole-tensor quantity (a norm, an
angle, a quantile) still merges a large tensor block by block.

Such a method registers a ``prepare`` function (``registry.MergeMethod.prepare``) that computes
the quantity from passes over the blocks, and takes the result as ``prepared`` when it merges a
block. The streaming writer passes over blocks read from disk (``plan.merge_tensor_blocks``);
the in-memory merger over its resident tensors as one block (``whole_tensor_pass``). Reductions
run per ``CPU_BLOCK`` chunk of the flat tensor, in order, and so give the same bits however the
tensor is split into blocks: stream blocks are multiples of ``CPU_BLOCK``.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

# CPU merges run in blocks of this many entries (512 KiB of float32): a dozen passes over a
# block stay in cache, where over a whole tensor each pass goes to memory, and the Python cost
# per block stays small. On the bench's 134M-parameter TIES merge: 2^16 against 2^14 in memory
# 1.44 s against 2.3 s (one core busy beside it: 1.75 s against 3.3 s); 2^17 against 2^16 in
# memory 1.24-1.38 s against 1.43-1.76 s, streaming about even (9.9-12.3 s against 10.5-13.0 s,
# a noisy machine); 2^18 streamed slower in one run.
CPU_BLOCK = 1 << 17

Block = tuple[int, list[Tensor], "Tensor | None"]
# ``passes(models=None)`` -> one pass over the tensor: (flat start, the blocks of the chosen
# models (indices into the method's ``tensors``; None: all), the base's block or None)
BlockPass = Callable[..., Iterator[Block]]


@contextmanager
def one_cpu_thread(device: torch.device | str) -> Iterator[None]:
    """Torch's CPU operations on one thread for the duration. Reductions (norms, dots, sums)
    round according to how torch's threads split them (a dot of 8192 entries already differs
    between one thread and two): every executor reduces on one."""
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def whole_tensor_pass(tensors: Sequence[Tensor], base: Tensor | None, row: int | None = None) -> BlockPass:
    """One pass over whole tensors as a single block, flat (or ``(-1, row)`` shaped)."""
    shape = (-1,) if row is None else (-1, row)

    def run(models: Sequence[int] | None = None) -> Iterator[Block]:
        chosen = range(len(tensors)) if models is None else models
        yield 0, [tensors[i].reshape(shape) for i in chosen], None if base is None else base.reshape(shape)

    return run


def chunks(*blocks: Tensor | None) -> Iterator[tuple[int, list]]:
    """``CPU_BLOCK`` runs of flat blocks that start at a multiple of it: (offset in the block,
    the runs; None stays None)."""
    size = next(b for b in blocks if b is not None).numel()
    for start in range(0, size, CPU_BLOCK):
        yield start, [None if b is None else b.reshape(-1)[start:start + CPU_BLOCK] for b in blocks]


def gram(passes: BlockPass, vectors: str) -> list[list[float]]:
    """The Gram matrix of the tensors as flat vectors: ``models`` (the models' tensors),
    ``task`` (their task vectors, ``x - base``; without a base, the models) or ``base+models``
    (the base, then the models).
    Dot products of float32 runs of ``CPU_BLOCK`` entries, summed in float64 in order."""
    total: Tensor | None = None
    scratch: dict[int, Tensor] = {}
    for _, models, base in passes():
        for _, runs in chunks(base, *models):
            run_base, run_models = runs[0], runs[1:]
            # into float32 buffers of our own: BLAS's dot rounds according to the alignment of
            # its inputs, and blocks of a read and of a resident tensor are aligned differently
            if vectors == "task" and run_base is not None:
                chosen = [torch.sub(m, run_base, out=_slot(scratch, i, m)) for i, m in enumerate(run_models)]
            else:
                runs = [run_base, *run_models] if vectors == "base+models" else run_models
                chosen = [_slot(scratch, i, m).copy_(m) for i, m in enumerate(runs)]
            dots = torch.stack([torch.dot(chosen[i], chosen[j])
                                for i in range(len(chosen)) for j in range(i, len(chosen))]).double()
            total = dots if total is None else total.add_(dots)
    assert total is not None
    values = iter(total.tolist())
    size = len(chosen)
    matrix = [[0.0] * size for _ in range(size)]
    for i in range(size):
        for j in range(i, size):
            matrix[i][j] = matrix[j][i] = next(values)
    return matrix


def _slot(scratch: dict[int, Tensor], index: int, like: Tensor) -> Tensor:
    """Slot ``index``'s float32 buffer for a run like ``like`` (a view of one of ``CPU_BLOCK``)."""
    buffer = scratch.get(index)
    if buffer is None or buffer.device != like.device:
        buffer = scratch[index] = torch.empty(CPU_BLOCK, dtype=torch.float32, device=like.device)
    return buffer[:like.numel()]


def quadratic(matrix: list[list[float]], a: Sequence[float], b: Sequence[float] | None = None) -> float:
    """``a^T G b`` (``b`` defaults to ``a``): dot products of combinations of the vectors."""
    b = a if b is None else b
    return sum(a[i] * matrix[i][j] * b[j] for i in range(len(a)) for j in range(len(b)))


def norm(matrix: list[list[float]], a: Sequence[float]) -> float:
    """The length of the combination ``sum(a_i v_i)`` (0 where rounding makes it negative)."""
    return math.sqrt(max(quadratic(matrix, a), 0.0))


def fill_flat(passes: BlockPass, numel: int, fill: Callable[[list[Tensor], Tensor | None, Tensor], None],
              models: Sequence[int] | None = None, dtype: torch.dtype = torch.float32,
              out: Tensor | None = None) -> Tensor:
    """A flat tensor of ``numel`` entries (``out``, or new on the first block's device) filled
    block by block: ``fill(model blocks, base block, into)`` writes a block's entries into
    ``into``."""
    buffer = out
    for start, blocks, base in passes(models):
        like = blocks[0] if blocks else base
        if buffer is None:
            buffer = torch.empty(numel, dtype=dtype, device=like.device)
        fill(blocks, base, buffer[start:start + like.numel()])
    assert buffer is not None
    return buffer
