"""Parameter-space model merging: methods, recipes, streaming and in-memory merges."""

from mergeflow.merge.fast import InMemoryMerger, find_nonfinite
from mergeflow.merge.params import layer_index, resolve_value
from mergeflow.merge.plan import MergePlan, TensorPlan, merge_tensor, plan_merge
from mergeflow.merge.recipe import (
    ModelEntry, Recipe, SliceSource, SliceSpec, load_recipe, recipe_from_dict, recipe_from_yaml, recipe_hash,
    save_recipe,
)
from mergeflow.merge.registry import MERGE_METHODS, MergeMethod, get_method
from mergeflow.merge.stream import merge_to_dir

__all__ = [
    "InMemoryMerger", "find_nonfinite", "MERGE_METHODS", "MergeMethod",
    "get_method", "layer_index", "resolve_value", "MergePlan", "TensorPlan", "merge_tensor",
    "plan_merge", "ModelEntry", "Recipe", "SliceSource", "SliceSpec", "load_recipe",
    "recipe_from_dict", "recipe_from_yaml", "recipe_hash", "save_recipe", "merge_to_dir",
]
