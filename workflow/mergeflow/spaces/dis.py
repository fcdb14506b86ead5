"""The ``dis`` search space (Su & Geiping's Depth-wise Integration Search): at each layer
position of the base's depth, which models' layer i are stacked there, in which order, and a
scale on what the position outputs.

Config (the ``search_space`` mapping; keys and defaults in the schema's ``space_dis``)::

    search_space:
      kind: dis
      models: [math, lang]         # the K models whose layers are stacked (default: the endpoints)
      base_model: base             # config and tokenizer; an empty position falls back to its
                                   # layer i (default: the config's base_model); the embeddings
                                   # come from the first hop's model, the final norm and LM head
                                   # from the last hop's (mergekit's passthrough rule)
      scale: {min: 0.1, max: 2.0}  # the position scale's range (positive: it folds)
      max_layers: 8                # paths deeper than this get the worst loss, unevaluated

Genes per position i (L positions, the base's layers), in this order: the scale, the ordering
(a categorical gene over the K! permutations of the models, in ``itertools.permutations``
order), and K inclusion bits (model k included when its gene is above 0.5). Position i stacks
layer i of the included models in the chosen order; an empty stack is the base's layer i.

**Scale semantics.** Su & Geiping's search (their vLLM class) scaled the MLP branch output of
the position's last block, while their HF class scaled the whole hidden state the position
outputs. mergeflow uses the latter: position i's scale multiplies the hidden state leaving its
last block, so it is the input scale of the next position's first hop. That is a layer path
(and folds into a plain model); the last position's scale meets only the final RMSNorm, which
removes it (exactly up to the norm's eps), so it does not appear in the path.

The search starts from the base (every inclusion bit off, scales 1), or with ``init`` (model name
-> weight) from the models whose weight is positive stacked in config order at every position.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from mergeflow.errors import MergeflowError
from mergeflow.merge.path import Hop, LayerPath
from mergeflow.merge.sources import ModelSource
from mergeflow.spaces.dfs import OFF, ON, check_scale_range, genome_array
from mergeflow.spaces.base import ModelConfigs, Space, check_chained
from mergeflow.spaces.parameter import Range


@dataclass
class DisSpace(Space):
    base_model: str
    models: list[str]
    num_layers: int
    max_layers: int | None
    scale: Range
    dtype: str | None = None
    candidates: ClassVar[str] = "path"  # candidates are layer paths (assembled, not merged)

    @staticmethod
    def check(cfg: dict, where: str, models: ModelConfigs) -> None:
        """Scales positive, each model named once, at most 6 (orderings per position), and —
        where the models' configs are on disk — their layers chain with the base's."""
        check_scale_range(cfg, where)
        stacked = cfg.get("models") or []
        if len(set(stacked)) != len(stacked):
            raise MergeflowError(f"{where}.models: {stacked} names a model twice")
        if len(stacked) > 6:
            raise MergeflowError(f"{where}.models: {len(stacked)} models make {math.factorial(len(stacked))} "
                                 "orderings per position; at most 6")
        check_chained(where, models)

    @classmethod
    def build(cls, cfg: dict, where: str = "search_space") -> "DisSpace":
        cls.check(cfg, where, ModelConfigs())
        base, models = cfg.get("base_model"), [str(m) for m in cfg.get("models") or []]
        if not base or not models:
            raise MergeflowError(f"{where}: base_model and models are not filled in")
        num_layers = ModelSource(base).num_layers
        for model in models:
            if ModelSource(model).num_layers < num_layers:
                raise MergeflowError(f"model {model!r} has fewer layers than the base's {num_layers}: DIS stacks layer "
                                     "i of each model at position i")
        return cls(str(base), models, num_layers, cfg.get("max_layers"), check_scale_range(cfg, where),
                   cfg.get("dtype"))

    # ---- layout

    @property
    def per_position(self) -> int:
        return 2 + len(self.models)

    @property
    def dim(self) -> int:
        return self.num_layers * self.per_position

    @property
    def orderings(self) -> list[tuple[int, ...]]:
        return list(itertools.permutations(range(len(self.models))))

    def decode(self, x: np.ndarray) -> list[tuple[float, list[int]]]:
        """Per position: its scale and its stack (model indices in order; [] = the base's layer)."""
        x = genome_array(x, self.dim)
        orderings = self.orderings
        out = []
        for i in range(self.num_layers):
            genes = x[i * self.per_position:(i + 1) * self.per_position]
            order = orderings[min(int(genes[1] * len(orderings)), len(orderings) - 1)]
            included = {k for k in range(len(self.models)) if genes[2 + k] > 0.5}
            out.append((self.scale.decode(genes[0]), [k for k in order if k in included]))
        return out

    def to_recipe(self, x: np.ndarray, seed: int = 0) -> LayerPath:
        hops, pending = [], 1.0
        for i, (scale, stack) in enumerate(self.decode(x)):
            models = [self.models[k] for k in stack] or [self.base_model]
            for model in models:
                hops.append(Hop(model, i, pending))
                pending = 1.0
            pending = scale  # the position's output scale: the next position's input scale
        return LayerPath(hops, self.base_model, self.dtype, seed)

    def problem(self, path: LayerPath) -> str | None:
        if self.max_layers is not None and len(path) > self.max_layers:
            return f"path of {len(path)} layers is deeper than max_layers {self.max_layers}"
        return None

    def _genes(self, stacks: list[list[int]], scales: list[float]) -> np.ndarray:
        orderings = self.orderings
        genes = []
        for stack, scale in zip(stacks, scales):
            rest = [k for k in range(len(self.models)) if k not in stack]
            order = orderings.index(tuple(stack + rest))
            genes += [self.scale.encode(scale), (order + 0.5) / len(orderings)]
            genes += [ON if k in stack else OFF for k in range(len(self.models))]
        return np.asarray(genes, dtype=float)

    def initial_genome(self, init: dict[str, float] | None) -> tuple[float, ...]:
        """The base (nothing stacked), or the models ``init`` gives a positive weight, stacked."""
        stack = [k for k, m in enumerate(self.models) if init and init.get(m, 0.0) > 0]
        return tuple(float(v) for v in self._genes([stack] * self.num_layers, [1.0] * self.num_layers))

    def from_recipe(self, path: LayerPath) -> np.ndarray:
        """The genome of a path made of positions in order (hops of layer i, then i + 1, ...)."""
        stacks: list[list[int]] = [[] for _ in range(self.num_layers)]
        scales = [1.0] * self.num_layers
        position = -1
        for k, hop in enumerate(path.hops):
            if hop.layer < position or hop.layer >= self.num_layers:
                raise MergeflowError(f"layer path hop {k}: layer {hop.layer} breaks the positions' order")
            if hop.layer != position and position >= 0:
                scales[position] = hop.scale
            position = hop.layer
            if hop.model in self.models:
                stacks[position].append(self.models.index(hop.model))
            elif hop.model != self.base_model:
                raise MergeflowError(f"layer path hop {k}: model {hop.model!r} is not stacked in this space")
        return self._genes(stacks, scales)

    def genome_table(self, x: np.ndarray) -> "pd.DataFrame":
        """Two panels per position: each model's place in the stack (0 = out) and the scale."""
        rows = []
        for i, (scale, stack) in enumerate(self.decode(x)):
            for k, model in enumerate(self.models):
                rows.append({"panel": "stack place (0 = not stacked)", "row": Path(model).name,
                             "column": f"position {i}", "value": stack.index(k) + 1 if k in stack else 0})
            rows.append({"panel": "output scale", "row": "scale", "column": f"position {i}", "value": scale})
        return pd.DataFrame(rows, columns=["panel", "row", "column", "value"])
