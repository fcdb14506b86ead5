"""A search's chosen recipes written as HF model directories whose card says where they came
from: the final merge (rule ``final_merge``) and a generation's best (rule ``best_weights``)."""

from __future__ import annotations

import pandas as pd

from mergeflow.evolve.history import best_row
from mergeflow.merge.candidates import load_candidate, materialise


def final_merge(recipe_path: str, out_dir: str, lineage: dict, history_path: str, result: str) -> None:
    """The recipe a search ended on, materialised with its lineage and where the search found it
    (``result``: what the search ends on, its fitness kind's; see ``history.best_row``)."""
    history = pd.read_parquet(history_path)
    best = best_row(history, result)
    materialise(load_candidate(recipe_path), out_dir, lineage=[
        *(f"- {key}: {value}" for key, value in lineage.items()),
        f"- found in generation {int(best['generation'])} as candidate {int(best['index'])} of {len(history)} "
        "evaluated", f"- search fitness: {best['fitness']:.4f}"])


def best_weights(recipe_path: str, out_dir: str, lineage: dict) -> None:
    """A generation's best recipe, materialised with its lineage."""
    materialise(load_candidate(recipe_path), out_dir, lineage=[f"- {key}: {value}" for key, value in lineage.items()])
