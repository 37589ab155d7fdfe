"""Files that survive a crash whole, and locks that die with their process (the lake, the sink, compaction, the
learner's checkpoints all use these)."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from adaptwin.cliutil import UserError

__all__ = ["fsync_dir", "lock_exclusive", "write_bytes_atomic"]


def fsync_dir(directory: Path) -> None:
    """Make the renames inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that a reader finds the old file or the new one, never half of one (``path.tmp``, fsync,
    rename). Call :func:`fsync_dir` afterwards for the rename itself to survive a power loss."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def lock_exclusive(path: Path, busy: str) -> int:
    """An exclusive ``flock`` on ``path`` (created if missing), held until the returned descriptor is closed or the
    process dies; ``UserError(busy)`` when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(busy) from None
    return fd
