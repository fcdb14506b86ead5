"""The report's figures, drawn with matplotlib from the stage files (PNG, no timestamps, so the
same inputs give the same bytes on one machine).

Per run: :func:`search_progress` (fitness per generation) and :func:`best_genome` (the chosen
genome as heatmaps); per task with an IRT fit: :func:`irt_fit_figure`; per multi-objective run:
:func:`pareto_figure`; over every run: :func:`accuracy_figure` and :func:`cost_figure`.
"""

from __future__ import annotations

import math

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mergeflow.evolve import history as hist
from mergeflow.irt.fit import load_irt
from mergeflow.irt.responses import load_response_matrix
from mergeflow.report import MERGED, runs_table

if TYPE_CHECKING:  # a name for annotations: the spaces bring torch, which most figures never need
    from mergeflow.spaces import Space

DPI = 130
Z_95 = 1.96  # half-width of a 95% interval, in sds
BASE_STYLE = {
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8,
    "axes.spines.top": False, "axes.spines.right": False, "savefig.bbox": "tight",
    "svg.hashsalt": "mergeflow",
}
RUNG_COLORS = ["#9ecae1", "#4292c6", "#08519c", "#08306b"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(BASE_STYLE)
    return plt


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # no Software/creation metadata: the bytes depend on the data alone
    fig.savefig(out, dpi=DPI, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out


def _percent(ax, axis: str = "y") -> None:
    """Accuracy axis: percent ticks, and limits within [0, 1] however far an error bar reaches."""
    from matplotlib.ticker import PercentFormatter

    (ax.yaxis if axis == "y" else ax.xaxis).set_major_formatter(PercentFormatter(1.0, decimals=0))
    low, high = ax.get_ylim() if axis == "y" else ax.get_xlim()
    (ax.set_ylim if axis == "y" else ax.set_xlim)(max(low, -0.02), min(high, 1.02))


# ---- per run ------------------------------------------------------------------------------------


# How many of a search's last steps its trend line averages (``result: last``).
TREND_STEPS = 5


def progress_line(history: pd.DataFrame, task: str, result: str) -> tuple[np.ndarray, np.ndarray, str]:
    """The line the progress figure draws through a search's fitness on ``task``, per generation:
    for a search that ends on its best candidate (``result: best``), the best fitness so far at
    the highest rung reached; for one that ends on its last step (``last``: each generation scored on
    one minibatch), the mean of its last :data:`TREND_STEPS` steps' mean fitness. Returns the
    generations, the line's values and its legend label."""
    rung = history["rung"] if "rung" in history.columns else pd.Series(0, index=history.index)
    fitness = history[hist.fitness_column(task)]
    top = history[(rung == rung.max()) & np.isfinite(fitness)]
    generations = np.arange(history["generation"].max() + 1)
    if result == "last":
        # a generation's mean (a hybrid's candidates share its minibatch; Adam's one candidate is its own)
        trend = top.groupby("generation")[hist.fitness_column(task)].mean().reindex(generations)
        return (generations, trend.rolling(TREND_STEPS, min_periods=1).mean().to_numpy(),
                f"mean of the last {TREND_STEPS} steps")
    best = top.groupby("generation")[hist.fitness_column(task)].max().cummax().reindex(generations).ffill()
    return generations, best.to_numpy(), "best so far" + (f" (rung {rung.max()})" if "rung" in history.columns else "")


def search_progress(run: str, history_path: str | Path, result: str, out: str | Path,
                    table_path: str | Path | None = None, fitness_label: str | None = None) -> Path:
    """Fitness of every candidate per generation (a point each; ±1.96 sd where the fitness is an
    estimate), the search's progress as a line (:func:`progress_line`; ``result``: what the
    search ends on, its fitness kind's), and the final merge's accuracy on the whole search split
    where it was measured after the search (``table_path``: the run's ``test.parquet``). A fitness
    that is not an accuracy is drawn on its own scale, named by ``fitness_label`` (its kind's)."""
    plt = _pyplot()
    history = pd.read_parquet(history_path)
    tasks = hist.objectives_of(history)
    table = pd.read_parquet(table_path) if table_path else None
    multi_rung = "rung" in history.columns
    chosen = hist.best_row(history, result)
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        fitness, sd = history[hist.fitness_column(task)], history[hist.sd_column(task)]
        rung = history["rung"] if multi_rung else pd.Series(0, index=history.index)
        # spread each generation's candidates across a band so they do not hide each other
        width = history.groupby("generation")["index"].transform("max").clip(lower=1)
        x = history["generation"] + 0.35 * (history["index"] / width - 0.5)
        for r in sorted(rung.unique()):
            at = (rung == r) & np.isfinite(fitness)
            label = f"rung {r}" if multi_rung else "candidate"
            estimate = at & (sd > 0)
            if estimate.any():
                ax.errorbar(x[estimate], fitness[estimate], yerr=Z_95 * sd[estimate], fmt="none",
                            ecolor=RUNG_COLORS[r % len(RUNG_COLORS)], alpha=0.35, lw=0.8)
            ax.scatter(x[at], fitness[at], s=14, color=RUNG_COLORS[r % len(RUNG_COLORS)], label=label,
                       zorder=3, edgecolors="white", linewidths=0.3)
        generations, line, label = progress_line(history, task, result)
        if result == "last":
            ax.plot(generations, line, color="#d94801", lw=1.8, label=label, zorder=4)
        else:
            ax.step(generations, line, where="mid", color="#d94801", lw=1.8, label=label, zorder=4)
        if table is not None and "search_split_accuracy" in table.columns:
            measured = table[(table["task"] == task) & table["search_split_accuracy"].notna()]
            if len(measured):
                ax.scatter([chosen["generation"]], [measured["search_split_accuracy"].iloc[0]], marker="*",
                           s=160, color="#238b45", zorder=5, edgecolors="black", linewidths=0.5,
                           label="final merge, whole search split")
        ax.set_xlabel("generation")
        ax.set_ylabel(f"{task} fitness ({fitness_label or 'search split accuracy'})")
        if len(generations) <= 20:
            ax.set_xticks(generations)
        if fitness_label is None:
            _percent(ax)
        ax.set_title(f"run {run}: {task}")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return _save(fig, out)


def best_genome(run: str, history_path: str | Path, result: str, space: Space, out: str | Path) -> Path:
    """The final merge's genome (``result``: what the search ends on) as heatmaps, one per
    parameter: rows are models (and module kinds), columns layer groups (see the space's
    ``genome_table``)."""
    plt = _pyplot()
    best = hist.best_row(pd.read_parquet(history_path), result)
    table = space.genome_table(np.asarray(best["genome"], dtype=float))
    panels = list(dict.fromkeys(table["panel"]))
    rows_per = table.groupby("panel", sort=False)["row"].nunique()
    cols = table["column"].nunique()
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,
                             figsize=(1.3 * cols + 2.6, sum(0.45 * rows_per[p] + 0.9 for p in panels)))
    for ax, panel in zip(axes[:, 0], panels):
        grid = (table[table["panel"] == panel]
                .pivot_table(index="row", columns="column", values="value", sort=False, aggfunc="first"))
        image = ax.imshow(grid.to_numpy(dtype=float), cmap="viridis", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), grid.columns)
        ax.set_yticks(range(grid.shape[0]), grid.index)
        low, high = np.nanmin(grid.to_numpy(dtype=float)), np.nanmax(grid.to_numpy(dtype=float))
        for (i, j), value in np.ndenumerate(grid.to_numpy(dtype=float)):
            light = value < low + 0.5 * (high - low)
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if light else "black")
        fig.colorbar(image, ax=ax, label=panel, fraction=0.04, pad=0.02)
        ax.set_title(f"run {run}: {panel} per model and layer group (generation {int(best['generation'])}, "
                     f"candidate {int(best['index'])})")
        ax.spines[:].set_visible(False)
    return _save(fig, out)


# ---- per task with an IRT fit ---------------------------------------------------------------------


def irt_fit_figure(task: str, irt_dir: str | Path, response_files: list[str | Path],
                   anchor_files: list[str | Path], run_tables: list[str | Path], out: str | Path) -> Path:
    """Left: each calibration-population model's accuracy as the IRT fit predicts it (at its fitted
    ability, over every item) against its measured accuracy on the search split, and each checked
    search's estimate of its final merge (±1.96 sd) against that merge's measured accuracy. Right:
    the item map, difficulty β against discrimination |α|, with the anchors marked."""
    plt = _pyplot()
    fit = load_irt(irt_dir)
    matrix = load_response_matrix([str(p) for p in response_files])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.4, 4.0))

    measured, predicted = [], []
    for row, model in enumerate(matrix.models):
        if model not in fit.models:
            continue
        answers = matrix.matrix[row]
        columns = fit.item_index([item for item, a in zip(matrix.items, answers) if np.isfinite(a)])
        measured.append(float(np.nanmean(answers)))
        predicted.append(float(fit.probability(fit.theta_of(model), columns).mean()))
    left.scatter(measured, predicted, s=16, color="#6baed6", label="calibration models and endpoints: IRT fit\n(in-sample, all items)",
                 edgecolors="white", linewidths=0.3)
    checks = [frame[frame["task"] == task].dropna(subset=["estimated_fitness"])
              for frame in (pd.read_parquet(p) for p in run_tables) if "estimated_fitness" in frame.columns]
    for frame in checks:
        for row in frame.itertuples():
            left.errorbar([row.search_split_accuracy], [row.estimated_fitness], yerr=[Z_95 * row.estimated_sd],
                          fmt="D", ms=6, capsize=3, color="#d94801")
            left.annotate(f"run {row.run}", (row.search_split_accuracy, row.estimated_fitness),
                          textcoords="offset points", xytext=(6, 4), fontsize=8)
    if any(len(f) for f in checks):
        left.errorbar([], [], yerr=[], fmt="D", color="#d94801", label="final merge: search's estimate ±1.96 sd")
    values = measured + predicted + [v for f in checks for v in f.get("estimated_fitness", [])]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    pad = 0.05 * (hi - lo + 1e-3)
    left.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="grey", lw=0.8, ls="--", label="estimate = measured")
    left.set_xlabel("measured accuracy on the search split")
    left.set_ylabel("estimated accuracy")
    _percent(left)
    _percent(left, "x")
    left.set_title(f"{task}: estimated against measured")
    left.legend(loc="lower right", frameon=False)

    alpha = np.linalg.norm(fit.alpha_mean(), axis=1)
    beta = fit.beta_mean()
    right.scatter(beta, alpha, s=6, color="#bdbdbd", label=f"items ({fit.n_items})")
    markers = ["o", "s", "^", "v", "P"]
    for number, path in enumerate(anchor_files):
        anchors = pd.read_parquet(path)
        index = fit.item_index(anchors["item_id"].tolist())
        right.scatter(beta[index], alpha[index], s=28, marker=markers[number % len(markers)], facecolors="none",
                      edgecolors=plt.cm.tab10(number), linewidths=1.2,
                      label=f"anchor set {Path(path).stem} ({len(anchors)} items)")
    right.set_xlabel("difficulty β (logits)")
    right.set_ylabel("discrimination |α|")
    right.set_title(f"{task}: item map ({fit.kind}, {fit.dim}-d)")
    right.legend(loc="upper right", frameon=False)
    return _save(fig, out)


# ---- multi-objective runs -----------------------------------------------------------------------


def pareto_figure(run: str, history_path: str | Path, members_path: str | Path, table_path: str | Path,
                  out: str | Path) -> Path:
    """The first two objectives: every candidate's search fitness, the Pareto front's members
    (search fitness, and their test accuracy joined to it), the endpoints and the baseline (test)."""
    plt = _pyplot()
    history = pd.read_parquet(history_path)
    members = pd.read_parquet(members_path)
    table = pd.read_parquet(table_path)
    tasks = hist.objectives_of(history)[:2]
    fx, fy = (hist.fitness_column(t) for t in tasks)
    fig, ax = plt.subplots(figsize=(5.8, 4.6))
    valid = history[history["problem"] == ""]
    ax.scatter(valid[fx], valid[fy], s=10, color="#d9d9d9", label="candidates (search fitness)")
    wide = members.pivot_table(index="member", columns="task", values=["search_fitness", "accuracy"])
    search = wide["search_fitness"][tasks].sort_values(tasks[0])
    ax.plot(search[tasks[0]], search[tasks[1]], "-o", color="#2171b5", ms=5, label="Pareto front (search fitness)")
    test = wide["accuracy"][tasks].loc[search.index]
    ax.scatter(test[tasks[0]], test[tasks[1]], marker="o", s=30, facecolors="none", edgecolors="#d94801",
               linewidths=1.2, label="Pareto members (test accuracy)")
    for member in search.index:
        ax.annotate("", xy=(test.at[member, tasks[0]], test.at[member, tasks[1]]),
                    xytext=(search.at[member, tasks[0]], search.at[member, tasks[1]]),
                    arrowprops={"arrowstyle": "->", "color": "#fdae6b", "lw": 0.8})
    others = table[table["model"] != MERGED].pivot_table(index="model", columns="task", values="accuracy")
    for number, (model, row) in enumerate(others.iterrows()):
        if all(t in row.index for t in tasks):
            ax.scatter([row[tasks[0]]], [row[tasks[1]]], marker="X", s=60, color=plt.cm.Dark2(number),
                       label=f"{model} (test)", zorder=5)
    ax.set_xlabel(f"{tasks[0]} accuracy")
    ax.set_ylabel(f"{tasks[1]} accuracy")
    _percent(ax)
    _percent(ax, "x")
    ax.set_title(f"run {run}: Pareto front")
    ax.legend(loc="best", frameon=False)
    return _save(fig, out)


# ---- every run ------------------------------------------------------------------------------------


def _run_tables(tables: dict[str, str | Path]) -> pd.DataFrame:
    frames = [pd.read_parquet(p).assign(run=run) for run, p in tables.items()]
    return pd.concat(frames, ignore_index=True)


def accuracy_figure(tables: dict[str, str | Path], out: str | Path) -> Path:
    """Test accuracy (±1.96 standard errors) of every model on every task: the endpoints and the
    baseline once, then each run's final merge."""
    plt = _pyplot()
    table = runs_table(tables)
    tasks = list(dict.fromkeys(table["task"]))
    models = list(dict.fromkeys(table["model"]))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) * (1 + 0.25 * len(models))), 3.8))
    width = 0.8 / len(models)
    colors = plt.cm.tab20(np.linspace(0, 1, 20))
    for number, model in enumerate(models):
        rows = table[table["model"] == model].set_index("task").reindex(tasks)
        x = np.arange(len(tasks)) - 0.4 + width * (number + 0.5)
        ax.bar(x, rows["accuracy"], width * 0.92, yerr=Z_95 * rows["stderr"], capsize=1.5,
               color=colors[number % 20], label=model, error_kw={"lw": 0.6})
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("test accuracy")
    _percent(ax)
    ax.set_title("Test accuracy of every model on every task (bars: ±1.96 standard errors)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    return _save(fig, out)


def label_offsets(points: dict[str, tuple[float, float]], near: float = 0.15) -> dict[str, int]:
    """Vertical offsets (points) of the labels of points on a log-x plot: where searches of similar
    cost (within ``near`` decades) would print their labels over each other, the highest point's
    label goes above it, the lowest's below it and any between at its own height (a tie is broken
    by name); a point alone is labelled above. Placed by position, never by order: the label
    beside a point is its own."""
    above, level, below = 4, -3, -11
    offsets = {}
    for name, (x, y) in points.items():
        cluster = sorted((-other_y, other) for other, (other_x, other_y) in points.items()
                         if abs(math.log10(other_x) - math.log10(x)) < near)
        rank = cluster.index((-y, name))
        offsets[name] = above if rank == 0 else below if rank == len(cluster) - 1 else level
    return offsets


def cost_figure(tables: dict[str, str | Path], objectives: dict[str, list[str]], out: str | Path) -> Path:
    """Per search: its final merge's test accuracy on its (first) objective against the items it
    evaluated (left) and its wall time (right), beside the best endpoint on that task."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt = _pyplot()
    table = _run_tables(tables)
    merged = table[table["model"] == MERGED]
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 3.6), sharey=True)
    for ax, column, label in ((axes[0], "search_items", "items evaluated in the search"),
                              (axes[1], "search_wall_s", "search wall time (s)")):
        points = {}
        for number, (run, tasks) in enumerate(objectives.items()):
            row = merged[(merged["run"] == run) & (merged["task"] == tasks[0])]
            if row.empty or pd.isna(row[column].iloc[0]):
                continue
            row = row.iloc[0]
            ax.errorbar([row[column]], [row["accuracy"]], yerr=[Z_95 * row["stderr"]], fmt="o", capsize=3,
                        color=plt.cm.tab10(number), label=f"{run} ({tasks[0]})")
            points[run] = (float(row[column]), float(row["accuracy"]))
        for run, offset in label_offsets(points).items():
            ax.annotate(run, points[run], textcoords="offset points", xytext=(6, offset), fontsize=8)
        targets = {tasks[0] for tasks in objectives.values()}
        endpoints = table[(table["model"] != MERGED) & table["task"].isin(targets)]
        for number, (task, rows) in enumerate(endpoints.groupby("task")):
            best = rows.loc[rows["accuracy"].idxmax()]
            ax.axhline(best["accuracy"], color="grey", ls="--", lw=0.8)
            ax.annotate(f"best endpoint on {task}: {best['model']}", (0.01, best["accuracy"]),
                        xycoords=("axes fraction", "data"), textcoords="offset points", xytext=(0, 3),
                        fontsize=7, color="grey")
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(label + " (log scale)")
    axes[0].set_ylabel("final merge's test accuracy")
    _percent(axes[0])
    axes[0].legend(loc="lower right", frameon=False)
    fig.suptitle("Search cost against the final merge's test accuracy (bars: ±1.96 standard errors)")
    return _save(fig, out)

