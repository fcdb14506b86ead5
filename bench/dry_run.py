"""How long Snakemake takes to plan the embedded default (``snakemake -n``): this checkout against
a baseline commit, each in a fresh clone with no results (every job planned), run in turn (A B A B
...) so that a drift in the machine's speed falls on both; prints each side's median wall time
and the median of the pairs' ratios.

    python bench/dry_run.py [--baseline ccb1734] [--runs 9]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def clone(commit: str, where: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(where)], check=True)
    subprocess.run(["git", "-C", str(where), "checkout", "-q", commit], check=True)
    return where


def plan_seconds(workdir: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["snakemake", "-n", "--quiet"], cwd=workdir, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="ccb1734")
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"A": clone(head, Path(tmp) / "a"), "B": clone(args.baseline, Path(tmp) / "b")}
        for workdir in sides.values():
            plan_seconds(workdir)  # warm-up: bytecode and page cache
        times: dict[str, list[float]] = {"A": [], "B": []}
        for _ in range(args.runs):
            for side, workdir in sides.items():
                times[side].append(plan_seconds(workdir))
    ratios = [a / b for a, b in zip(times["A"], times["B"])]
    print(f"snakemake -n on the embedded default, fresh clones, {args.runs} pairs")
    print(f"A ({head}): median {statistics.median(times['A']):.2f} s (min {min(times['A']):.2f}, max {max(times['A']):.2f})")
    print(f"B ({args.baseline}): median {statistics.median(times['B']):.2f} s (min {min(times['B']):.2f}, "
          f"max {max(times['B']):.2f})")
    print(f"A/B: median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
