"""Source models kept resident across the evaluate jobs that run in one process.

With the default profile (``force-use-threads``) every ``evaluate`` job of a local run executes
inside the Snakemake process, so the merger built for generation 0 — sources on the device,
cached task vectors, the preallocated merged model — serves every later generation and every
run that merges the same models. A cluster job is its own process and builds it once per job.

One entry is kept (a box holds one set of sources at a time). The key includes each model
file's size and modification time, so a rebuilt model is reloaded, never served stale. The lock
serialises evaluations in the process: the merger overwrites one merged model per candidate.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mergeflow.evaluate import load_tokenizer
from mergeflow.merge.candidates import CANDIDATE_TYPES

log = logging.getLogger(__name__)

_LOCK = threading.Lock()
_RESIDENT: dict[tuple, tuple] = {}


def _fingerprint(path: str) -> tuple:
    root = Path(path)
    files = sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else []
    return (str(root.resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@contextmanager
def resident_merger(paths: Sequence[str], device: str, dtype: str | None, candidates: str = "recipe",
                    template=None) -> Iterator[tuple]:
    """``(merger, tokenizer)`` for ``paths`` (the first is the template), held for the duration;
    ``candidates``: the candidate type (a key of :data:`~mergeflow.merge.candidates.CANDIDATE_TYPES`),
    whose executor makes the merger: a resident :class:`~mergeflow.merge.InMemoryMerger` for
    recipes, a :class:`~mergeflow.merge.assemble.PathAssembler` (its shell the first path's) for
    layer paths. ``template``: the candidate to build it from instead (the space's
    ``merger_template``: models whose vocabularies differ), whose tokenizer it then is."""
    with _LOCK:
        key = (tuple(_fingerprint(p) for p in paths), device, dtype, candidates,
               None if template is None else template.to_yaml())
        if key not in _RESIDENT:
            _RESIDENT.clear()  # free the old sources before loading new ones
            log.info("loading %d source models onto %s", len(paths), device)
            merger = CANDIDATE_TYPES[candidates].executor(template or list(paths), device=device, dtype=dtype)
            _RESIDENT[key] = (merger, getattr(merger, "tokenizer", None) or load_tokenizer(paths[0]))
        else:
            log.info("source models already resident")
        yield _RESIDENT[key]


def release() -> None:
    """Drop the resident sources (tests; a host that wants its memory back)."""
    with _LOCK:
        _RESIDENT.clear()
