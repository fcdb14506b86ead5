"""Search spaces: what a genome in [0, 1]^d (what Nevergrad proposes) stands for.

A space kind is one module here plus one entry in :data:`SPACES`, and its keys are one
definition in the config schema (``space_<kind>``; the schema's ``search_space.kind`` enum is
this registry's keys, which a test checks). Every kind maps a genome to a merge recipe and back:

- ``dim``: the genome's length;
- ``to_recipe(genome, seed)``: the recipe a genome stands for (``seed`` feeds random methods);
- ``from_recipe(recipe)``: the genome closest to a recipe;
- ``initial_genome(init)``: where the search starts, from ``init`` (source path -> weight), or
  None for the optimizer's own start;
- ``genome_table(genome)``: the genome's values as a long table (``panel``, ``row``,
  ``column``, ``value``), one heatmap per panel in the best-genome figure.

Data-flow kinds (``dfs``, ``dis``) produce layer paths (:class:`mergeflow.merge.path.LayerPath`)
instead of recipes; they say so with ``candidates = "path"``, name the models they read with
``model_names(cfg)`` (base, sources; None: the config's base_model / endpoints), and may turn a
candidate down before it is evaluated with ``problem(path)`` (a path deeper than ``max_layers``).

Kinds are built from the ``search_space`` mapping with the run's ``base_model`` and ``models``
(paths) filled in, through :func:`build_space`, which validates the mapping against the schema
and fills its defaults first.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pandas as pd

from mergeflow.merge.path import LayerPath
from mergeflow.merge.recipe import Recipe
from mergeflow.spaces.dfs import DfsSpace
from mergeflow.spaces.dis import DisSpace
from mergeflow.spaces.parameter import ParameterSpace


class Space(Protocol):
    dim: int

    def to_recipe(self, genome: np.ndarray, seed: int = 0) -> Recipe | LayerPath: ...

    def from_recipe(self, recipe: Recipe | LayerPath) -> np.ndarray: ...

    def initial_genome(self, init: dict[str, float] | None) -> tuple[float, ...] | None: ...

    def genome_table(self, genome: np.ndarray) -> pd.DataFrame: ...


class SpaceKind(Protocol):
    """A registry entry: ``build`` the space from a validated ``search_space`` mapping (base_model
    and models are paths); ``check`` what can be checked before any job, without the models
    (``num_layers``: the base's layer count where its config is already on disk)."""

    def build(self, cfg: dict, where: str) -> Space: ...

    def check(self, cfg: dict, where: str, num_layers: int | None) -> None: ...


# kind -> its class (build and check)
SPACES: dict[str, SpaceKind] = {
    "parameter": ParameterSpace,
    "dfs": DfsSpace,
    "dis": DisSpace,
}


def build_space(cfg: dict, where: str = "search_space") -> Space:
    """The space a ``search_space`` mapping describes; bad keys are named with ``where``."""
    from mergeflow.config import validate_section

    cfg = validate_section(cfg, "search_space", where)
    return SPACES[cfg["kind"]].build(cfg, where)


def space_models(cfg: dict) -> tuple[str | None, list[str] | None]:
    """The model names a ``search_space`` mapping reads: (base, sources); None where the config's
    ``base_model`` / ``endpoints`` apply."""
    kind = SPACES[cfg.get("kind", "parameter")]
    if hasattr(kind, "model_names"):
        return kind.model_names(cfg)
    return cfg.get("base_model"), cfg.get("models")


def candidates_of(cfg: dict) -> str:
    """``recipe`` (parameter merges) or ``path`` (layer paths): what a space's candidates are."""
    return getattr(SPACES[cfg.get("kind", "parameter")], "candidates", "recipe")


def check_space(cfg: dict, where: str, num_layers: int | None = None) -> None:
    """Check a ``search_space`` mapping before any job (no models read); errors name the key."""
    from mergeflow.config import validate_section

    cfg = validate_section(cfg, "search_space", where)
    SPACES[cfg["kind"]].check(cfg, where, num_layers)


__all__ = ["SPACES", "DfsSpace", "DisSpace", "ParameterSpace", "Space", "SpaceKind", "build_space", "candidates_of",
           "check_space", "space_models"]
