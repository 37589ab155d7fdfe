"""The Parquet lake: where each topic's rows live and how files are published atomically.

Layout (DESIGN.md): ``<lake>/<table>/run_id=<run>/date=<YYYY-MM-DD>/p<partition>-<first>-<last>.parquet``,
where ``table`` is the topic name without the ``adaptwin.`` prefix and ``first``/``last`` are the Kafka
offsets the file covers. Files are written as ``*.parquet.tmp`` (a name DuckDB's glob does not match)
and renamed into place, so a reader never sees half a file. Because every file name carries its offset
range, the lake itself says how far each partition has been stored, which makes the sink exactly-once.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from adaptwin import schemas
from adaptwin.config import TOPICS
from adaptwin.durable import fsync_dir

# table name -> (topic, schema); the DuckDB views carry the same names.
TABLES: dict[str, tuple[str, pa.Schema]] = {
    "requests": (TOPICS.requests, schemas.REQUEST),
    "telemetry": (TOPICS.telemetry, schemas.TELEMETRY),
    "windows": (TOPICS.windows, schemas.WINDOW),
    "recommendations": (TOPICS.recommendations, schemas.RECOMMENDATION),
    "deadletter": (TOPICS.deadletter, schemas.DEADLETTER),
}
TABLE_OF_TOPIC = {topic: table for table, (topic, _) in TABLES.items()}

_FILE = re.compile(r"^p(\d+)-(\d+)-(\d+)\.parquet$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class LakeFile:
    path: Path
    partition: int
    first_offset: int
    last_offset: int


def safe_run_id(run_id: str | None) -> str:
    """A run id as a directory name: anything outside [A-Za-z0-9._-] becomes '_'."""
    return _UNSAFE.sub("_", run_id or "unknown")[:120] or "unknown"


def file_path(root: Path, table: str, run_id: str, date: dt.date, partition: int, first: int, last: int) -> Path:
    return (root / table / f"run_id={safe_run_id(run_id)}" / f"date={date.isoformat()}"
            / f"p{partition:03d}-{first:012d}-{last:012d}.parquet")


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` so that the file appears whole or not at all (fsync, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)  # make the rename itself durable before the offset commit that follows


def files(root: Path, table: str, partition: int | None = None) -> list[LakeFile]:
    """Every published file of ``table`` (optionally of one Kafka partition)."""
    pattern = f"p{partition:03d}-*.parquet" if partition is not None else "p*.parquet"
    out = []
    for path in (root / table).glob(f"run_id=*/date=*/{pattern}"):
        m = _FILE.match(path.name)
        if m:
            out.append(LakeFile(path, int(m[1]), int(m[2]), int(m[3])))
    return out


def drop_uncommitted(root: Path, table: str, partition: int, committed: int) -> list[Path]:
    """Delete files of ``partition`` at or past the committed offset, and leftover temp files.

    Such files were renamed into place but the sink died before committing their offsets: the records
    will be delivered again and rewritten, so removing them first is what keeps the lake exactly-once
    even if the re-delivered batch is cut at different offsets.
    """
    removed = []
    for f in files(root, table, partition):
        if f.first_offset >= committed:
            f.path.unlink(missing_ok=True)
            removed.append(f.path)
    for tmp in (root / table).glob(f"run_id=*/date=*/p{partition:03d}-*.parquet.tmp"):
        tmp.unlink(missing_ok=True)
    return removed
