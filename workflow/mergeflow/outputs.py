"""Output directories written whole or not at all.

Every stage that writes a model directory writes it into a staging directory beside the target
and renames it into place only once it is complete: a failed or killed job leaves the target as
it was (an earlier good merge stays), never a half-written model.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from mergeflow.errors import OutputError


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def check_output_dir(out: str | Path, *, force: bool = False, protected: Iterable[str | Path] = ()) -> Path:
    """``out`` resolved, once it is known that writing it destroys nothing it should not.

    Refuses a directory that is, holds or lies inside one of ``protected`` (the models a merge
    reads), always; refuses an existing non-empty directory or a file unless ``force``.
    """
    out = Path(out)
    target = out.resolve()
    for source in protected:
        resolved = Path(source).resolve()
        if _inside(resolved, target) or _inside(target, resolved):
            what = "is" if resolved == target else "holds" if _inside(resolved, target) else "is inside"
            raise OutputError(f"output directory {str(out)!r} {what} the source model {str(source)!r}; "
                              "a merge never writes into a model it reads: choose another directory")
    if not force:
        if out.is_dir() and any(out.iterdir()):
            raise OutputError(f"output directory {str(out)!r} is not empty; choose an empty or new "
                              "directory, or pass --force to replace it whole")
        if out.exists() and not out.is_dir():
            raise OutputError(f"output {str(out)!r} exists and is not a directory; pass --force to replace it")
    return target


def remove_abandoned_stages(out: Path) -> list[Path]:
    """Remove staging directories of ``out`` left by killed writers: those of this host whose
    process no longer exists (a killed 7B merge would otherwise leave its gigabytes behind)."""
    host = socket.gethostname()
    removed = []
    for stage in out.parent.glob(f".{out.name}.partial-*"):
        rest = stage.name[len(f".{out.name}.partial-"):]
        owner, _, pid = rest.rpartition("-")[0].rpartition("-")
        if owner != host or not pid.isdigit() or process_alive(int(pid)):
            continue
        shutil.rmtree(stage, ignore_errors=True)
        removed.append(stage)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _no_space(out: Path, needed: int | None, free: int) -> str:
    what = f"it needs {needed:,} bytes and " if needed is not None else ""
    return (f"no space left on the device for {str(out)!r}: {what}{free:,} bytes were free in "
            f"{str(out.parent)!r}; free some space or write it elsewhere")


@contextmanager
def staged_dir(out: str | Path, *, force: bool = False, protected: Iterable[str | Path] = (),
               needed: int | None = None) -> Iterator[Path]:
    """Yield a fresh staging directory beside ``out``; on success it replaces ``out`` whole.

    On any error the staging directory is removed and ``out`` is left untouched. See
    :func:`check_output_dir` for what is refused. ``needed``, the bytes the writer will write where
    it knows them, is checked against the free space first; a disk that fills anyway is named
    with ``out`` and those bytes, not left to a traceback.
    """
    out = Path(out)
    check_output_dir(out, force=force, protected=protected)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned_stages(out)
    free = shutil.disk_usage(out.parent).free
    if needed is not None and needed > free:
        raise OutputError(_no_space(out, needed, free))
    stage = out.parent / f".{out.name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
    except BaseException as err:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise OutputError(_no_space(out, needed, free)) from err
        raise
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(out, old)
        os.replace(stage, out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        os.replace(stage, out)


def save_model(model, tokenizer, out: str | Path, records: dict[str, dict] | None = None) -> None:
    """Write an HF model directory (weights as safetensors, the tokenizer, and each of ``records``
    as a JSON file by name, e.g. ``zoo.json``) whole or not at all (:func:`staged_dir`)."""
    with staged_dir(out) as stage:
        model.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        for name, record in (records or {}).items():
            (stage / name).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
