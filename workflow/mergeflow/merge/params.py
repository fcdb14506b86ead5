"""Resolution of recipe parameter values for one tensor.

A parameter *setting* in a recipe is one of (mergekit's format):

- a scalar (number, bool or string): the same value everywhere;
- a list of numbers, a *gradient*: interpolated linearly across the layers of a slice, so
  ``[0, 1]`` goes from 0 at the first layer to 1 at the last; a list of ``num_layers`` values
  gives each layer its own value exactly;
- a list of ``{filter: SUBSTRING, value: SETTING}`` entries: the first entry whose filter is a
  substring of the tensor name (or that has no filter, or filter ``"*"``) gives the value,
  which may itself be a gradient. Typical filters are ``self_attn`` and ``mlp`` with a last
  entry without filter for the rest.

Gradients are evaluated at ``t`` in [0, 1]: ``layer / (layers_in_slice - 1)`` for a tensor of a
layer, 0 for the tensors before the layers (embeddings) and 1 for those after (final norm,
``lm_head``).
"""

from __future__ import annotations

import math
import re
from typing import Any

from mergeflow.errors import MergeflowError

# Transformer block index in HF tensor names: "model.layers.3.mlp..." (Llama, Mistral, Qwen),
# "transformer.h.3.attn..." (GPT-2 style).
_LAYER_PATTERN = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """The transformer block index in a tensor name, or None for tensors outside the blocks."""
    match = _LAYER_PATTERN.search("." + tensor_name)
    return int(match.group(1)) if match else None


def with_layer_index(tensor_name: str, new_index: int) -> str:
    """The tensor name with its block index replaced by ``new_index``."""
    padded = "." + tensor_name
    match = _LAYER_PATTERN.search(padded)
    if match is None:
        raise MergeflowError(f"tensor {tensor_name!r} has no layer index")
    start, end = match.span(1)
    return (padded[:start] + str(new_index) + padded[end:])[1:]


def is_pre_layer_tensor(tensor_name: str) -> bool:
    """Whether a tensor outside the blocks comes before them (embeddings) rather than after."""
    return "embed" in tensor_name or "wte" in tensor_name or "wpe" in tensor_name


def layer_position(layer_in_slice: int, slice_length: int) -> float:
    """Gradient position t of a layer within its slice (mergekit's convention)."""
    if slice_length <= 1:
        return 1.0
    return layer_in_slice / (slice_length - 1)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _interpolate(values: list[float], t: float) -> float:
    scaled = t * (len(values) - 1)
    # Snap to the nearest entry when rounding put us a hair off it, so a list with one value per
    # layer returns exactly that layer's value.
    nearest = round(scaled)
    if math.isclose(scaled, nearest, abs_tol=1e-9):
        return float(values[int(nearest)])
    low = int(math.floor(scaled))
    high = min(low + 1, len(values) - 1)
    frac = scaled - low
    return (1.0 - frac) * values[low] + frac * values[high]


def _filter_matches(entry_filter: str | None, tensor_name: str) -> bool:
    return entry_filter in (None, "*") or entry_filter in tensor_name


def resolve_value(setting: Any, t: float, tensor_name: str, key: str = "parameter") -> Any:
    """The value of a parameter setting for a tensor at gradient position ``t``.

    Returns None when a filter list has no entry matching the tensor.
    """
    if setting is None or _is_number(setting) or isinstance(setting, (bool, str)):
        return setting
    if isinstance(setting, list):
        if not setting:
            raise MergeflowError(f"parameter {key!r} is an empty list")
        if all(_is_number(v) for v in setting):
            return _interpolate(setting, t)
        if all(isinstance(v, dict) for v in setting):
            for entry in setting:
                if "value" not in entry:
                    raise MergeflowError(f"parameter {key!r}: filter entry {entry} has no 'value'")
                if _filter_matches(entry.get("filter"), tensor_name):
                    return resolve_value(entry["value"], t, tensor_name, key)
            return None
        if all(isinstance(v, (str, bool)) for v in setting):
            # Categorical gradient: step through the values across the layers.
            return setting[min(int(t * len(setting)), len(setting) - 1)]
    raise MergeflowError(
        f"parameter {key!r} has unsupported value {setting!r}: expected a scalar, a list of "
        "numbers, or a list of {filter, value} entries"
    )
