"""Logging and thread setup shared by the workflow's scripts and the CLI."""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

from mergeflow.errors import MergeflowError

# Set to 1 for the traceback behind a MergeflowError in the job's log (default: its message alone).
DEBUG_ENV = "MERGEFLOW_DEBUG"

# In-process jobs open at once (job_log) and the mergeflow logger's level before the first: the
# level goes back only when the last one ends, so a job ending first cannot mute the others.
_OPEN_JOBS = {"count": 0, "level": logging.NOTSET}
_OPEN_LOCK = threading.Lock()


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def log_failure(logger: logging.Logger, err: BaseException) -> None:
    """Write why a job failed into its log: a ``MergeflowError``'s one-line message (with the
    traceback when ``MERGEFLOW_DEBUG=1``), anything else with its traceback (a bug, not bad input)."""
    if isinstance(err, MergeflowError) and not debugging():
        logger.error("error: %s", err)
    else:
        trace = "".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip()
        logger.error("%s\nerror: %s", trace, err)


def _job_excepthook(exc_type, err, trace) -> None:
    """A script job's uncaught exception goes to its log file (and stderr) through
    :func:`log_failure`, so the log Snakemake points at says what went wrong."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, err, trace)
        return
    log_failure(logging.getLogger("mergeflow"), err.with_traceback(trace))


def setup_job(log_file: str | Path | None = None, threads: int | None = None) -> logging.Logger:
    """Send mergeflow's log (and Python warnings) to ``log_file`` and stderr; pin torch's threads.

    Pinning the thread count makes CPU results independent of how many cores a machine has idle
    and keeps a job within the cores the scheduler gave it. An exception that ends the job is
    written to the log too (:func:`log_failure`): for bad input, its one-line message.
    """
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="w"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        handlers=handlers, force=True)
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    sys.excepthook = _job_excepthook
    if threads is not None:
        pin_threads(threads)
    return logging.getLogger("mergeflow")


def pin_threads(threads: int) -> None:
    """Give torch exactly the job's threads: CPU results then do not depend on idle cores."""
    import torch  # heavy: every job's script imports this module, the light ones need no torch

    torch.set_num_threads(max(1, int(threads)))


@contextmanager
def job_log(log_file: str | Path):
    """Send mergeflow's log to ``log_file`` for the duration of an in-process job (a ``run:`` rule).

    Unlike :func:`setup_job` it leaves the host process's logging (Snakemake's) untouched. Only
    records of the calling thread reach the file: jobs that run side by side in the Snakemake
    process keep separate logs. An exception that ends the job is written to the file
    (:func:`log_failure`) and raised on to Snakemake.
    """
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, mode="w")
    thread = threading.get_ident()
    handler.addFilter(lambda record: record.thread == thread)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("mergeflow")
    with _OPEN_LOCK:
        if _OPEN_JOBS["count"] == 0:
            _OPEN_JOBS["level"] = logger.level
        _OPEN_JOBS["count"] += 1
        logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield logger
    except BaseException as err:
        log_failure(logger, err)
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()
        with _OPEN_LOCK:
            _OPEN_JOBS["count"] -= 1
            if _OPEN_JOBS["count"] == 0:
                logger.setLevel(_OPEN_JOBS["level"])
