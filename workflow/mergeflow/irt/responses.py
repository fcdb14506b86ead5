"""Response data: long-format parquet in, a models × items matrix out.

Two layouts are accepted, also mixed:

* long format with a ``model`` column: ``item_id``, ``model``, ``correct`` (+ ``subscenario``);
* the pipeline's per-model files ``responses/{task}/{model}.parquet`` with ``item_id``,
  ``correct`` and ``loglik`` and no ``model`` column: the model is the file stem.

``correct`` is 0/1; NaN means "not answered" and is masked by the IRT fit. Float scores in
[0, 1] that are not all 0/1 are either binarized with a single mean-preserving threshold
(tinyBenchmarks' rule: pick ``c`` so that the mean of ``score > c`` is as close as possible to the
mean of the scores) or rejected, as the caller chooses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import pandas as pd

from mergeflow.errors import MergeflowError
from mergeflow.irt import SCORE_MODES

Source = Union[str, Path, pd.DataFrame]

log = logging.getLogger(__name__)


@dataclass
class ResponseMatrix:
    """Models × items correctness, NaN where a model has no response for an item."""

    matrix: np.ndarray
    models: list[str]
    items: list
    subscenarios: dict | None = None
    threshold: float | None = field(default=None)

    def __post_init__(self) -> None:
        self.matrix = np.asarray(self.matrix, dtype=float)
        if self.matrix.shape != (len(self.models), len(self.items)):
            raise MergeflowError(
                f"response matrix has shape {self.matrix.shape} but there are "
                f"{len(self.models)} models and {len(self.items)} items"
            )

    @property
    def observed(self) -> np.ndarray:
        """Boolean mask of answered cells."""
        return ~np.isnan(self.matrix)

    def accuracy(self) -> np.ndarray:
        """Each model's mean correctness over the items it answered."""
        return np.nanmean(self.matrix, axis=1)

    def select_models(self, models: Sequence[str]) -> "ResponseMatrix":
        """The sub-matrix of the named models (in that order)."""
        index = {name: row for row, name in enumerate(self.models)}
        missing = [name for name in models if name not in index]
        if missing:
            raise MergeflowError(f"models not in the response matrix: {missing}")
        rows = [index[name] for name in models]
        return ResponseMatrix(self.matrix[rows], list(models), list(self.items),
                              self.subscenarios, self.threshold)

    def drop_models(self, models: Iterable[str]) -> "ResponseMatrix":
        dropped = set(models)
        return self.select_models([name for name in self.models if name not in dropped])

    def row(self, model: str) -> pd.Series:
        """One model's responses as a Series indexed by item_id."""
        if model not in self.models:
            raise MergeflowError(f"model {model!r} is not in the response matrix")
        return pd.Series(self.matrix[self.models.index(model)], index=pd.Index(self.items))

    def subscenario_of_items(self) -> list | None:
        if not self.subscenarios:
            return None
        return [self.subscenarios.get(item) for item in self.items]


def load_response_matrix(
    paths_or_frames: Source | Sequence[Source],
    scores: str = "threshold",
) -> ResponseMatrix:
    """Read response parquet files (or frames, or directories of files) into one matrix.

    ``scores`` says what to do with non-binary scores: ``"threshold"`` binarizes them with the
    mean-preserving threshold, ``"reject"`` raises :class:`MergeflowError`.
    """
    if scores not in SCORE_MODES:
        raise MergeflowError(f"scores={scores!r}: expected one of {SCORE_MODES}")
    frames = [_read_source(source) for source in _expand_sources(paths_or_frames)]
    if not frames:
        raise MergeflowError("no response files or frames given")
    long = pd.concat(frames, ignore_index=True)
    duplicated = long.duplicated(["model", "item_id"])
    if duplicated.any():
        first = long[duplicated].iloc[0]
        raise MergeflowError(
            f"model {first['model']!r} has more than one response for item {first['item_id']!r}"
        )
    missing = int(long["correct"].isna().sum())
    if missing:
        log.warning("%d of %d scores in column 'correct' are NaN: those items count as not answered by "
                    "their models (left out of the fit)", missing, len(long))
    long["correct"], threshold = binarize_scores(long["correct"].to_numpy(dtype=float), scores)
    return _pivot(long, threshold)


def binarize_scores(values: np.ndarray, scores: str = "threshold") -> tuple[np.ndarray, float | None]:
    """Return 0/1 (NaN kept) scores and the threshold used (None when already binary)."""
    observed = values[~np.isnan(values)]
    if observed.size and (observed.min() < 0 or observed.max() > 1):
        raise MergeflowError(
            f"column 'correct' has scores outside [0, 1] (min {observed.min()}, "
            f"max {observed.max()}); rescale them first"
        )
    if np.isin(observed, (0.0, 1.0)).all():
        return values, None
    if scores == "reject":
        example = observed[~np.isin(observed, (0.0, 1.0))][0]
        raise MergeflowError(
            f"column 'correct' has non-binary scores (e.g. {example}); binarize them with a mean-preserving "
            "threshold: `--scores threshold` (mergeflow irt fit), scores='threshold' (Python)"
        )
    threshold = mean_preserving_threshold(observed)
    binary = np.where(np.isnan(values), np.nan, (values > threshold).astype(float))
    log.warning("%d of %d scores in column 'correct' are fractional: all are binarized at the mean-preserving "
                "threshold %.4g (scores above it count as correct); `--scores reject` refuses them instead",
                int((~np.isin(observed, (0.0, 1.0))).sum()), observed.size, threshold)
    return binary, threshold


def mean_preserving_threshold(scores: np.ndarray) -> float:
    """The cut ``c`` among the observed scores whose ``mean(scores > c)`` best matches ``mean(scores)``."""
    candidates = np.unique(scores)
    ordered = np.sort(scores)
    # fraction of scores strictly above each candidate
    above = 1.0 - np.searchsorted(ordered, candidates, side="right") / ordered.size
    return float(candidates[np.argmin(np.abs(above - scores.mean()))])


def _expand_sources(paths_or_frames: Source | Sequence[Source]) -> list[Source]:
    if isinstance(paths_or_frames, (str, Path, pd.DataFrame)):
        paths_or_frames = [paths_or_frames]
    sources: list[Source] = []
    for source in paths_or_frames:
        if isinstance(source, pd.DataFrame):
            sources.append(source)
            continue
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.parquet"))
            if not files:
                raise MergeflowError(f"directory {path} holds no .parquet response files")
            sources.extend(files)
        elif path.exists():
            sources.append(path)
        else:
            raise MergeflowError(f"response file {path} does not exist")
    return sources


def _read_source(source: Source) -> pd.DataFrame:
    if isinstance(source, pd.DataFrame):
        frame, name = source.copy(), "data frame"
    else:
        frame, name = pd.read_parquet(source), str(source)
    for column in ("item_id", "correct"):
        if column not in frame.columns:
            raise MergeflowError(f"{name} has no column {column!r} (columns: {list(frame.columns)})")
    if "model" not in frame.columns:
        if isinstance(source, pd.DataFrame):
            raise MergeflowError("a response data frame needs a 'model' column")
        frame["model"] = Path(source).stem
    frame["model"] = frame["model"].astype(str)
    try:
        frame["correct"] = pd.to_numeric(frame["correct"], errors="raise").astype(float)
    except (TypeError, ValueError) as err:
        raise MergeflowError(f"{name}: column 'correct' is not numeric ({err})") from None
    columns = ["model", "item_id", "correct"] + (["subscenario"] if "subscenario" in frame else [])
    return frame[columns]


def _pivot(long: pd.DataFrame, threshold: float | None) -> ResponseMatrix:
    models = sorted(long["model"].unique().tolist())
    items = _sorted_items(long["item_id"].unique().tolist())
    model_index = pd.Index(models)
    item_index = pd.Index(items)
    rows = model_index.get_indexer(long["model"])
    cols = item_index.get_indexer(long["item_id"])
    matrix = np.full((len(models), len(items)), np.nan)
    matrix[rows, cols] = long["correct"].to_numpy(dtype=float)
    subscenarios = None
    if "subscenario" in long.columns:
        labelled = long.dropna(subset=["subscenario"]).drop_duplicates("item_id")
        subscenarios = dict(zip(labelled["item_id"].tolist(), labelled["subscenario"].astype(str)))
    return ResponseMatrix(matrix, models, items, subscenarios, threshold)


def _sorted_items(items: list) -> list:
    """Items in a stable order: natural order when comparable, else by their string form."""
    items = [item.item() if isinstance(item, np.generic) else item for item in items]
    try:
        return sorted(items)
    except TypeError:
        return sorted(items, key=str)
