"""The floating-point dtypes mergeflow computes in and writes: one table for the config schema,
recipes, the CLI, the merger and the evaluator. Names only at import, so the CLI stays fast."""

from __future__ import annotations

from mergeflow.errors import MergeflowError

DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str, where: str = "dtype"):
    """The torch dtype called ``name``; MergeflowError naming ``where`` when it is not one of ours."""
    import torch  # heavy: the names alone (DTYPES, for the config check) need no torch

    if name not in DTYPES:
        raise MergeflowError(f"{where}: dtype {name!r} is not one of {list(DTYPES)}")
    return getattr(torch, name)


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")
