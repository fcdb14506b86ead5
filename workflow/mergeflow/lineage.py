"""Merged models written as HF directories whose model card records where they came from: the
uniform baseline merge, and a search's best recipe (each generation's, and the final merge)."""

from __future__ import annotations

import pandas as pd


def baseline_model(baseline: dict, base: str, sources: list[str], recipe_out: str, model_out: str) -> None:
    """The uniform baseline: every source with the same weight, merged with ``baseline.method``."""
    from mergeflow.merge import merge_to_dir, recipe_from_dict, save_recipe

    recipe = recipe_from_dict({
        "merge_method": baseline["method"],
        "base_model": base,
        "models": [{"model": s, "parameters": {"weight": baseline["weight"]}} for s in sources],
        "dtype": "float32",
    })
    save_recipe(recipe, recipe_out)
    merge_to_dir(recipe, model_out)


def merge_recipe(recipe_path: str, out_dir: str, lineage: dict, history_path: str | None = None) -> None:
    """Materialise a recipe as an HF directory whose model card also records where it came from."""
    from mergeflow.evolve.history import best_row
    from mergeflow.merge.candidates import load_candidate, materialise

    recipe = load_candidate(recipe_path)
    lines = [f"- {key}: {value}" for key, value in lineage.items()]
    if history_path:
        history = pd.read_parquet(history_path)
        best = best_row(history)
        lines += [f"- found in generation {int(best['generation'])} as candidate {int(best['index'])} of "
                  f"{len(history)} evaluated", f"- search fitness: {best['fitness']:.4f}"]
    materialise(recipe, out_dir, lineage=lines)
