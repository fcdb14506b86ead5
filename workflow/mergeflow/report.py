"""The final stage's tables: each run's test-split table, the Pareto members' table, and the
comparison of every run."""

from __future__ import annotations

import logging
import math
from itertools import product
from pathlib import Path

import pandas as pd

from mergeflow.evolve import history as hist

MERGED = "merged"

log = logging.getLogger(__name__)


def accuracy_row(path: str | Path, model: str, task: str) -> dict:
    correct = pd.read_parquet(path)["correct"].astype(float)
    acc = float(correct.mean())
    return {"model": model, "task": task, "accuracy": acc,
            "stderr": math.sqrt(acc * (1 - acc) / len(correct)), "items": len(correct)}


def search_cost(history_path: str | Path) -> dict:
    """Items evaluated and wall time spent by a search (from its history and job benchmarks)."""
    history = pd.read_parquet(history_path)
    evolve_dir = Path(history_path).parent
    wall = sum(float(pd.read_csv(f, sep="\t")["s"].sum()) for f in sorted(evolve_dir.glob("gen_*/benchmark/*.tsv")))
    return {"candidates": len(history), "search_items": int(history["items"].sum()), "search_wall_s": wall}


def final_table(run: str, response_files: list[str], merged_files: list[str], history_path: str | None,
                tasks: list[str], models: list[str], table_out: str | Path, summary_out: str | Path,
                search_files: dict[str, str] | None = None, result: str | None = None) -> pd.DataFrame:
    """Write ``test.parquet`` and ``summary.md``. ``response_files`` are ordered tasks × models;
    ``merged_files`` (one per task) are the run's final merge, when the run searched;
    ``search_files`` (task -> file) its responses on the whole search split after a search on
    anchors, set beside the fitness the search estimated for it (``result``: what the search
    ended on, its fitness kind's; see ``history.best_row``)."""
    rows = [accuracy_row(path, model, task) for (task, model), path in zip(product(tasks, models), response_files)]
    cost = {}
    if merged_files:
        cost = search_cost(history_path)
        checks = estimate_checks(history_path, search_files or {}, result)
        rows += [{**accuracy_row(path, MERGED, task), **cost, **checks.get(task, {})}
                 for task, path in zip(tasks, merged_files)]
    table = pd.DataFrame(rows).assign(run=run)
    Path(table_out).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(table_out, index=False)
    Path(summary_out).write_text(markdown_summary(table, tasks, f"Run {run!r}: test-split accuracy"))
    return table


def estimate_checks(history_path: str | Path, search_files: dict[str, str], result: str) -> dict[str, dict]:
    """Per task: the fitness (and sd) a search estimated for its final merge (the candidate
    ``best_row`` picks by ``result``), the items that estimate rests on, and that merge's
    accuracy on the whole search split."""
    if not search_files:
        return {}
    best = hist.best_row(pd.read_parquet(history_path), result)
    checks = {}
    for task, path in search_files.items():
        measured = accuracy_row(path, MERGED, task)
        estimate, sd = hist.task_estimate(best, task)
        checks[task] = {"estimated_fitness": estimate, "estimated_sd": sd,
                        "estimate_items": hist.task_items(best, task),
                        "search_split_accuracy": measured["accuracy"],
                        "search_split_items": measured["items"]}
        log.info("%s: the search estimated %.4f, the whole search split gives %.4f", task,
                 checks[task]["estimated_fitness"], measured["accuracy"])
    return checks


def markdown_summary(table: pd.DataFrame, tasks: list[str], title: str) -> str:
    """Accuracy per model and task, with the search cost of merged models."""
    has_cost = "search_items" in table.columns
    header = "| model | " + " | ".join(tasks) + (" | items evaluated in search | search wall time (s) |" if has_cost else " |")
    lines = [f"# {title}", "", header, "|---|" + "---|" * (len(tasks) + (2 if has_cost else 0))]
    for model, group in table.groupby("model", sort=False):
        acc = group.set_index("task")["accuracy"]
        cells = [f"{acc[t]:.3f}" if t in acc else "" for t in tasks]
        if has_cost:
            first = group.iloc[0]
            cells += ["" if pd.isna(first.get("search_items")) else f"{int(first['search_items']):,}",
                      "" if pd.isna(first.get("search_wall_s")) else f"{first['search_wall_s']:.0f}"]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    items = table.groupby("task")["items"].first()
    lines += ["", "Test items per task: " + ", ".join(f"{t} {items[t]}" for t in tasks if t in items) + ".", ""]
    return "\n".join(lines + _estimate_check_lines(table))


def _estimate_check_lines(table: pd.DataFrame) -> list[str]:
    """How far a search that ended on estimates was from the truth about the merge it chose."""
    if "estimated_fitness" not in table.columns:
        return []
    checked = table.dropna(subset=["estimated_fitness"])
    if checked.empty:
        return []
    lines = ["## The search's estimate of its merge", "",
             "The fitness a search estimated for the merge it chose (from anchors, or from a multi-fidelity "
             "rung below the whole split; items in brackets), beside that merge's accuracy on the whole search "
             "split, scored once after the search.", "",
             "| model | task | estimated (items) | whole search split (items) | error (points) | within ±1.96 sd |",
             "|---|---|---|---|---|---|"]
    for row in checked.itertuples():
        error = 100 * (row.estimated_fitness - row.search_split_accuracy)
        inside = "" if pd.isna(row.estimated_sd) else (
            "yes" if abs(error) <= 196 * row.estimated_sd else "no")
        sd = "" if pd.isna(row.estimated_sd) else f" ± {row.estimated_sd:.3f}"
        lines.append(f"| {row.model} | {row.task} | {row.estimated_fitness:.3f}{sd} ({int(row.estimate_items)}) | "
                     f"{row.search_split_accuracy:.3f} ({int(row.search_split_items):,}) | {error:+.1f} | {inside} |")
    return lines + [""]


def runs_table(tables: dict[str, str | Path]) -> pd.DataFrame:
    """Every run's test table as one: the endpoints and baseline once (from the first run), then
    each run's merge as ``merged ({run})``."""
    frames = [pd.read_parquet(path) for path in tables.values()]
    first = frames[0]
    shared = first[first["model"] != MERGED]
    merged = [f[f["model"] == MERGED].assign(model=f"merged ({run})") for run, f in zip(tables, frames)]
    return pd.concat([shared, *merged], ignore_index=True)


def compare_runs(tables: dict[str, str], out: str | Path) -> pd.DataFrame:
    """One table over runs: the endpoints and baseline once, then each run's merge."""
    table = runs_table(tables)
    tasks = list(dict.fromkeys(table["task"]))
    Path(out).write_text(markdown_summary(table, tasks, "All runs: test-split accuracy"))
    return table


def pareto_members(run: str, pareto_path: str | Path, tasks: dict[str, dict], evaluation: dict,
                   models_out: str | Path, table_out: str | Path, summary_out: str | Path) -> pd.DataFrame:
    """Materialise each point of a multi-objective run's Pareto front as an HF directory (model
    card with its lineage) and score it on each task's test split.

    ``tasks`` maps a task to ``{"split": test parquet, "scorer": ..., "delimiter": ...}``.
    """
    # torch comes with these: kept off the light jobs (final_table, compare_runs) that import this module
    from mergeflow.data import read_split
    from mergeflow.evaluate import EvalSettings, evaluate_items, load_causal_lm
    from mergeflow.merge.candidates import candidate_from_yaml, materialise

    settings = EvalSettings.from_config(evaluation)
    front = pd.read_parquet(pareto_path)
    objectives = [hist.fitness_column(t) for t in hist.objectives_of(front)]
    # candidates that tie on every objective are the same point of the front: test the earliest
    front = (front.sort_values(["generation", "index"]).drop_duplicates(objectives)
             .sort_values(objectives, ascending=False, kind="stable").reset_index(drop=True))
    splits = {task: read_split(spec["split"]) for task, spec in tasks.items()}
    rows = []
    for member, cand in front.iterrows():
        recipe = candidate_from_yaml(cand["recipe"])
        out = Path(models_out) / f"member_{member:02d}"
        search = {c.removeprefix("fitness_"): float(cand[c]) for c in objectives}
        materialise(recipe, out, lineage=[f"- run: {run}, Pareto member {member} of {len(front)}",
                                           f"- found in generation {int(cand['generation'])} as candidate "
                                           f"{int(cand['index'])}",
                                           "- search fitness: " + ", ".join(f"{t} {v:.4f}" for t, v in search.items())])
        model, tokenizer = load_causal_lm(out, settings)
        for task, spec in tasks.items():
            scored = evaluate_items(model, tokenizer, splits[task], spec["scorer"], settings.for_task(spec),
                                    spec["delimiter"])
            rows.append({"run": run, "member": member, "generation": int(cand["generation"]),
                         "index": int(cand["index"]), "recipe_hash": cand["recipe_hash"], "task": task,
                         "search_fitness": search.get(task, float("nan")),
                         "accuracy": float(scored["correct"].mean()), "items": len(scored)})
        log.info("Pareto member %d: %s", member, {r["task"]: round(r["accuracy"], 4) for r in rows[-len(tasks):]})
    table = pd.DataFrame(rows)
    Path(table_out).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(table_out, index=False)
    lines = [f"# Run {run!r}: the Pareto set on the test split", "",
             "Search fitness (the run's estimate on the search split) / test-split accuracy.", "",
             "| member | generation | candidate | " + " | ".join(tasks) + " |",
             "|---|---|---|" + "---|" * len(tasks)]
    for member, group in table.groupby("member", sort=True):
        by_task = group.set_index("task")
        cells = [("" if pd.isna(by_task.at[t, "search_fitness"]) else f"{by_task.at[t, 'search_fitness']:.3f} / ")
                 + f"{by_task.at[t, 'accuracy']:.3f}" for t in tasks]
        first = group.iloc[0]
        lines.append(f"| {member} | {first['generation']} | {first['index']} | " + " | ".join(cells) + " |")
    Path(summary_out).write_text("\n".join(lines) + "\n")
    return table
