"""``history.parquet``: every candidate told so far, the search's source of truth.

This module owns the history's columns; everything else reads them through its functions.
One row per candidate, in this column order:

- ``generation``, ``index``, ``genome``, ``seed``, ``recipe_hash``, ``recipe``: what the
  optimizer asked (as in ``candidates.parquet``);
- ``fitness_{task}``, ``sd_{task}`` per objective: its fitness (an accuracy, or an estimate of
  the search split's accuracy) and that fitness's sd;
- ``items``: items the candidate was scored on over every objective and rung (what it cost);
  with several objectives also ``items_{task}`` per objective (with one, ``items`` is that
  objective's);
- ``rung``: with a fitness kind of several rungs, the highest rung the candidate reached (its
  fitness and sd are those of that rung);
- ``problem``: why the candidate got the worst loss ("" when it did not);
- ``fitness``: the objectives' weighted mean (NaN for a problem); ``loss``: its negation
  (:data:`WORST_LOSS` for a problem);
- ``loss_{task}`` per objective: the negated fitness (:data:`WORST_LOSS` for a problem), what a
  multi-objective run tells the optimizer;
- then the fitness kind's extra columns, if it has any (its ``extra_columns``; see
  :class:`mergeflow.fitness.FitnessKind`): the objectives' weighted mean of each task's value
  (NaN for a problem), handed to the optimizer by :func:`extras`.

It holds no wall times, so the same config and seed give the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mergeflow.errors import MergeflowError

# The loss a candidate gets when its merge or its fitness is not finite: worse than any real one
# (losses are negated accuracies in [-1, 0]) yet finite, which every optimizer can digest.
WORST_LOSS = 1.0
CANDIDATE_COLUMNS = ["generation", "index", "genome", "seed", "recipe_hash", "recipe"]
# What a fitness shard (``rung_{r}/fitness_{k}.parquet``) holds: one row per candidate and
# objective, with the items newly scored at that rung (then the fitness kind's extra columns);
# and its answers (``responses_{k}.parquet``).
SHARD_COLUMNS = ["generation", "index", "rung", "task", "fitness", "sd", "items", "problem", "wall_s"]
ANSWER_COLUMNS = ["recipe_hash", "task", "item_id", "correct"]


def fitness_column(task: str) -> str:
    return f"fitness_{task}"


def sd_column(task: str) -> str:
    return f"sd_{task}"


def loss_column(task: str) -> str:
    return f"loss_{task}"


def items_column(task: str) -> str:
    return f"items_{task}"


def objectives_of(frame: pd.DataFrame) -> list[str]:
    """The objectives a history (or a slice of it, e.g. a Pareto front) was scored on."""
    return [c.removeprefix("fitness_") for c in frame.columns if c.startswith("fitness_")]


def read_shards(paths: list[str | Path]) -> pd.DataFrame:
    """Fitness shards (or responses files) as one frame; a shard with no candidates (more
    shards than candidates at a rung) adds nothing."""
    frames = [frame for frame in (pd.read_parquet(p) for p in paths) if len(frame)]
    return pd.concat(frames, ignore_index=True) if frames else pd.read_parquet(paths[0])


def candidate_table(objectives: dict[str, float], candidates: pd.DataFrame, shards: pd.DataFrame,
                    rungs: int = 1) -> pd.DataFrame:
    """One generation's history rows: its candidates joined with their fitness shards' rows
    (of every rung: a candidate's fitness is that of the highest rung it reached)."""
    tasks = list(objectives)
    wide = candidates[CANDIDATE_COLUMNS].copy()
    top = shards.sort_values("rung", kind="mergesort").groupby(["index", "task"]).tail(1)
    per = top.pivot(index="index", columns="task", values="fitness")
    sd = top.pivot(index="index", columns="task", values="sd")
    items = shards.groupby(["index", "task"])["items"].sum().unstack("task")
    problem = top.groupby("index")["problem"].first()
    if sorted(per.index) != sorted(wide["index"]):
        raise MergeflowError(f"generation {int(wide['generation'].iloc[0])}: fitness shards cover candidates "
                             f"{sorted(per.index)}, expected {sorted(wide['index'])}")
    wide = wide.set_index("index")
    for task in tasks:
        wide[fitness_column(task)] = per[task]
        wide[sd_column(task)] = sd[task]
    wide["items"] = items[tasks].sum(axis=1).astype("int64")
    if len(tasks) > 1:
        for task in tasks:
            wide[items_column(task)] = items[task].astype("int64")
    if rungs > 1:
        wide["rung"] = top.groupby("index")["rung"].max().astype("int64")
    wide["problem"] = problem
    values = wide[[fitness_column(t) for t in tasks]]
    valid = (wide["problem"] == "") & np.isfinite(values).all(axis=1)
    scalar = sum(w * wide[fitness_column(t)] for t, w in objectives.items()) / sum(objectives.values())
    wide["fitness"] = np.where(valid, scalar, np.nan)
    wide["loss"] = np.where(valid, -scalar, WORST_LOSS)
    for task in tasks:
        wide[loss_column(task)] = np.where(valid, -wide[fitness_column(task)], WORST_LOSS)
    total = sum(objectives.values())
    for column in [c for c in shards.columns if c not in SHARD_COLUMNS]:  # the kind's extras
        per_task = top.set_index(["index", "task"])[column]
        wide[column] = [weighted_extra({t: per_task[(i, t)] for t in objectives}, objectives, total, ok)
                        for i, ok in zip(wide.index, valid)]
    return wide.reset_index()[["generation", "index", *[c for c in wide.columns if c != "generation"]]]


def weighted_extra(values: dict[str, object], objectives: dict[str, float], total: float, valid: bool):
    """The objectives' weighted mean of one candidate's per-task extra value (a number or a
    vector); NaN of its shape for a candidate with a problem."""
    mean = sum(w * np.asarray(values[t], dtype=float) for t, w in objectives.items()) / total
    return (mean if valid else np.full_like(mean, np.nan)).tolist()


def losses(rows: pd.DataFrame, objectives: list[str] | None) -> list:
    """Each row's loss in index order: a float, or with ``objectives`` one loss per objective."""
    rows = rows.sort_values("index")
    if objectives is None:
        return [float(v) for v in rows["loss"]]
    return [[float(v) for v in row] for row in rows[[loss_column(t) for t in objectives]].to_numpy()]


def extras(rows: pd.DataFrame, columns: tuple[str, ...] | list[str]) -> list[dict[str, np.ndarray]] | None:
    """Each row's extra values in index order (column -> array), what the optimizer is told
    beside the loss; None without extra columns."""
    if not columns:
        return None
    rows = rows.sort_values("index")
    return [{c: np.asarray(row[c], dtype=float) for c in columns} for _, row in rows.iterrows()]


def generation(history: pd.DataFrame, g: int) -> pd.DataFrame:
    """Generation ``g``'s rows, in index order."""
    return history[history["generation"] == g].sort_values("index")


def extend(previous: str | Path | None, table: pd.DataFrame, out: str | Path) -> pd.DataFrame:
    """Write the previous history (a path, or None at generation 0) with ``table`` appended."""
    history = table if previous is None else pd.concat([pd.read_parquet(previous), table], ignore_index=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    history.to_parquet(out, index=False)
    return history


# What a search can end on (a fitness kind's ``result``), as :func:`best_row` picks it.
RESULTS = ("best", "last")


def best_row(history: pd.DataFrame, result: str) -> pd.Series:
    """What the search ends on, by its fitness kind's ``result`` (:data:`RESULTS`):

    - ``best``: the lowest-loss candidate among those scored at the highest rung any reached (its
      most exact fitness); ties go to the earliest (generation, index);
    - ``last``: the lowest-loss candidate of the last generation with one told without a problem
      (a search that moves its candidates a step at a time, on minibatches too noisy to pick
      across steps by: with one candidate a step, the last one told without a problem).
    """
    if result == "last":
        valid = history[history["problem"] == ""]
        valid = valid if len(valid) else history
        last = valid[valid["generation"] == valid["generation"].max()]
        return last.sort_values(["loss", "index"], kind="mergesort").iloc[0]
    if result != "best":
        raise MergeflowError(f"unknown search result {result!r}: one of {', '.join(RESULTS)}")
    if "rung" in history.columns:
        history = history[history["rung"] == history["rung"].max()]
    return history.sort_values(["loss", "generation", "index"], kind="mergesort").iloc[0]


def known_answers(responses: pd.DataFrame | None, recipe_hash: str) -> dict[str, dict]:
    """A candidate's answers at lower rungs (task -> item id -> 0/1), by its recipe's hash."""
    if responses is None:
        return {}
    mine = responses[responses["recipe_hash"] == recipe_hash]
    return {task: dict(zip(rows["item_id"], rows["correct"].astype(int))) for task, rows in mine.groupby("task")}


def promotions(objectives: dict[str, float], shards: pd.DataFrame, count: int, ucb: bool = False) -> pd.DataFrame:
    """The ``count`` best candidates of one rung's shards by the objectives' weighted fitness
    (plus its weighted sd with ``ucb``); a candidate with a problem ranks last, ties go to the
    lower index. Columns ``index``, ``score``."""
    total = sum(objectives.values())
    score = sum(w * shards[shards["task"] == t].set_index("index")["fitness"] for t, w in objectives.items()) / total
    if ucb:
        score = score + sum(w * shards[shards["task"] == t].set_index("index")["sd"]
                            for t, w in objectives.items()) / total
    problem = shards.groupby("index")["problem"].first() != ""
    score = score.where(~problem & np.isfinite(score), -np.inf)
    ranked = pd.DataFrame({"index": score.index.astype("int64"), "score": score.to_numpy()})
    ranked = ranked.sort_values(["score", "index"], ascending=[False, True], kind="mergesort")
    return ranked.head(count).reset_index(drop=True)


def task_estimate(row: pd.Series, task: str) -> tuple[float, float]:
    """A candidate's fitness on ``task`` and its sd."""
    return float(row[fitness_column(task)]), float(row.get(sd_column(task), float("nan")))


def task_items(row: pd.Series, task: str) -> int:
    """Items a candidate was scored on for ``task``."""
    return int(row[items_column(task)] if items_column(task) in row.index else row["items"])


def pareto_front(history: pd.DataFrame, tasks: list[str]) -> pd.DataFrame:
    """Candidates no other valid candidate beats on every task (multi-objective runs)."""
    valid = history[history["problem"] == ""]
    values = valid[[fitness_column(t) for t in tasks]].to_numpy()
    keep = [not np.any(np.all(values >= row, axis=1) & np.any(values > row, axis=1)) for row in values]
    return valid[np.array(keep, dtype=bool)].drop_duplicates("recipe_hash").reset_index(drop=True)
