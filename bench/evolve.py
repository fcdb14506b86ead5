"""Per-generation overhead of the evolution loop: Snakemake, process start and model load.

A generation's wall time runs from the end of the previous generation's ``tell`` (the mtime of
its ``history.parquet``) to the end of its own; the useful work in it is the time spent merging
and scoring candidates (``wall_s`` in ``fitness_*.parquet``). Everything else — scheduling,
interpreter start, imports, loading the source models, ask and tell — is overhead.

    python bench/evolve.py [--workdir DIR]

reads the runs of a finished ``snakemake --cores 1`` in DIR (default: the repository root), and
runs the workflow there first if it has not finished.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]


def generation_times(evolve_dir: Path, generations: int) -> pd.DataFrame:
    rows = []
    for g in range(generations):
        gen = evolve_dir / f"gen_{g}"
        end = (gen / "history.parquet").stat().st_mtime
        if g == 0:
            ask_s = float(pd.read_csv(gen / "benchmark" / "ask.tsv", sep="\t")["s"].iloc[0])
            start = (gen / "candidates.parquet").stat().st_mtime - ask_s
        else:
            start = (evolve_dir / f"gen_{g - 1}" / "history.parquet").stat().st_mtime
        fitness = pd.concat([pd.read_parquet(p) for p in sorted(gen.glob("fitness_*.parquet"))])
        work = float(fitness.drop_duplicates("index")["wall_s"].sum())
        evaluate_s = sum(float(pd.read_csv(p, sep="\t")["s"].iloc[0]) for p in gen.glob("benchmark/evaluate_*.tsv"))
        rows.append({"generation": g, "wall_s": end - start, "candidate_work_s": work,
                     "evaluate_job_s": evaluate_s, "overhead": 1 - work / (end - start)})
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO)
    parser.add_argument("--configfile", type=Path, default=None)
    args = parser.parse_args()
    configfile = args.configfile or args.workdir / "config" / "config.yaml"
    config = yaml.safe_load(configfile.read_text())
    runs = {name: r for name, r in config["runs"].items() if "evolve" in r}
    if not all((args.workdir / "results" / "runs" / r / "evolve" / "history.parquet").exists() for r in runs):
        subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(args.workdir),
                        "--configfile", str(configfile), "--cores", "1"], check=True)
    for name, run in runs.items():
        evolve = run["evolve"]
        table = generation_times(args.workdir / "results" / "runs" / name / "evolve", evolve["generations"])
        print(f"run {name!r}: fitness {evolve.get('fitness', 'full')}, population {evolve['population']}, "
              f"{evolve['generations']} generations")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        total, work = table["wall_s"].sum(), table["candidate_work_s"].sum()
        print(f"overhead: {1 - work / total:.1%} of generation wall time "
              f"({total - work:.1f} s of {total:.1f} s; target <= 20%)\n")


if __name__ == "__main__":
    main()
