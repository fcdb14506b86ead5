"""Per-generation overhead of the evolution loop: Snakemake, process start and model load.

The useful work of a generation is the time spent merging and scoring candidates (``wall_s`` in
``fitness_*.parquet``). Everything else — interpreter start, imports, loading the source models,
ask and tell — is overhead, measured against the generation's own jobs (Snakemake's benchmark
files) and against the wall-clock span from the previous ``tell`` to its own (which also holds
Snakemake's scheduling, and other runs' jobs where several runs interleave).

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
        jobs_s = sum(float(pd.read_csv(p, sep="\t")["s"].iloc[0]) for p in gen.glob("benchmark/*.tsv"))
        rows.append({"generation": g, "span_s": end - start, "jobs_s": jobs_s, "candidate_work_s": work,
                     "overhead_of_jobs": 1 - work / jobs_s, "overhead_of_span": 1 - work / (end - start)})
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
        jobs, span, work = table["jobs_s"].sum(), table["span_s"].sum(), table["candidate_work_s"].sum()
        print(f"overhead: {1 - work / jobs:.1%} of the generation's own jobs (ask + evaluate + tell: "
              f"{jobs - work:.1f} s of {jobs:.1f} s; target <= 20%)")
        print(f"          {1 - work / span:.1%} of the wall-clock span between tells ({span:.1f} s; includes "
              "scheduling, and other runs' jobs when runs interleave)\n")


if __name__ == "__main__":
    main()
