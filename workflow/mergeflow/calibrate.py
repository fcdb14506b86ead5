"""Calibration population for the IRT fit: many models' responses on a task's search split.

IRT needs a response matrix (models × items) with spread in ability. Besides the endpoints, the
population holds random merges of the sources (drawn from a search space, seeded), the zoo's
intermediate fine-tuning checkpoints, and any user-supplied response parquet files (e.g. a
leaderboard dump). It is evaluated once per task and shared by every run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from mergeflow.data import read_split
from mergeflow.errors import MergeflowError
from mergeflow.evaluate import EvalSettings, evaluate_items, load_causal_lm, load_tokenizer
from mergeflow.merge.fast import InMemoryMerger
from mergeflow.progress import Progress
from mergeflow.spaces import build_space

log = logging.getLogger(__name__)

def random_merge_responses(base_path: str, source_paths: list[str], space_cfg: dict, count: int, seed: int,
                           items: pd.DataFrame, scorer: str, delimiter: str,
                           settings: EvalSettings) -> pd.DataFrame:
    """Responses of ``count`` random merges (uniform genomes in the search space), merged in memory."""
    space = build_space({**space_cfg, "base_model": base_path, "models": source_paths},
                        where="irt.calibration.search_space")
    merger = InMemoryMerger(space.merger_template() or [base_path, *source_paths], device=settings.device,
                            dtype=settings.dtype)
    tokenizer = merger.tokenizer or load_tokenizer(base_path)
    rng = np.random.default_rng([seed, 7])
    frames = []
    meter = Progress("calibration: random merges", count, "merge")
    for i in range(count):
        recipe = space.to_recipe(rng.random(space.dim), seed=seed + i)
        model = merger.merge(recipe)
        if merger.nonfinite_tensors():
            log.warning("random merge %d has non-finite weights; skipped", i)
            meter.update()
            continue
        frame = evaluate_items(model, tokenizer, items, scorer, settings, delimiter)
        frames.append(frame.assign(model=f"random-{i:03d}"))
        log.info("random merge %d/%d: accuracy %.3f", i + 1, count, frame["correct"].mean())
        meter.update()
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def checkpoint_responses(checkpoints: list[str], items: pd.DataFrame, scorer: str, delimiter: str,
                         settings: EvalSettings) -> pd.DataFrame:
    frames = []
    for path in checkpoints:
        model, tokenizer = load_causal_lm(path, settings)
        frame = evaluate_items(model, tokenizer, items, scorer, settings, delimiter)
        name = "ckpt-" + "-".join(Path(path).parts[-2:])
        frames.append(frame.assign(model=name))
        log.info("checkpoint %s: accuracy %.3f", name, frame["correct"].mean())
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def user_responses(paths: list[str], items: pd.DataFrame) -> pd.DataFrame:
    """User-supplied long-format responses (model, item_id, correct), restricted to the split's items."""
    frames = []
    for path in paths:
        frame = pd.read_parquet(path)
        missing = {"model", "item_id", "correct"} - set(frame.columns)
        if missing:
            raise MergeflowError(f"calibration responses {path!r} lack columns {sorted(missing)}")
        frame = frame.assign(item_id=frame["item_id"].astype(str))
        frames.append(frame[frame["item_id"].isin(set(items["item_id"].astype(str)))])
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def calibrate(task: str, tcfg: dict, split_path: str, base_path: str, source_paths: list[str],
              checkpoints: list[str], calibration_cfg: dict, seed: int, evaluation: dict, out: str) -> pd.DataFrame:
    """Write the calibration population's responses (long format: model, item_id, correct, loglik).

    ``calibration_cfg`` is the validated ``irt.calibration`` section (schema defaults filled)."""
    settings = EvalSettings.from_config(evaluation).for_task(tcfg)
    items = read_split(split_path)
    scorer, delimiter = tcfg["scorer"], tcfg["target_delimiter"]
    t0 = time.perf_counter()
    count = calibration_cfg["random_merges"]
    parts = [
        random_merge_responses(base_path, source_paths, calibration_cfg["search_space"], count, seed, items, scorer,
                               delimiter, settings) if count else pd.DataFrame(),
        checkpoint_responses(checkpoints, items, scorer, delimiter, settings),
        user_responses(calibration_cfg["responses"], items),
    ]
    frame = pd.concat([p for p in parts if len(p)], ignore_index=True)
    if len(frame) == 0:
        raise MergeflowError(f"task {task!r}: the calibration population is empty; set irt.calibration.random_merges "
                             "or give checkpoints or response files")
    frame = frame[["model", "item_id", "correct"] + (["loglik"] if "loglik" in frame.columns else [])]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(out, index=False)
    log.info("task %s: %d calibration models in %.1fs", task, frame["model"].nunique(), time.perf_counter() - t0)
    return frame
