"""Lake maintenance while the sink runs: compaction of small files and retention of old date partitions.

Compaction (``adaptwin lake compact``). The sink publishes a file per batch (every couple of seconds), so
a long run leaves thousands of small files per partition. Compaction merges, per directory
(``<table>/run_id=/date=``) and Kafka partition, consecutive files into one named after the merged offset
range (``p<part>-<first>-<last>.parquet``). It is safe beside a running sink because it only touches files
whose *last* offset is below the sink group's committed offset for that partition:

- the sink never writes those offsets again, and its restart clean-up (``lake.drop_uncommitted``) only
  deletes files whose *first* offset is at or past the committed offset, so a merged file (whose first
  offset is below it) is never dropped and never rewritten: the exactly-once reasoning still holds;
- the merged file is written under a hidden temporary name, fsynced, renamed into place, and only then are
  the inputs removed. A crash between the rename and the last removal leaves inputs whose range is
  *covered* by the merged file. Readers ignore covered files (``covered`` below, used by
  ``catalog.connect``), and the next compaction deletes them, so no reader ever counts a row twice;
- the rename-then-remove step holds ``reader_lock`` exclusively, and ``catalog.query`` holds it shared
  for the duration of a query, so a query never globs the directory half-way through a swap.

Retention (``adaptwin lake retention --older-than DAYS``) deletes ``date=`` partitions older than the
limit (UTC), under the same lock. The sink only ever writes today's partition, so retention never races
with it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from adaptwin.cliutil import UserError
from adaptwin.durable import fsync_dir, lock_exclusive
from adaptwin.ingest import lake

log = logging.getLogger(__name__)

READER_LOCK = ".readers.lock"  # shared by queries, exclusive while files are swapped or deleted
MAINTENANCE_LOCK = ".maintenance.lock"  # one compaction / retention at a time per lake
_TMP_SUFFIX = ".compact.tmp"  # hidden names ('.p…'): neither DuckDB's glob nor the sink's clean-up match them


@dataclass(frozen=True)
class CompactConfig:
    lake: Path
    bootstrap: str
    # the sink group whose committed offsets bound what may be merged; None: the lake's owner (the sink's
    # _sink.json), else adaptwin-sink
    group_id: str | None = None
    tables: tuple[str, ...] = tuple(lake.TABLES)
    max_rows: int = 2_000_000  # rows per merged file (bounds the memory one merge needs)
    min_files: int = 2  # merge a run of at least this many files


@dataclass
class CompactReport:
    files_before: int = 0
    files_after: int = 0
    merged_files: int = 0  # inputs replaced by merged files
    written_files: int = 0  # merged files written
    rows_merged: int = 0
    covered_removed: int = 0  # leftovers of an interrupted compaction, deleted
    skipped_uncommitted: int = 0  # files at or past the sink's committed offset, left alone
    wall_s: float = 0.0
    per_table: dict[str, int] = field(default_factory=dict)  # files written per table


@dataclass
class RetentionReport:
    cutoff: str = ""
    partitions_removed: int = 0
    files_removed: int = 0
    bytes_removed: int = 0
    removed: list[str] = field(default_factory=list)  # "<table>/run_id=…/date=…"


class _WrongCluster(Exception):
    pass


# -- locks ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def reader_lock(root: Path, exclusive: bool = False) -> Iterator[None]:
    """flock on ``<lake>/.readers.lock``: shared for a query, exclusive for a swap of files.

    A lake the caller cannot write (a read-only mount) has no lock file to take: readers then go on
    without it, as nothing on such a lake can be compacting either.
    """
    path = Path(root) / READER_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)  # flock works on a read-only descriptor too
        except OSError:
            if exclusive:
                raise
            yield
            return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _maintenance_lock(root: Path) -> Iterator[None]:
    if not root.is_dir():
        raise UserError(f"no lake at {root}; pass --lake (or set $ADAPTWIN_LAKE) to the sink's lake directory")
    fd = lock_exclusive(root / MAINTENANCE_LOCK, f"another `adaptwin lake compact` or `lake retention` is running "
                                                 f"on {root}; wait for it to finish")
    try:
        yield
    finally:
        os.close(fd)


# -- which files count --------------------------------------------------------------------------------
def covered(files: Iterable[lake.LakeFile]) -> list[lake.LakeFile]:
    """Files whose offset range lies inside another file's range of the same directory and partition.

    Only an interrupted compaction leaves such files (its inputs beside the merged file); readers must
    skip them, or they would count those rows twice.
    """
    groups: dict[tuple[Path, int], list[lake.LakeFile]] = defaultdict(list)
    for f in files:
        groups[(f.path.parent, f.partition)].append(f)
    out = []
    for group in groups.values():
        if len(group) < 2:
            continue
        # ranges never partly overlap (the sink cuts disjoint batches, merges take whole files), so after
        # sorting by (first, -last) a file is covered iff an earlier one reaches at least as far
        group.sort(key=lambda f: (f.first_offset, -f.last_offset))
        reach = -1
        for f in group:
            if f.last_offset <= reach:
                out.append(f)
            else:
                reach = f.last_offset
    return out


def lake_owner(root: Path) -> dict | None:
    """The (Kafka cluster, sink group) the sink bound the lake to (``sink.LAKE_OWNER``), None before any sink ran."""
    from adaptwin.ingest.sink import LAKE_OWNER

    try:
        return json.loads((root / LAKE_OWNER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {root / LAKE_OWNER} ({err}); it says which Kafka cluster and sink group own "
                        f"this lake, and compaction needs that group's offsets") from None


def _resolve_group(root: Path, group_id: str | None) -> tuple[str, str | None]:
    """(group, expected cluster id): the lake owner's, checked against an explicit ``group_id``."""
    owner = lake_owner(root)
    if owner is None:
        return group_id or "adaptwin-sink", None
    if group_id is not None and group_id != owner.get("group_id"):
        raise UserError(f"the lake {root} is written by sink group {owner.get('group_id')!r}, not {group_id!r}: only "
                        f"its committed offsets say which files are final; drop --group or pass that one")
    return owner.get("group_id") or "adaptwin-sink", owner.get("cluster_id")


def committed_offsets(bootstrap: str, group_id: str, timeout_s: float = 5.0,
                      cluster_id: str | None = None) -> dict[tuple[str, int], int]:
    """The sink group's committed offset (next offset to read) per (topic, partition); {} if it has none.

    With ``cluster_id`` (the lake owner's), a broker of another cluster is refused: its offsets would not
    describe the lake's files.
    """
    from kafka import errors as kerrors

    from adaptwin.kafka import admin_client

    # on a fresh broker the group coordinator (the __consumer_offsets topic) appears only on first use
    retriable = (kerrors.CoordinatorNotAvailableError, kerrors.CoordinatorLoadInProgressError,
                 kerrors.NotCoordinatorError)
    try:
        with admin_client(bootstrap, timeout_s) as admin:
            if cluster_id is not None:
                found = admin.describe_cluster().get("cluster_id")
                if found != cluster_id:
                    raise _WrongCluster(f"the lake was written from Kafka cluster {cluster_id}, but {bootstrap} is "
                                        f"cluster {found}: its offsets do not describe the lake's files; point "
                                        f"--bootstrap at the sink's broker")
            deadline = time.monotonic() + 3 * timeout_s
            while True:
                try:
                    offsets = admin.list_group_offsets(group_id).get(group_id, {})
                    break
                except kerrors.GroupIdNotFoundError:
                    offsets = {}
                    break
                except retriable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
    except _WrongCluster as err:
        raise UserError(str(err)) from None
    except UserError as err:
        raise UserError(f"compaction merges only files the sink has committed and cannot read the committed "
                        f"offsets of group {group_id!r}: {err}") from None
    except Exception as err:  # noqa: BLE001 -- any failure to ask the broker: nothing is known to be committed
        raise UserError(f"cannot read the committed offsets of sink group {group_id!r} from {bootstrap} ({err}); "
                        f"compaction merges only files the sink has committed, so it needs the broker: "
                        f"start it or pass --bootstrap") from None
    return {(tp.topic, tp.partition): om.offset for tp, om in offsets.items() if om.offset is not None
            and om.offset >= 0}


# -- compaction ---------------------------------------------------------------------------------------
def compact(config: CompactConfig, committed: Mapping[tuple[str, int], int] | None = None) -> CompactReport:
    """Merge the committed small files of every table; ``committed`` defaults to the sink group's offsets."""
    t0 = time.perf_counter()
    root = Path(config.lake)
    unknown = [t for t in config.tables if t not in lake.TABLES]
    if unknown:
        raise UserError(f"unknown lake table(s) {unknown}; known: {list(lake.TABLES)}")
    report = CompactReport()
    with _maintenance_lock(root):
        if committed is None:
            group, cluster = _resolve_group(root, config.group_id)
            committed = committed_offsets(config.bootstrap, group, cluster_id=cluster)
        for table in config.tables:
            report.per_table[table] = _compact_table(root, table, committed, config, report)
    report.files_after = report.files_before - report.covered_removed - report.merged_files + report.written_files
    report.wall_s = time.perf_counter() - t0
    return report


def _compact_table(root: Path, table: str, committed: Mapping[tuple[str, int], int], config: CompactConfig,
                   report: CompactReport) -> int:
    topic = lake.TABLES[table][0]
    for tmp in (root / table).glob(f"run_id=*/date=*/.p*{_TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)  # a merge that died before its rename: the inputs are all still there
    files = lake.files(root, table)
    report.files_before += len(files)
    leftovers = covered(files)
    if leftovers:
        with reader_lock(root, exclusive=True):
            for f in leftovers:
                f.path.unlink(missing_ok=True)
        log.warning("removed %d file(s) of %s left by an interrupted compaction (covered by a merged file)",
                    len(leftovers), table)
        report.covered_removed += len(leftovers)
        gone = {f.path for f in leftovers}
        files = [f for f in files if f.path not in gone]
    groups: dict[tuple[Path, int], list[lake.LakeFile]] = defaultdict(list)
    for f in files:
        groups[(f.path.parent, f.partition)].append(f)
    written = 0
    for (_, partition), group in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        group.sort(key=lambda f: f.first_offset)
        limit = committed.get((topic, partition), 0)
        done = [f for f in group if f.last_offset < limit]
        report.skipped_uncommitted += len(group) - len(done)
        for chunk in _chunks(done, config.max_rows):
            if len(chunk) >= config.min_files:
                report.rows_merged += _merge(root, chunk)
                report.merged_files += len(chunk)
                written += 1
    report.written_files += written
    return written


def _chunks(files: list[lake.LakeFile], max_rows: int) -> Iterator[list[lake.LakeFile]]:
    """Consecutive runs of files with at most ``max_rows`` rows together (a file that big stays alone)."""
    chunk: list[lake.LakeFile] = []
    rows = 0
    for f in files:
        n = pq.read_metadata(f.path).num_rows
        if chunk and rows + n > max_rows:
            yield chunk
            chunk, rows = [], 0
        chunk.append(f)
        rows += n
    if chunk:
        yield chunk


def _merge(root: Path, chunk: list[lake.LakeFile]) -> int:
    """Write ``chunk`` as one file named after its offset range, then remove the inputs (see module doc)."""
    directory = chunk[0].path.parent
    first, last = chunk[0].first_offset, chunk[-1].last_offset
    target = directory / f"p{chunk[0].partition:03d}-{first:012d}-{last:012d}.parquet"
    # rows in offset order, as the sink wrote them; every file of a table has exactly its schema
    table = pa.concat_tables([pq.ParquetFile(f.path).read() for f in chunk])
    tmp = directory / f".{target.name}{_TMP_SUFFIX}"
    pq.write_table(table, tmp, compression="zstd")
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    with reader_lock(root, exclusive=True):
        os.replace(tmp, target)
        fsync_dir(directory)  # the merged file is durable before any input goes
        for f in chunk:
            f.path.unlink(missing_ok=True)
        fsync_dir(directory)
    return table.num_rows


# -- retention ----------------------------------------------------------------------------------------
def retention(root: Path, older_than_days: int, tables: Iterable[str] = tuple(lake.TABLES),
              today: dt.date | None = None, dry_run: bool = False) -> RetentionReport:
    """Delete every ``date=`` partition strictly older than ``today - older_than_days`` (UTC)."""
    if older_than_days < 0:
        raise UserError(f"--older-than must be 0 or more days, got {older_than_days}")
    root = Path(root)
    today = today or dt.datetime.now(dt.timezone.utc).date()
    cutoff = today - dt.timedelta(days=older_than_days)
    report = RetentionReport(cutoff=cutoff.isoformat())
    with _maintenance_lock(root):
        for table in tables:
            if table not in lake.TABLES:
                raise UserError(f"unknown lake table {table!r}; known: {list(lake.TABLES)}")
            for date_dir in sorted((root / table).glob("run_id=*/date=*")):
                try:
                    date = dt.date.fromisoformat(date_dir.name.removeprefix("date="))
                except ValueError:
                    log.warning("skipping %s: not a date partition", date_dir)
                    continue
                if date >= cutoff:
                    continue
                parquet = [p for p in date_dir.iterdir() if p.is_file()]
                report.files_removed += sum(1 for p in parquet if p.suffix == ".parquet")
                report.bytes_removed += sum(p.stat().st_size for p in parquet)
                report.partitions_removed += 1
                report.removed.append(date_dir.relative_to(root).as_posix())
                if dry_run:
                    continue
                with reader_lock(root, exclusive=True):
                    shutil.rmtree(date_dir)
                with contextlib.suppress(OSError):  # not empty: another date, or the sink just made one
                    date_dir.parent.rmdir()
    return report
