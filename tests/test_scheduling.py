"""Snakemake's scheduler keeps one re-evaluation timer (``mergeflow.scheduling``)."""

import importlib.util
import threading
import time
from pathlib import Path

import pytest

from mergeflow.scheduling import one_pending_reevaluation

REPO = Path(__file__).resolve().parents[1]


class Scheduler:
    """The two names of Snakemake's JobScheduler that the hook reads."""

    def __init__(self):
        self._open_jobs = threading.Semaphore(0)

    def _schedule_reevalutation(self, delay):
        raise AssertionError("replaced by the hook")


def test_one_timer_is_pending_at_a_time_and_a_fired_one_makes_room_for_the_next():
    scheduler = Scheduler()
    assert one_pending_reevaluation(scheduler)
    before = threading.active_count()
    for _ in range(50):  # fifty passes within the timespan: one timer
        scheduler._schedule_reevalutation(0.2)
    assert threading.active_count() == before + 1
    assert scheduler._open_jobs.acquire(timeout=2)  # it fired: one pass
    assert not scheduler._open_jobs.acquire(timeout=0.3)  # and only one
    scheduler._schedule_reevalutation(0.05)  # the pass it ran may schedule the next
    assert scheduler._open_jobs.acquire(timeout=2)


def test_a_scheduler_without_those_names_is_left_alone():
    class Other:
        pass

    other = Other()
    assert not one_pending_reevaluation(other)
    assert not hasattr(other, "_schedule_reevalutation")


@pytest.mark.slow
def test_a_run_of_300_jobs_keeps_snakemake_to_a_few_threads(tmp_path):
    """As shipped (9.27.1), every finished job adds a one-second timer chain: 300 in-process jobs
    peak near 180 threads (bench/snakemake_scheduler.py); with the hook a handful."""
    spec = importlib.util.spec_from_file_location("bench_scheduler", REPO / "bench" / "snakemake_scheduler.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    started = time.monotonic()
    run = bench.run_workflow(tmp_path / "one-timer", jobs=300, seconds=0, one_timer=True, in_process=True)
    assert run["jobs_done"] == 300
    assert run["peak_threads"] <= 8, run["threads"]
    assert time.monotonic() - started < 120
