"""The final stage's table: each model's accuracy on each task's test split."""

from __future__ import annotations

import math
from itertools import product
from pathlib import Path

import pandas as pd


def accuracy_table(responses: dict[tuple[str, str], str | Path]) -> pd.DataFrame:
    """One row per (model, task): accuracy, its standard error and the item count."""
    rows = []
    for (task, model), path in responses.items():
        correct = pd.read_parquet(path)["correct"].astype(float)
        acc = float(correct.mean())
        rows.append({"model": model, "task": task, "accuracy": acc,
                     "stderr": math.sqrt(acc * (1 - acc) / len(correct)), "items": len(correct)})
    return pd.DataFrame(rows)


def markdown_summary(table: pd.DataFrame, tasks: list[str]) -> str:
    wide = table.pivot(index="model", columns="task", values="accuracy")
    wide = wide.reindex(index=list(dict.fromkeys(table["model"])), columns=tasks)
    lines = ["# Test-split accuracy", "",
             "| model | " + " | ".join(tasks) + " |",
             "|---|" + "---|" * len(tasks)]
    for model, row in wide.iterrows():
        lines.append(f"| {model} | " + " | ".join(f"{row[t]:.3f}" for t in tasks) + " |")
    items = table.groupby("task")["items"].first()
    lines += ["", "Items per task: " + ", ".join(f"{t} {items[t]}" for t in tasks) + ".", ""]
    return "\n".join(lines)


def final_table(response_files: list[str], tasks: list[str], models: list[str], table_out: str | Path,
                summary_out: str | Path) -> pd.DataFrame:
    """Write ``test.parquet`` and ``summary.md``; ``response_files`` are ordered tasks x models."""
    responses = dict(zip(product(tasks, models), response_files))
    table = accuracy_table(responses)
    Path(table_out).parent.mkdir(parents=True, exist_ok=True)
    table.to_parquet(table_out, index=False)
    Path(summary_out).write_text(markdown_summary(table, tasks))
    return table
