"""Atomic file writes: the one place that knows how a reader never sees a half-written file.

    atomic_write_text(run / "summary.txt", "ok\n")
    atomic_write_json(run / "summary.json", {"tokens": 8192})
    with atomic_path(out / "singular_values.safetensors") as tmp:     # for writers that want a path
        save_file(tensors, str(tmp))
    with atomic_dir(run / "checkpoints" / "tok-000000008192") as tmp:   # fill tmp; renamed on success
        model.save_pretrained(tmp)

Every writer writes a temp file (or directory) beside the target, then renames it: on POSIX a rename within one
filesystem is atomic, so a crash leaves either the old content or the new one, plus at worst a stray temp file.
The one writer that does not come here is a training run's resumable state (train/loop.py ``save_state``):
every process of the run writes its own files into state.tmp, and the main process renames it between two
barriers, which no single-process helper can do (train/runlog.promote_state recovers a kill inside the swap).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a fresh temp file beside `path` (a unique name: parallel writers of one target do not collide); when
    the block ends without error it is renamed over `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; a result file must be readable as a plain open() would leave it (other users
        # of a shared study directory, e.g. Ray workers under another account)
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temp file in the same directory and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temp file in the same directory and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent))


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh temp directory beside `path`; on success it replaces `path` (an old one is removed first)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
