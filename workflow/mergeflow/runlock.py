"""Which workflow run is live in a working directory, so that a second cannot start beside it.

Snakemake's own lock is removed by ``snakemake --unlock``, which a user runs after a hard kill left
it behind, but which Snakemake also honours while the run that holds the lock is alive: a second
run then starts and rewrites the files the first is writing. The workflow records its run here
(process id, host, start) when it starts and removes the record when it ends; a record whose
process is alive on this host refuses ``--unlock`` and a second run. A record a hard kill left
behind names a dead process and is ignored.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from mergeflow.outputs import process_alive

RECORD = Path(".snakemake") / "mergeflow-live-run.json"


def _is_snakemake(pid: int) -> bool:
    """Whether ``pid`` is a Snakemake process (its pid may since have been reused by another)."""
    try:
        return b"snakemake" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): trust the pid


def live_run(record: Path = RECORD) -> dict | None:
    """The run recorded in ``record`` if it is still live (another process on this host); else None."""
    try:
        run = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    pid = run.get("pid")
    if (not isinstance(pid, int) or pid == os.getpid() or run.get("host") != socket.gethostname()
            or not process_alive(pid) or not _is_snakemake(pid)):
        return None
    return run


def record_run(record: Path = RECORD) -> None:
    """Record this process as the directory's live run."""
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}))


def release_run(record: Path = RECORD) -> None:
    """Remove this process's record (a record of another process stays)."""
    try:
        if json.loads(record.read_text()).get("pid") == os.getpid():
            record.unlink()
    except (OSError, ValueError):
        pass
