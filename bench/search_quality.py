"""Search quality per item evaluated, judged over seeds: each search of a config rerun with run
seeds (and anchor / rung seeds) 0..S-1 on the same zoo, data and IRT fits.

For every search run of the config it adds one run per seed to an overlay config (seed 0 is the
config's own run), runs the workflow (only the new searches and their final tables are
computed), and prints per search, on the first objective's test split: each seed's accuracy,
mean and sd, wins over the best endpoint, the share of the reference search's gain over the
best endpoint it keeps, items evaluated and wall time — beside the peer's figures.

    python bench/search_quality.py [--workdir DIR] [--configfile FILE ...] [--seeds 5]
                                   [--reference RUN] [--runs NAME ...] [--rerun-triggers mtime]
                                   [--peer DIR/results/bench/mergekit_evolve/summary.json]

``--peer`` puts the peer's row measured on the same zoo by bench/mergekit_evolve.py beside the
searches (without it, the embedded default's table shows issue 17's figures, from another zoo).

The zoo itself is a draw: a search that wins on one zoo may lose on the next. ``--zoos 0 1 2``
judges the searches on each of those zoos (``zoo.seed``), each in its own workdir WORKDIR/zoo-N
where the workflow builds it (zoo, data, IRT fits, every search), and ``--peer-runs 4`` runs
bench/mergekit_evolve.py there until it has 4 runs. It prints one table per zoo (each with the
peer measured on it), then a pooled table: per search, its mean on each zoo, the gain it keeps
on each (against that zoo's reference: by default the best mean among the searches that
evaluated the most items) and the smallest of them, and its wins over each zoo's best endpoint.

    python bench/search_quality.py --zoos 0 1 2 --workdir DIR [--peer-runs 4] [--cores 2]

Every later claim about search quality is judged by this, never by one seed.
"""

from __future__ import annotations

import argparse
import json
import copy
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

# mergekit-evolve 0.1.5 on the default zoo, as issue 17 measured it on one machine whose zoo gave
# the math expert 0.374 on math_l2 test (pycma CMA-ES from every weight at 0.5, σ = 1/6, the same
# per-layer task-arithmetic space, 1,000 search items scored by lm-evaluation-harness, population
# 8, ~48 evaluations): not rerun here, so comparable only where the zoo came out the same.
PEER = {"name": "mergekit-evolve (issue 17; zoo with math 0.374)", "test": [0.518, 0.400, 0.564, 0.464],
        "items": 48_000, "wall_s": (160, 175)}


def seeded_runs(config: dict, runs: list[str], seeds: int) -> dict[str, dict]:
    """Run name -> run config for seeds 1..S-1 of each search (seed 0 is the config's own run).
    The seed moves the optimizer and whatever the run's fitness kind says a seed moves (its
    ``seeded_keys``: the anchors, rung items or minibatches)."""
    from mergeflow.config import upgrade_config
    from mergeflow.fitness import FITNESS

    out = {}
    for run in runs:
        own = upgrade_config({"runs": {run: copy.deepcopy(config["runs"][run])}})["runs"][run]
        fitness = own["evolve"].get("fitness", {"kind": "full"})
        kind = FITNESS[fitness.get("kind", "full")]
        for seed in range(1, seeds):
            rcfg = copy.deepcopy(own)
            rcfg["seed"] = seed
            rcfg["evolve"]["fitness"] = kind.reseeded(fitness, seed)
            out[f"{run}-s{seed}"] = rcfg
    return out


def collect(results: Path, run: str, names: list[str], task: str) -> pd.DataFrame:
    rows = []
    for seed, name in enumerate(names):
        table = pd.read_parquet(results / "runs" / name / "final" / "test.parquet")
        merged = table[(table["model"] == "merged") & (table["task"] == task)].iloc[0]
        rows.append({"search": run, "seed": seed, "test": merged["accuracy"], "items": merged["search_items"],
                     "wall_s": merged["search_wall_s"]})
    return pd.DataFrame(rows)


def seed_table(table: pd.DataFrame, by: str, seeds: int, best: float,
               columns: dict[str, Callable[[pd.DataFrame], str]]) -> list[str]:
    """Markdown lines: per ``by`` group of ``table`` (columns ``by``, ``test``), each seed's test
    accuracy, mean ± sd and wins over the best endpoint, then ``columns`` (header -> its cell,
    from the group's rows)."""
    lines = [f"| {by} | " + " | ".join(f"seed {s}" for s in range(seeds))
             + " | mean ± sd | beats the best endpoint | " + " | ".join(columns) + " |",
             "|---|" + "---|" * (seeds + 2 + len(columns))]
    for name, rows in table.groupby(by, sort=False):
        test = rows["test"]
        lines.append(f"| {name} | " + " | ".join([f"{v:.3f}" for v in test] + [""] * (seeds - len(test)))
                     + f" | {test.mean():.3f} ± {test.std():.3f} | {int((test > best).sum())}/{len(test)} | "
                     + " | ".join(cell(rows) for cell in columns.values()) + " |")
    return lines


def endpoints_best(results: Path, run: str, endpoints: list[str], task: str) -> tuple[str, float, float]:
    """The best endpoint on the test split, its accuracy, and that accuracy's standard error."""
    table = pd.read_parquet(results / "runs" / run / "final" / "test.parquet")
    rows = table[(table["task"] == task) & table["model"].isin(endpoints)].set_index("model")
    best = rows["accuracy"].idxmax()
    accuracy = float(rows.loc[best, "accuracy"])
    return best, accuracy, math.sqrt(accuracy * (1 - accuracy) / int(rows.loc[best, "items"]))


def judge(workdir: Path, configfiles: list[Path], seeds: int, runs: list[str] | None, cores: int,
          rerun_triggers: list[str] | None, task: str | None = None) -> dict:
    """Run seeds 1..S-1 of the config's searches in ``workdir`` (the workflow builds whatever is
    missing there, the zoo included) and read every seed's test accuracy on ``task`` (default: the
    first run's first objective): a dict with the table (search, seed, test, items, wall_s), the
    task, the best endpoint, its accuracy and standard error, and the workdir's test table."""
    from snakemake.utils import update_config

    from mergeflow.config import validate_config

    raw: dict = {}
    for path in configfiles:  # merged as Snakemake merges --configfile overlays: nested keys recursively
        update_config(raw, yaml.safe_load(Path(path).read_text()))
    config = validate_config(copy.deepcopy(raw))
    runs = runs or [r for r in config["runs"] if "evolve" in config["runs"][r]]
    overlay = workdir / "results" / "bench" / "search_quality.yaml"
    overlay.parent.mkdir(parents=True, exist_ok=True)
    overlay.write_text(yaml.safe_dump({"runs": seeded_runs(raw, runs, seeds)}, sort_keys=False))
    subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
                    "--configfile", *map(str, configfiles), str(overlay), "--cores", str(cores), "--quiet",
                    "rules", *(["--rerun-triggers", *rerun_triggers] if rerun_triggers else [])], check=True)
    results = workdir / "results"
    task = task or next(iter(config["runs"][runs[0]]["evolve"]["objectives"]))
    best_name, best, stderr = endpoints_best(results, runs[0], list(config["endpoints"]), task)
    table = pd.concat([collect(results, run, [run] + [f"{run}-s{s}" for s in range(1, seeds)], task)
                       for run in runs], ignore_index=True)
    return {"table": table, "task": task, "best_name": best_name, "best": best, "stderr": stderr,
            "models": pd.read_parquet(results / "runs" / runs[0] / "final" / "test.parquet")}


def reference_of(table: pd.DataFrame, reference: str | None) -> str:
    """``reference``, or the search with the best mean among those that evaluated the most items
    (the 48,000-item searches on the default)."""
    if reference:
        return reference
    items = table.groupby("search")["items"].mean()
    most = table[table["search"].isin(items[items >= items.max() * 0.99].index)]
    return most.groupby("search")["test"].mean().idxmax()


def peer_rows(path: Path | None) -> pd.DataFrame | None:
    """bench/mergekit_evolve.py's summary.json as table rows (None where there is none)."""
    if path is None or not path.exists():
        return None
    measured = json.loads(path.read_text())
    return pd.DataFrame({"search": measured["name"], "test": measured["test"], "items": measured["items"],
                         "wall_s": measured["wall_s"]})


def gain_of(judged: dict, reference: str) -> float:
    """The reference search's mean gain over the best endpoint on a judged zoo."""
    table = judged["table"]
    return table.loc[table["search"] == reference, "test"].mean() - judged["best"]


def print_zoo(judged: dict, reference: str, peer: pd.DataFrame | None, seeds: int) -> None:
    table, best, stderr, task = judged["table"], judged["best"], judged["stderr"], judged["task"]
    reference_gain = gain_of(judged, reference)
    print(f"\n{task} test accuracy over {seeds} seeds (best endpoint: {judged['best_name']} {best:.3f}, standard "
          f"error {stderr:.3f}); gain kept = (mean - {best:.3f}) / ({reference} mean - {best:.3f})\n")
    columns = {"beats it by > 1 se": lambda r: f"{int((r['test'] > best + stderr).sum())}/{len(r)}",
               "gain kept": lambda r: f"{(r['test'].mean() - best) / reference_gain:.0%}" if reference_gain > 0 else "n/a",
               "items evaluated": lambda r: f"{r['items'].mean():,.0f}",
               "wall time (s)": lambda r: r["wall_s"].iloc[0] if isinstance(r["wall_s"].iloc[0], str)
               else f"{r['wall_s'].mean():.0f}"}
    shown = max(seeds, 0 if peer is None else len(peer))  # a column per seed, or per peer run
    print("\n".join(seed_table(pd.concat([table, peer], ignore_index=True), "search", shown, best, columns)))
    models = judged["models"]
    print("\nthe table's other models (test):", ", ".join(
        f"{r.model} {r.accuracy:.3f}" for r in models[models["task"] == task].itertuples()))


def print_pooled(zoos: dict[int, dict], references: dict[int, str], peers: dict[int, pd.DataFrame | None]) -> None:
    """Per search over the zoos: its mean, the smallest and the mean gain kept over the zoos, and its
    wins over each zoo's best endpoint."""
    rows = []
    for zoo, judged in zoos.items():
        table = pd.concat([judged["table"], peers[zoo]], ignore_index=True)
        best = judged["best"]
        gain = gain_of(judged, references[zoo])
        reference = table.loc[table["search"] == references[zoo], "test"]
        for search, group in table.groupby("search", sort=False):
            name = "mergekit-evolve" if search.startswith("mergekit-evolve") else search
            rows.append({"search": name, "zoo": zoo, "mean": group["test"].mean(),
                         "kept": (group["test"].mean() - best) / gain if gain > 0 else math.nan,
                         "wins": int((group["test"] > best).sum()), "n": len(group),
                         "items": group["items"].mean(),
                         # the difference of the two means over seeds (runs), and its standard error
                         "lead": group["test"].mean() - reference.mean(),
                         "lead_se": math.sqrt(group["test"].var() / len(group) + reference.var() / len(reference))})
    pooled = pd.DataFrame(rows)
    print(f"\npooled over zoo seeds {', '.join(map(str, zoos))} (gain kept against each zoo's reference: "
          f"{', '.join(f'{z}: {r}' for z, r in references.items())}; mean − reference: the difference of the "
          "means over seeds, ± its standard error from the two spreads)\n")
    print("| search | mean test per zoo | gain kept per zoo | smallest gain kept | mean − reference, per zoo "
          "| beats the best endpoint, per zoo | items evaluated |")
    print("|---|---|---|---|---|---|---|")
    for search, group in pooled.groupby("search", sort=False):
        print(f"| {search} | " + " / ".join(f"{v:.3f}" for v in group["mean"]) + " | "
              + " / ".join(f"{v:.0%}" for v in group["kept"]) + f" | {group['kept'].min():.0%} | "
              + " / ".join("reference" if s == references[z] else f"{d:+.3f} ± {e:.3f}"
                           for s, z, d, e in zip(group["search"], group["zoo"], group["lead"], group["lead_se"]))
              + " | "
              + " / ".join(f"{w}/{n}" for w, n in zip(group["wins"], group["n"]))
              + f" | {group['items'].mean():,.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO,
                        help="the workdir; with --zoos, the directory that holds one per zoo (zoo-N)")
    parser.add_argument("--configfile", type=Path, nargs="+", default=None)
    parser.add_argument("--zoos", type=int, nargs="+", default=None,
                        help="zoo seeds: judge the searches on each zoo (WORKDIR/zoo-N, with the overlay "
                             "zoo: {seed: N}), then pool them")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--runs", nargs="*", default=None, help="search runs to judge (default: every one)")
    parser.add_argument("--reference", default=None,
                        help="the search whose gain over the best endpoint the others are measured against "
                             "(default: the best mean among the searches that evaluated the most items)")
    parser.add_argument("--cores", type=int, default=1)
    parser.add_argument("--peer", type=Path, default=None,
                        help="summary.json of bench/mergekit_evolve.py on the same workdir's zoo (with --zoos: "
                             "each zoo's WORKDIR/zoo-N/results/bench/mergekit_evolve/summary.json)")
    parser.add_argument("--peer-runs", type=int, default=0,
                        help="with --zoos: run bench/mergekit_evolve.py on each zoo until it has this many runs")
    parser.add_argument("--rerun-triggers", nargs="+", default=None,
                        help="passed to Snakemake: e.g. 'mtime' to judge a changed search on results whose other "
                             "runs were made by an older commit (delete that search's results/runs/ first)")
    parser.add_argument("--task", default=None,
                        help="the task the tables score (default: the first run's first objective; a label-free "
                             "agreement run's objectives are the experts' tasks, not the target)")
    args = parser.parse_args()
    configfiles = args.configfile or [REPO / "config" / "config.yaml"]

    if args.zoos is None:
        judged = judge(args.workdir, configfiles, args.seeds, args.runs, args.cores, args.rerun_triggers, args.task)
        peer = peer_rows(args.peer)
        if peer is None and args.configfile is None:  # the peer's figures were measured on another zoo
            peer = pd.DataFrame({"search": PEER["name"], "test": PEER["test"], "items": PEER["items"],
                                 "wall_s": "{}–{}".format(*PEER["wall_s"])})
        print_zoo(judged, reference_of(judged["table"], args.reference), peer, args.seeds)
        return

    zoos, references, peers = {}, {}, {}
    for zoo in args.zoos:
        workdir = args.workdir / f"zoo-{zoo}"
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "zoo.yaml").write_text(yaml.safe_dump({"zoo": {"seed": zoo}}))
        zoos[zoo] = judge(workdir, [*configfiles, workdir / "zoo.yaml"], args.seeds, args.runs, args.cores,
                          args.rerun_triggers, args.task)
        summary = workdir / "results" / "bench" / "mergekit_evolve" / "summary.json"
        have = len(json.loads(summary.read_text())["test"]) if summary.exists() else 0
        if args.peer_runs > have:
            subprocess.run([sys.executable, str(REPO / "bench" / "mergekit_evolve.py"), "--workdir", str(workdir),
                            "--configfile", str(configfiles[0]), "--runs", str(args.peer_runs - have), "--append"],
                           check=True, env={**os.environ, "PYTHONPATH": str(REPO / "workflow")})
        references[zoo], peers[zoo] = reference_of(zoos[zoo]["table"], args.reference), peer_rows(summary)
    for zoo, judged in zoos.items():
        print(f"\n## zoo.seed {zoo} ({args.workdir / f'zoo-{zoo}'})")
        print_zoo(judged, references[zoo], peers[zoo], args.seeds)
    print_pooled(zoos, references, peers)


if __name__ == "__main__":
    main()
