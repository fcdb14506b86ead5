"""The ``dfs`` search space (Sakana's data-flow-space merging): which layers a token's hidden
state passes through, in which order, and how it is scaled between them.

Config (the ``search_space`` mapping; keys and defaults in the schema's ``space_dfs``)::

    search_space:
      kind: dfs
      a: math                      # model A: tokenizer, embeddings, final norm, LM head; its
                                   # first and last layers start and end every path
      b: lang                      # model B
      repeats: 3                   # r: the slot sequence (A's layers, then B's) repeated r times
      max_layers: 12               # paths deeper than this get the worst loss, unevaluated
      scale: {min: 0.5, max: 1.5}  # the range of each entry of W (positive: it folds)

The workflow fills ``base_model`` (A's path) and ``models`` ([A, B] paths).

Genes, in this order (M = A's layers + B's layers, T = M x r slots):

1. the indicator array I, one gene per slot t (slot t is layer ``t mod M`` of the sequence A's
   layers then B's): slot t is on when its gene is above 0.5 (I_t = 2x - 1 > 0);
2. the scaling matrix W, M x M genes row by row: W_ij = ``min + x * (max - min)`` scales the
   hidden state that goes from layer i into layer j (i, j index the M layers).

Decoding: the path is the slots that are on, in slot order (a later repetition is how a path
returns to an earlier layer, so a layer appears at most r times); A's layer 0 is put first when
the path does not start with it, and A's last layer last when it does not end with it. Hop k > 0
gets W[layer of hop k-1, layer of hop k]; hop 0 reads the embeddings unscaled.

The search starts from model A as it is: A's slots of the first repetition on, every other slot
off, W = 1 (``init`` is not read). On and off genes start at 0.6 and 0.4, a step of about one
CMA sigma from flipping, so the first generations explore paths near A.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd

from mergeflow.errors import MergeflowError
from mergeflow.merge.path import Hop, LayerPath
from mergeflow.merge.sources import ModelSource
from mergeflow.spaces.base import ModelConfigs, Space, check_chained
from mergeflow.spaces.parameter import Range

ON, OFF = 0.6, 0.4  # where the search starts a slot that is on / off


def check_scale_range(cfg: dict, where: str) -> Range:
    """The ``scale`` range, which must be positive: scales are folded into the weights."""
    scale = cfg["scale"]
    low, high = float(scale["min"]), float(scale["max"])
    if low <= 0:
        raise MergeflowError(f"{where}.scale.min: {low} is not positive; a layer path's scales are folded into "
                             "o_proj/down_proj, which needs scales > 0 (RMSNorm(c*h) = RMSNorm(h) only for c > 0)")
    if low > high:
        raise MergeflowError(f"{where}.scale: min {low} > max {high}")
    return Range(low, high)


def genome_array(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    if x.shape != (dim,):
        raise MergeflowError(f"genome has shape {x.shape}; this search space needs ({dim},)")
    if not np.all(np.isfinite(x)):
        raise MergeflowError("genome contains NaN or Inf")
    return np.clip(x, 0.0, 1.0)


@dataclass
class DfsSpace(Space):
    a: str
    b: str
    layers_a: int
    layers_b: int
    repeats: int
    max_layers: int | None
    scale: Range
    dtype: str | None = None
    candidates: ClassVar[str] = "path"  # candidates are layer paths (assembled, not merged)

    @staticmethod
    def model_names(cfg: dict) -> tuple[str, list[str]]:
        """The base and the sources a config's space reads, by name: A, and [A, B]."""
        return cfg["a"], [cfg["a"], cfg["b"]]

    @staticmethod
    def check(cfg: dict, where: str, models: ModelConfigs) -> None:
        """What can be checked before any job: r >= 1 (the schema), A != B, scales positive,
        max_layers at least 2 (A's first and last layer), and — where the models' configs are on
        disk — B's layers chain with A's."""
        if cfg["a"] == cfg["b"]:
            raise MergeflowError(f"{where}: a and b are both {cfg['a']!r}; DFS merges two different models")
        check_scale_range(cfg, where)
        num_layers = models.num_layers()
        if cfg.get("max_layers") is not None and num_layers is not None and cfg["max_layers"] < min(2, num_layers):
            raise MergeflowError(f"{where}.max_layers: {cfg['max_layers']} leaves no room for A's first and last layer")
        check_chained(where, models)

    @classmethod
    def build(cls, cfg: dict, where: str = "search_space") -> "DfsSpace":
        cls.check(cfg, where, ModelConfigs())
        a, b = cfg.get("base_model"), (cfg.get("models") or [None, None])[-1]
        if not a or not b:
            raise MergeflowError(f"{where}: the paths of models a and b are not filled in")
        return cls(str(a), str(b), ModelSource(a).num_layers, ModelSource(b).num_layers, int(cfg["repeats"]),
                   cfg.get("max_layers"), check_scale_range(cfg, where), cfg.get("dtype"))

    # ---- layout

    @property
    def layers(self) -> int:
        """M: A's layers then B's."""
        return self.layers_a + self.layers_b

    @property
    def slots(self) -> int:
        """T = M x r."""
        return self.layers * self.repeats

    @property
    def dim(self) -> int:
        return self.slots + self.layers * self.layers

    def scale_genes(self) -> range:
        """The genes of W: smooth in the loss (a hop's scale multiplies its input), where the
        indicator genes are steps."""
        return range(self.slots, self.dim)

    def source(self, m: int) -> tuple[str, int]:
        """Model path and layer of index m in the layer sequence (A's layers, then B's)."""
        return (self.a, m) if m < self.layers_a else (self.b, m - self.layers_a)

    def label(self, m: int) -> str:
        model, layer = self.source(m)
        return f"{'A' if model == self.a else 'B'}{layer}"

    # ---- genome -> path

    def decode(self, x: np.ndarray) -> tuple[list[int], np.ndarray]:
        """The layer indices (into the M layers) the path visits, and W."""
        x = genome_array(x, self.dim)
        on = x[: self.slots] > 0.5
        sequence = [t % self.layers for t in range(self.slots) if on[t]]
        last_a = self.layers_a - 1
        if not sequence or sequence[0] != 0:
            sequence.insert(0, 0)
        if sequence[-1] != last_a:
            sequence.append(last_a)
        w = np.array([self.scale.decode(v) for v in x[self.slots:]]).reshape(self.layers, self.layers)
        return sequence, w

    def to_recipe(self, x: np.ndarray, seed: int = 0) -> LayerPath:
        sequence, w = self.decode(x)
        hops = []
        for k, m in enumerate(sequence):
            model, layer = self.source(m)
            hops.append(Hop(model, layer, 1.0 if k == 0 else float(w[sequence[k - 1], m])))
        return LayerPath(hops, self.a, self.dtype, seed)

    def problem(self, path: LayerPath) -> str | None:
        """Why a path gets the worst loss without being evaluated: it is deeper than max_layers."""
        if self.max_layers is not None and len(path) > self.max_layers:
            return f"path of {len(path)} layers is deeper than max_layers {self.max_layers}"
        return None

    def initial_genome(self, init: dict[str, float] | None) -> tuple[float, ...]:
        """Model A as it is: its slots of the first repetition on, the rest off, W = 1."""
        genes = [ON if t < self.layers_a else OFF for t in range(self.slots)]
        genes += [self.scale.encode(1.0)] * (self.layers * self.layers)
        return tuple(genes)

    # ---- path -> genome

    def from_recipe(self, path: LayerPath) -> np.ndarray:
        """The genome of a path: each hop in the earliest free slot after the previous hop's
        (the forced first/last layers of A included), W from the hops' scales (1 elsewhere)."""
        index = {self.source(m): m for m in range(self.layers)}
        genes = np.full(self.dim, OFF)
        genes[self.slots:] = self.scale.encode(1.0)
        slot, previous = -1, None
        for k, hop in enumerate(path.hops):
            m = index.get((hop.model, hop.layer))
            if m is None:
                raise MergeflowError(f"layer path hop {k}: {hop.model} layer {hop.layer} is not a layer of A or B")
            slot = next((t for t in range(slot + 1, self.slots) if t % self.layers == m), None)
            if slot is None:
                raise MergeflowError(f"layer path hop {k}: no slot left for {self.label(m)} within {self.repeats} "
                                     "repetitions")
            genes[slot] = ON
            if previous is not None:
                genes[self.slots + previous * self.layers + m] = self.scale.encode(hop.scale)
            previous = m
        return genes

    def genome_table(self, x: np.ndarray) -> "pd.DataFrame":
        """Two panels: the indicator I per layer and repetition, and W."""
        x = genome_array(x, self.dim)
        rows = []
        for t in range(self.slots):
            rows.append({"panel": "I (slot on > 0)", "row": self.label(t % self.layers),
                         "column": f"repetition {t // self.layers}", "value": 2 * x[t] - 1})
        for i in range(self.layers):
            for j in range(self.layers):
                rows.append({"panel": "W (from row into column)", "row": self.label(i), "column": self.label(j),
                             "value": self.scale.decode(x[self.slots + i * self.layers + j])})
        return pd.DataFrame(rows, columns=["panel", "row", "column", "value"])

    def describe(self) -> str:
        return f"DFS over {Path(self.a).name} (A, {self.layers_a} layers) and {Path(self.b).name} (B, {self.layers_b})"
