"""What a search proposes and a final merge is: a candidate of one of two types, a
parameter-space recipe or a layer path (a ``passthrough`` recipe).

:data:`CANDIDATE_TYPES` is the one place that tells them apart: per type, its class, how its
YAML is recognised and read, the in-memory executor that makes a scoreable model of it while
the sources stay resident (the resident merger, or the path assembler), and the exporter that
writes it as an HF model directory. A search space names its type (its ``candidates``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


from mergeflow.errors import MergeflowError
from mergeflow.merge.assemble import PathAssembler
from mergeflow.merge.fast import InMemoryMerger
from mergeflow.merge.path import LayerPath, export_path, is_path_recipe, path_from_dict
from mergeflow.merge.recipe import Recipe, recipe_from_dict
from mergeflow.merge.stream import merge_to_dir
from mergeflow.yamlio import load_yaml

Candidate = Recipe | LayerPath


def _export_path(path: LayerPath, out_dir: str | Path, device: str = "cpu", **kwargs) -> Path:
    return export_path(path, out_dir, **kwargs)  # assembled on the CPU, whatever the device


@dataclass(frozen=True)
class CandidateType:
    """One type of candidate: its ``cls``; ``describes(data)``, whether a parsed YAML mapping is
    one; ``from_dict(data, where)``; ``executor(paths, device=, dtype=)``, which holds the source
    models and makes each candidate a model with ``merge(candidate)``; ``export(candidate,
    out_dir, device=, dtype=, force=, lineage=, ...)``, which writes it as an HF directory."""

    name: str
    cls: type
    describes: Callable[[Any], bool]
    from_dict: Callable[[Any, str], Candidate]
    executor: type
    export: Callable[..., Path]


# In the order a YAML mapping is tried against them: a layer path is the narrower description.
CANDIDATE_TYPES: dict[str, CandidateType] = {t.name: t for t in [
    CandidateType("path", LayerPath, is_path_recipe, path_from_dict, PathAssembler, _export_path),
    CandidateType("recipe", Recipe, lambda data: True, recipe_from_dict, InMemoryMerger, merge_to_dir),
]}


def candidate_type(candidate: Candidate) -> CandidateType:
    """The type of a candidate object."""
    for kind in CANDIDATE_TYPES.values():
        if isinstance(candidate, kind.cls):
            return kind
    raise MergeflowError(f"{type(candidate).__name__} is not a candidate type ({', '.join(CANDIDATE_TYPES)})")


def candidate_from_dict(data, where: str = "recipe") -> Candidate:
    kind = next(k for k in CANDIDATE_TYPES.values() if k.describes(data))
    return kind.from_dict(data, where)


def candidate_from_yaml(text: str, where: str = "recipe") -> Candidate:
    """A recipe or a layer path from YAML (a history row's, a recipe file's)."""
    return candidate_from_dict(load_yaml(text, where), where)


def load_candidate(path: str | Path) -> Candidate:
    path = Path(path)
    if not path.is_file():
        raise MergeflowError(f"recipe file {str(path)!r} does not exist")
    return candidate_from_yaml(path.read_text(), where=f"recipe {str(path)!r}")


def materialise(candidate: Candidate, out_dir: str | Path, lineage: list[str] | None = None,
                force: bool = False, device: str = "cpu", dtype: str | None = None, **kwargs) -> Path:
    """Write a candidate as an HF model directory: a merge, or an exported layer path."""
    return candidate_type(candidate).export(candidate, out_dir, device=device, dtype=dtype, force=force,
                                            lineage=lineage, **kwargs)
