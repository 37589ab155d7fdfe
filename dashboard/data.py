"""The dashboard's one way to the lake: a cached, sandboxed DuckDB connection and cached query results.

- ``catalog.connect(lake)`` (the project's read-only catalog: views + sandbox) is opened once per process
  and lake state (``st.cache_resource``). It is re-opened only when a table gets its first file, because
  a table without files is an empty view until then; new files of a table that already has some are
  picked up by the view's glob on every query.
- DuckDB 2.0: an open result owns its connection, and Streamlit runs every session (and every fragment
  rerun) in its own thread. Each query therefore runs on its own ``cursor()`` of the shared connection,
  closed when the result has been read (a cursor costs ~50 µs; the views and sandbox settings are shared).
- Results are pandas DataFrames cached with ``st.cache_data(ttl=…)`` keyed by lake, SQL and parameters, so
  several open browsers and a fragment rerunning every few seconds cost one query per TTL.
- Every DuckDB error becomes ``LakeProblem`` with a message for the operator (which file is corrupt and what
  to do, an empty lake, …); pages show it with ``ui.problem`` and never a traceback.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import streamlit as st

from adaptwin.cliutil import UserError
from adaptwin.ingest import catalog, lake, maintenance
from adaptwin.dashboard.settings import cache_ttl_s

log = logging.getLogger(__name__)

TTL_S = cache_ttl_s()
QUERY_TIMEOUT_S = 30.0  # a Query-page statement is interrupted after this long


class LakeProblem(Exception):
    """Something about the lake that a page cannot show data for; ``str()`` is the operator's message."""

    def __init__(self, message: str, hint: str = "", files: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.hint = hint
        self.files = tuple(files)


def present_tables(root: Path) -> tuple[str, ...]:
    """Tables that have at least one published file (stops at the first file found per table)."""
    out = []
    for name in lake.TABLES:
        if next((root / name).glob("run_id=*/date=*/*.parquet"), None) is not None:
            out.append(name)
    return tuple(out)


@st.cache_resource(max_entries=8, show_spinner=False)
def _connection(root: str, present: tuple[str, ...]) -> duckdb.DuckDBPyConnection:
    del present  # part of the cache key only: a table's first file needs a fresh view
    return catalog.connect(root)


def corrupt_files(root: Path) -> list[str]:
    """Published lake files whose Parquet footer cannot be read (checked only after a query failed)."""
    bad = []
    for name in lake.TABLES:
        for f in sorted((root / name).glob("run_id=*/date=*/*.parquet")):
            try:
                pq.read_metadata(f)
            except Exception:  # noqa: BLE001 -- any failure to read the footer means the file is unusable
                bad.append(str(f))
    return bad


def _explain(root: Path, err: Exception) -> LakeProblem:
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, (duckdb.InvalidInputException, duckdb.IOException)) and (
            "Parquet" in text or "magic bytes" in text or "No files found" in text):
        bad = corrupt_files(root)
        if bad:
            log.warning("corrupt lake file(s) %s: %s", bad, text)
            return LakeProblem(
                f"{len(bad)} lake file{'s are' if len(bad) > 1 else ' is'} not valid Parquet, so DuckDB cannot "
                "read the lake:",
                hint="Move the file(s) out of the lake, or rename them to end in `.bad` (the views read only "
                     "`*.parquet`). The sink publishes files atomically, so a torn file was written by "
                     "something else or damaged on disk; if the rows matter, reset the sink group's offsets "
                     "to the file's range (its name is p<partition>-<first>-<last>.parquet) and let it rewrite them.",
                files=bad)
        if "No files found" in text:
            return LakeProblem("lake files disappeared while the dashboard read them (compaction or cleanup?)",
                               hint="Reload the page.")
    return LakeProblem(f"DuckDB could not run a dashboard query: {text}",
                       hint=f"Check the lake at {root} with `adaptwin query` and the dashboard log.")


@dataclass(frozen=True)
class Result:
    frame: pd.DataFrame
    seconds: float
    truncated: bool = False
    notes: tuple[str, ...] = field(default=())


def _cursor(root: Path) -> duckdb.DuckDBPyConnection:
    try:
        return _connection(str(root), present_tables(root)).cursor()
    except duckdb.Error as err:
        raise _explain(root, err) from None


@st.cache_data(ttl=TTL_S, max_entries=512, show_spinner=False)
def _cached(root: str, sql: str, params: tuple) -> Result:
    t0 = time.perf_counter()
    cur = _cursor(Path(root))
    try:
        with maintenance.reader_lock(Path(root)):  # a compaction's file swap waits for the query (docs/e2e.md)
            frame = cur.execute(sql, list(params)).df()
    except duckdb.Error as err:
        raise _explain(Path(root), err) from None
    finally:
        cur.close()
    return Result(frame, time.perf_counter() - t0)


def frame(root: Path, sql: str, params: Sequence[Any] = ()) -> pd.DataFrame:
    """Rows of a dashboard query (cached for TTL_S seconds); LakeProblem if the lake cannot answer."""
    return _cached(str(root), sql, tuple(_hashable(p) for p in params)).frame


def scalar(root: Path, sql: str, params: Sequence[Any] = ()) -> Any:
    df = frame(root, sql, params)
    return None if df.empty else df.iat[0, 0]


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


@st.cache_data(ttl=TTL_S, max_entries=64, show_spinner=False)
def user_query(root: str, sql: str, max_rows: int) -> Result:
    """A Query-page statement: refused unless read-only (``catalog.check_read_only``, the project's one
    guard), run on the sandboxed connection, at most ``max_rows`` rows kept, interrupted after
    QUERY_TIMEOUT_S. Raises ``catalog.QueryRefused`` / ``UserError`` / ``LakeProblem``."""
    catalog.check_read_only(sql)
    last = duckdb.extract_statements(sql)[-1]  # every statement is read-only; the last one's rows are shown
    t0 = time.perf_counter()
    cur = _cursor(Path(root))
    timer = threading.Timer(QUERY_TIMEOUT_S, cur.interrupt)
    timer.start()
    try:
        with maintenance.reader_lock(Path(root)):
            reader = cur.sql(last.query).to_arrow_reader(batch_size=min(max_rows + 1, 100_000))
            batches, rows = [], 0
            for batch in reader:
                batches.append(batch)
                rows += batch.num_rows
                if rows > max_rows:
                    break
        table = pa.Table.from_batches(batches, schema=reader.schema) if batches else reader.schema.empty_table()
        truncated = table.num_rows > max_rows
        table = table.slice(0, max_rows)
    except duckdb.PermissionException as err:
        raise catalog.QueryRefused(f"refused: {str(err).splitlines()[0]}. Only files inside the lake ({root}) "
                                   "can be read.") from None
    except duckdb.InterruptException:
        raise LakeProblem(f"the query ran longer than {QUERY_TIMEOUT_S:g} s and was stopped",
                          hint="Aggregate more (GROUP BY), filter by run_id, or add a LIMIT.") from None
    except duckdb.Error as err:
        if isinstance(err, (duckdb.InvalidInputException, duckdb.IOException)) and "arquet" in str(err):
            raise _explain(Path(root), err) from None
        raise UserError(f"query failed: {str(err).strip()}") from None
    finally:
        timer.cancel()
        cur.close()
    return Result(table.to_pandas(), time.perf_counter() - t0, truncated)
