"""The uniform baseline merge every search is compared with (rule ``baseline_model``)."""

from __future__ import annotations

from mergeflow.merge.recipe import recipe_from_dict, save_recipe
from mergeflow.merge.stream import merge_to_dir


def baseline_model(baseline: dict, base: str, sources: list[str], recipe_out: str, model_out: str) -> None:
    """The uniform baseline: every source with the same weight, merged with ``baseline.method``."""
    recipe = recipe_from_dict({
        "merge_method": baseline["method"],
        "base_model": base,
        "models": [{"model": s, "parameters": {"weight": baseline["weight"]}} for s in sources],
        "dtype": "float32",
        **({"tokenizer_source": baseline["tokenizer_source"]} if baseline.get("tokenizer_source") else {}),
    })
    save_recipe(recipe, recipe_out)
    merge_to_dir(recipe, model_out)
