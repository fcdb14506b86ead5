"""A search candidate or final merge is either a parameter-space recipe or a layer path (a
``passthrough`` recipe); these functions read and write either one."""

from __future__ import annotations

from pathlib import Path

import yaml

from mergeflow.errors import MergeflowError
from mergeflow.merge.path import LayerPath, export_path, is_path_recipe, path_from_dict
from mergeflow.merge.recipe import Recipe, recipe_from_dict

Candidate = Recipe | LayerPath


def candidate_from_dict(data, where: str = "recipe") -> Candidate:
    return path_from_dict(data, where) if is_path_recipe(data) else recipe_from_dict(data, where)


def candidate_from_yaml(text: str, where: str = "recipe") -> Candidate:
    """A recipe or a layer path from YAML (a history row's, a recipe file's)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise MergeflowError(f"{where} is not valid YAML: {err}") from None
    return candidate_from_dict(data, where)


def load_candidate(path: str | Path) -> Candidate:
    path = Path(path)
    if not path.is_file():
        raise MergeflowError(f"recipe file {str(path)!r} does not exist")
    return candidate_from_yaml(path.read_text(), where=f"recipe {str(path)!r}")


def materialise(candidate: Candidate, out_dir: str | Path, lineage: list[str] | None = None,
                force: bool = False, device: str = "cpu", dtype: str | None = None, **kwargs) -> Path:
    """Write a candidate as an HF model directory: a merge, or an exported layer path."""
    if isinstance(candidate, LayerPath):
        return export_path(candidate, out_dir, dtype=dtype, force=force, lineage=lineage, **kwargs)
    from mergeflow.merge.stream import merge_to_dir

    return merge_to_dir(candidate, out_dir, device=device, dtype=dtype, force=force, lineage=lineage, **kwargs)
