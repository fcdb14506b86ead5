"""Logging and thread setup shared by the workflow's scripts and the CLI."""

from __future__ import annotations

import logging
from contextlib import contextmanager
import sys
import threading
import warnings
from pathlib import Path


def setup_job(log_file: str | Path | None = None, threads: int | None = None) -> logging.Logger:
    """Send mergeflow's log (and Python warnings) to ``log_file`` and stderr; pin torch's threads.

    Pinning the thread count makes CPU results independent of how many cores a machine has idle
    and keeps a job within the cores the scheduler gave it.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    if threads is not None:
        pin_threads(threads)
    return logging.getLogger("mergeflow")


def pin_threads(threads: int) -> None:
    """Give torch exactly the job's threads: CPU results then do not depend on idle cores."""
    import torch

    torch.set_num_threads(max(1, int(threads)))


@contextmanager
def job_log(log_file: str | Path):
    """Send mergeflow's log to ``log_file`` for the duration of an in-process job (a ``run:`` rule).

    Unlike :func:`setup_job` it leaves the host process's logging (Snakemake's) untouched. Only
    records of the calling thread reach the file: jobs that run side by side in the Snakemake
    process keep separate logs.
    """
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, mode="w")
    thread = threading.get_ident()
    handler.addFilter(lambda record: record.thread == thread)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("mergeflow")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()
