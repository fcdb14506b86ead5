"""What every search space is (:class:`Space`), and what it may check its models by before any
job runs (:class:`ModelConfigs`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np
import pandas as pd

from mergeflow.errors import MergeflowError
from mergeflow.merge.path import LayerPath, chain_mismatch
from mergeflow.merge.recipe import Recipe


@dataclass(frozen=True)
class ModelConfigs:
    """The ``config.json`` of the models a space reads, by name, for those already on disk
    before any job runs (a zoo or hub model's appears once its job has run); ``base`` names the
    space's base model, whose layers it counts."""

    base: str | None = None
    configs: dict[str, dict] = field(default_factory=dict)

    def num_layers(self) -> int | None:
        """The base's layer count, where its config is on disk."""
        layers = self.configs.get(self.base, {}).get("num_hidden_layers") if self.base else None
        return layers if isinstance(layers, int) else None


class Space(Protocol):
    """A search space: what a genome in [0, 1]^dim stands for. A kind is a class that
    subclasses this protocol (taking its defaults) and is registered in ``SPACES``.

    Class level, for the registry (before any model is read):

    - ``candidates``: the candidate type its genomes map to (``recipe``, a parameter merge, or
      ``path``, a layer path: a key of ``mergeflow.merge.candidates.CANDIDATE_TYPES``);
    - ``model_names(cfg)``: the models a ``search_space`` mapping reads, by name: (base,
      sources), None where the config's base_model / endpoints apply;
    - ``check(cfg, where, models)``: what can be checked before any job, given the models'
      ``config.json`` where they are on disk; errors name the key at ``where``;
    - ``build(cfg, where)``: the space of a validated mapping whose ``base_model`` and
      ``models`` are paths.

    Per space: ``dim``; ``to_recipe(genome, seed)`` and ``from_recipe(candidate)``;
    ``initial_genome(init)`` (source path -> weight, or None: the optimizer's own start);
    ``genome_table(genome)`` (long table ``panel``, ``row``, ``column``, ``value`` for the
    best-genome figure); ``problem(candidate)``: why a candidate gets the worst loss without
    evaluation (e.g. a path deeper than ``max_layers``), None by default; ``merger_template()``:
    the candidate the resident merger is built from, None by default (from the paths).
    """

    candidates: ClassVar[str] = "recipe"
    dim: int

    @staticmethod
    def model_names(cfg: dict) -> tuple[str | None, list[str] | None]:
        return cfg.get("base_model"), cfg.get("models")

    @staticmethod
    def check(cfg: dict, where: str, models: ModelConfigs) -> None: ...

    @classmethod
    def build(cls, cfg: dict, where: str) -> "Space": ...

    def to_recipe(self, genome: np.ndarray, seed: int = 0) -> Recipe | LayerPath: ...

    def from_recipe(self, recipe: Recipe | LayerPath) -> np.ndarray: ...

    def initial_genome(self, init: dict[str, float] | None) -> tuple[float, ...] | None: ...

    def merger_template(self) -> Recipe | None:
        """A candidate to build the resident merger from (models whose vocabularies differ: see
        ``InMemoryMerger``); None: the merger is built from the models' paths."""
        return None

    def genome_table(self, genome: np.ndarray) -> pd.DataFrame: ...

    def problem(self, candidate: Recipe | LayerPath) -> str | None:
        return None


def check_chained(where: str, models: ModelConfigs) -> None:
    """A layer path chains its models' layers: each needs the hidden size, attention shape and
    rotary encoding of the path's base (checked where the configs are on disk)."""
    base = models.configs.get(models.base) if models.base else None
    if base is None:
        return
    for name, config in models.configs.items():
        why = chain_mismatch(name, config, models.base, base)
        if why:
            raise MergeflowError(f"{where}: {why}; a layer path chains their layers, so they must agree")
