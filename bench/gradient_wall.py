"""A search's wall time through Snakemake against the same search in-process.

    python bench/gradient_wall.py --workdir WORKDIR [--run cheap] [--rerun-triggers mtime params input]

WORKDIR holds a finished default (its zoo, data, checks and IRT fits). The search ``--run`` is run
twice from those files, each in a scratch directory:
- in-process, with torch on one thread as the fitness jobs pin it, through the library's stage
  functions (``ask``, ``fitness``, ``promote``, ``tell``: the ones the Snakemake jobs call), as
  ``bench/search_sweep.py`` runs a search;
- through Snakemake: a copy of WORKDIR's results without ``results/runs/RUN``, then
  ``snakemake results/runs/RUN/evolve/history.parquet --cores 1`` (the default profile).
Both end in the same history (checked: genomes, fitness, items). Printed: each side's wall time,
the ratio, the Snakemake process's peak thread count and own CPU time (sampled from /proc), the
time its jobs' bodies took by their benchmark files, and what importing Snakemake costs here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

from search_sweep import search  # noqa: E402  (same directory)
from snakemake_scheduler import watch  # noqa: E402


def through_snakemake(workdir: Path, scratch: Path, run: str, configfile: Path, triggers: list[str] | None) -> dict:
    """The search run by Snakemake in a copy of ``workdir``'s results: ``watch``'s figures, the jobs'
    time by their benchmark files, their number and the history."""
    shutil.copytree(workdir / "results", scratch / "results",
                    ignore=lambda d, names: [n for n in names if Path(d, n) == workdir / "results" / "runs" / run])
    target = f"results/runs/{run}/evolve/history.parquet"
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(scratch), target,
               "--configfile", str(configfile), "--cores", "1", "--quiet",
               *(["--rerun-triggers", *triggers] if triggers else [])]
    watched = watch(command)
    benchmarks = list((scratch / "results" / "runs" / run / "evolve").glob("gen_*/benchmark/*.tsv"))
    bodies = sum(pd.read_csv(f, sep="\t")["s"].iloc[0] for f in benchmarks)
    return {**watched, "bodies": bodies, "jobs": len(benchmarks) + 1,  # and history's copy
            "history": pd.read_parquet(scratch / target)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--run", default="cheap")
    parser.add_argument("--configfile", type=Path, default=REPO / "config" / "config.yaml")
    parser.add_argument("--rerun-triggers", nargs="+", default=None,
                        help="passed to Snakemake, e.g. 'mtime params input' for a WORKDIR made by another commit")
    args = parser.parse_args()
    from mergeflow.config import validate_config

    config = validate_config(yaml.safe_load(args.configfile.read_text()))
    workdir = args.workdir.resolve()
    from mergeflow.logs import pin_threads

    pin_threads(1)  # as the fitness job pins torch to its rule's one thread
    os.chdir(workdir)  # the config names models by paths relative to it
    with tempfile.TemporaryDirectory(prefix="mergeflow-gradient-wall-") as tmp:
        history, inproc = search(config, args.run, workdir / "results", Path(tmp) / "in-process")
        snake = through_snakemake(workdir, Path(tmp) / "snakemake", args.run, args.configfile.resolve(),
                                  args.rerun_triggers)
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import snakemake.api"], check=True)
    imports = time.monotonic() - start
    same = [c for c in ("generation", "genome", "fitness", "items") if c in history.columns]
    equal = history[same].astype(str).equals(snake["history"][same].astype(str))
    print(f"run {args.run}: {len(history)} generations, {snake['jobs']} Snakemake jobs; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"in-process {inproc:.1f} s; through Snakemake {snake['wall']:.1f} s (jobs' bodies {snake['bodies']:.1f} s, "
          f"Snakemake's own CPU {snake['cpu']:.1f} s, peak {snake['peak_threads']} threads); "
          f"ratio {snake['wall'] / inproc:.2f}x")
    print(f"of which importing Snakemake (with its executor plugins) took {imports:.1f} s: the Slurm plugin runs "
          "sacct/squeue when it is imported, which wait for their timeouts where Slurm's tools are installed "
          "but no controller answers")
    print(f"same history ({', '.join(same)}): {equal}")


if __name__ == "__main__":
    main()
