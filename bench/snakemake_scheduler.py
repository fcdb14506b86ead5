"""Snakemake's own cost on a run of many jobs: its thread count and CPU time, as it ships and with
mergeflow's one pending re-evaluation timer (``mergeflow/scheduling.py``, installed by the
workflow's ``onstart``).

    python bench/snakemake_scheduler.py                   # 1,200 jobs of 0.2 s, about 10 minutes
    python bench/snakemake_scheduler.py --jobs 300 --seconds 0

The workflow is minimal on purpose, so that nothing of mergeflow's but the hook is in it: ``--jobs``
independent jobs that each sleep ``--seconds`` in a shell (their CPU time is the children's, not
Snakemake's), run with ``snakemake --cores 1`` and the default ``--max-jobs-per-timespan 100/1s``.
``--in-process`` runs them as ``run:`` blocks under ``--force-use-threads`` instead, as mergeflow's
profile runs its ask/fitness/tell jobs (then their own CPU time counts as Snakemake's). Sampled
every 0.2 s from /proc: the Snakemake process's thread count and its own CPU time (utime + stime,
not its children's).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LIBRARY = Path(__file__).resolve().parents[1] / "workflow"

HOOK = f"""
import sys
sys.path.insert(0, {str(LIBRARY)!r})
from mergeflow.scheduling import one_pending_reevaluation

onstart:
    one_pending_reevaluation(workflow.scheduler)
"""


def snakefile(jobs: int, seconds: float, in_process: bool, one_timer: bool) -> str:
    body = (f'    run:\n        time.sleep({seconds})\n        Path(output[0]).write_text("x")\n' if in_process
            else f'    shell: "sleep {seconds}; touch {{output}}"\n')
    return ("import time\nfrom pathlib import Path\n" + (HOOK if one_timer else "")
            + f'\nrule all:\n    input: expand("out/{{i}}.txt", i=range({jobs}))\n\n'
            + 'rule work:\n    output: "out/{i}.txt"\n' + body)


def watch(command: list[str], cwd: Path | None = None) -> dict:
    """Run ``command`` (a Snakemake) to its end, sampling its process every 0.2 s from /proc: wall
    time, its own CPU time (not its children's), thread counts; raises with its stderr if it fails."""
    tick = os.sysconf("SC_CLK_TCK")
    start = time.monotonic()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    threads, cpu = [], 0.0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            stat = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            break
        threads.append(int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1]))
        cpu = (int(stat[11]) + int(stat[12])) / tick
        time.sleep(0.2)
    stderr = process.communicate()[1]
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{stderr[-3000:]}")
    return {"wall": time.monotonic() - start, "cpu": cpu, "peak_threads": max(threads, default=0), "threads": threads}


def run_workflow(directory: Path, jobs: int, seconds: float, one_timer: bool, in_process: bool = False) -> dict:
    """Run the minimal workflow in ``directory``: ``watch``'s figures and the jobs done."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Snakefile").write_text(snakefile(jobs, seconds, in_process, one_timer))
    command = [sys.executable, "-m", "snakemake", "--cores", "1", "--quiet", "all"]
    if in_process:
        command.append("--force-use-threads")
    return {**watch(command, cwd=directory), "jobs_done": len(list((directory / "out").iterdir()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1200)
    parser.add_argument("--seconds", type=float, default=0.2, help="each job's sleep")
    parser.add_argument("--in-process", action="store_true", help="run: jobs under --force-use-threads")
    args = parser.parse_args()
    import snakemake

    rows = {}
    with tempfile.TemporaryDirectory(prefix="mergeflow-scheduler-") as tmp:
        for name, one_timer in (("as shipped", False), ("one timer", True)):
            rows[name] = run_workflow(Path(tmp) / name.replace(" ", "-"), args.jobs, args.seconds, one_timer,
                                      args.in_process)
    kind = "run: blocks, --force-use-threads" if args.in_process else "shell jobs"
    print(f"Snakemake {snakemake.__version__}: {args.jobs} jobs of {args.seconds} s ({kind}), --cores 1, "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"{'scheduler':<12} {'wall s':>8} {'own CPU s':>10} {'CPU/wall':>9} {'peak threads':>13} "
          f"{'threads at 25/50/75/100% of the run':>38}")
    for name, row in rows.items():
        t = row["threads"]
        quarters = "/".join(str(t[min(len(t) - 1, int(len(t) * q))]) for q in (0.25, 0.5, 0.75, 0.999)) if t else "-"
        print(f"{name:<12} {row['wall']:>8.1f} {row['cpu']:>10.1f} {row['cpu'] / row['wall']:>8.1%} "
              f"{row['peak_threads']:>13} {quarters:>38}")
    shipped, fixed = rows["as shipped"], rows["one timer"]
    print(f"as shipped / one timer: own CPU {shipped['cpu'] / fixed['cpu']:.1f}x, "
          f"peak threads {shipped['peak_threads'] / fixed['peak_threads']:.0f}x, "
          f"wall {shipped['wall'] / fixed['wall']:.2f}x")


if __name__ == "__main__":
    main()
