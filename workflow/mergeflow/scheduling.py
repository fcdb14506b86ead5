"""Keep Snakemake's scheduler to one pending re-evaluation timer.

Snakemake (8.x and 9.x up to at least 9.27.1) ends every scheduling pass that leaves jobs waiting
with ``JobScheduler._schedule_reevalutation(timespan)`` when its job rate limiter is on, which it is
by default (``--max-jobs-per-timespan 100/1s``). That starts a ``threading.Timer`` which, a second
later, releases the scheduler's semaphore, which runs another pass, which starts another timer. Each
finished job releases the semaphore once more, so each one starts a chain of its own that lives as
long as jobs wait. On 1,200 jobs of 0.2 s (``bench/snakemake_scheduler.py``) the Snakemake
process reached 1,202 threads and spent 2.9x the CPU time of the same run with one timer; the
default plus four more seeds of every search (1,255 jobs) ran with about 1,000 threads and a load
average of 796 on 2 cores.

One pending timer does the same work: any pass re-evaluates every waiting job and the rate limit,
so a second timer due at the same time only repeats it. ``one_pending_reevaluation`` replaces the
scheduler's method with one that starts a timer only when none is pending. It touches nothing when
the scheduler is not the one this was measured on (the names below are absent), so a Snakemake
that changes them runs as it would without us.
"""

from __future__ import annotations

import threading
from typing import Any


def one_pending_reevaluation(scheduler: Any) -> bool:
    """Make ``scheduler`` (a Snakemake ``JobScheduler``) keep at most one re-evaluation timer;
    True if it did."""
    semaphore = getattr(scheduler, "_open_jobs", None)
    if semaphore is None or not callable(getattr(scheduler, "_schedule_reevalutation", None)):
        return False
    pending = False
    lock = threading.Lock()

    def fire() -> None:
        nonlocal pending
        with lock:
            pending = False  # before the release: the pass it runs may need a timer of its own
        semaphore.release()

    def schedule_reevaluation(delay: float) -> None:
        nonlocal pending
        with lock:
            if pending:
                return  # its pass re-evaluates everything this one would
            pending = True
        timer = threading.Timer(delay, fire)
        timer.daemon = True
        timer.start()

    scheduler._schedule_reevalutation = schedule_reevaluation
    return True
