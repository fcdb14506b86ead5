"""Per-generation overhead of the evolution loop: Snakemake, process start and model load.

The useful work of a generation is the time spent merging and scoring candidates (``wall_s`` in
``rung_*/fitness_*.parquet``). Everything else — Snakemake's scheduling and bookkeeping, ask and tell,
the fitness job's set-up, loading the source models — is overhead. For each search run of the
config, the bench reruns that run's loop alone (its ask, fitness and tell jobs, nothing else)
in a scratch copy of a finished ``results/``, so a generation's wall time is its own and not
interleaved with the other runs', and prints the overhead as a fraction of that wall time.

    python bench/evolve.py [--workdir DIR] [--configfile FILE]

reads the finished ``snakemake --cores 1`` in DIR (default: the repository root), running the
workflow there first if it has not finished. DIR's own results are not touched.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]


def generation_times(evolve_dir: Path, generations: int) -> pd.DataFrame:
    """Per generation: wall-clock span (end of the previous tell to the end of its own), its jobs'
    time (Snakemake's benchmark files) and the candidates' merge-and-score time."""
    rows = []
    for g in range(generations):
        gen = evolve_dir / f"gen_{g}"
        end = (gen / "history.parquet").stat().st_mtime
        if g == 0:
            ask_s = float(pd.read_csv(gen / "benchmark" / "ask.tsv", sep="\t")["s"].iloc[0])
            start = (gen / "candidates.parquet").stat().st_mtime - ask_s
        else:
            start = (evolve_dir / f"gen_{g - 1}" / "history.parquet").stat().st_mtime
        fitness = pd.concat([pd.read_parquet(p) for p in sorted(gen.glob("rung_*/fitness_*.parquet"))])
        work = float(fitness.drop_duplicates(["index", "rung"])["wall_s"].sum())
        jobs_s = sum(float(pd.read_csv(p, sep="\t")["s"].iloc[0]) for p in gen.glob("benchmark/*.tsv"))
        rows.append({"generation": g, "wall_s": end - start, "jobs_s": jobs_s, "candidate_work_s": work,
                     "overhead": 1 - work / (end - start)})
    return pd.DataFrame(rows)


def rerun_alone(workdir: Path, configfile: Path, run: str) -> tuple[Path, float]:
    """Rerun one search's loop in a scratch copy of ``workdir/results`` (without any run's
    outputs); returns the scratch directory and the Snakemake invocation's wall time."""
    scratch = Path(tempfile.mkdtemp(prefix=f"bench-evolve-{run}-"))
    shutil.copytree(workdir / "results", scratch / "results", ignore=shutil.ignore_patterns("runs"))
    target = f"results/runs/{run}/evolve/history.parquet"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "snakemake", target, "-s", str(REPO / "Snakefile"), "-d", str(scratch),
                    "--configfile", str(configfile.resolve()), "--cores", "1", "--quiet", "all"], check=True)
    return scratch, time.perf_counter() - t0


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
        scratch, invocation_s = rerun_alone(args.workdir, configfile, name)
        table = generation_times(scratch / "results" / "runs" / name / "evolve", evolve["generations"])
        shutil.rmtree(scratch)
        print(f"run {name!r}: fitness {evolve.get('fitness', 'full')}, population {evolve['population']}, "
              f"{evolve['generations']} generations, run alone")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        wall, work = table["wall_s"].sum(), table["candidate_work_s"].sum()
        later = table[table["generation"] > 0]
        steady = 1 - later["candidate_work_s"].sum() / later["wall_s"].sum()
        print(f"overhead per generation once the sources are resident (g >= 1): {steady:.1%} of its wall time "
              f"(target <= 20%)")
        print(f"overhead over all generations: {1 - work / wall:.1%} ({wall - work:.1f} s of {wall:.1f} s; "
              "includes loading the sources once, in generation 0)")
        print(f"          Snakemake start-up and DAG before generation 0: {invocation_s - wall:.1f} s, once per "
              "invocation\n")


if __name__ == "__main__":
    main()
