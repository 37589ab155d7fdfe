"""DuckDB over the lake: one view per table, read-only.

``connect(lake)`` returns an in-memory DuckDB connection with the views ``requests``, ``telemetry``,
``windows``, ``recommendations`` and ``deadletter`` (empty, with the right columns, when the lake has no
file for them yet). After the views exist the connection is sandboxed: DuckDB may read files only inside
the lake and no statement may change the configuration, so a query can neither read ``/etc/passwd``
nor write a file. ``query`` additionally accepts only SELECT-like statements.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from adaptwin.cliutil import UserError
from adaptwin.ingest import lake, maintenance

READ_ONLY_TYPES = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


class QueryRefused(UserError):
    """A statement that would write, attach, install, copy or read outside the lake."""


def _empty_view(con: duckdb.DuckDBPyConnection, name: str, schema: pa.Schema) -> None:
    empty = schema.empty_table().append_column("date", pa.array([], pa.date32()))
    con.from_arrow(empty).create_view(name)


def connect(root: Path | str) -> duckdb.DuckDBPyConnection:
    root = Path(root).resolve()
    con = duckdb.connect(config={"threads": 2})
    for name, (_, schema) in lake.TABLES.items():
        files = lake.files(root, name)
        if files:
            glob = (root / name / "run_id=*" / "date=*" / "*.parquet").as_posix().replace("'", "''")
            source = (f"read_parquet('{glob}', hive_partitioning=true, "
                      f"hive_types={{'run_id': VARCHAR, 'date': DATE}}")
            # an interrupted compaction leaves inputs beside the merged file that covers them: skip them
            # (maintenance.covered), or their rows would count twice; the normal lake has none
            skip = [f.path.as_posix().replace("'", "''") for f in maintenance.covered(files)]
            if skip:
                listed = ", ".join(f"'{p}'" for p in skip)
                con.execute(f"CREATE VIEW {name} AS SELECT * EXCLUDE (filename) FROM {source}, filename=true) "
                            f"WHERE filename NOT IN ({listed})")
            else:
                con.execute(f"CREATE VIEW {name} AS SELECT * FROM {source})")
        else:
            _empty_view(con, name, schema)
    lake_dir = root.as_posix().rstrip("/").replace("'", "''") + "/"
    con.execute(f"SET allowed_directories=['{lake_dir}']")
    con.execute("SET enable_external_access=false")
    con.execute("SET lock_configuration=true")
    return con


def check_read_only(sql: str) -> None:
    """Raise QueryRefused unless every statement in ``sql`` only reads."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as err:
        raise UserError(f"SQL does not parse: {err}") from None
    if not statements:
        raise UserError("empty query")
    for st in statements:
        if st.type not in READ_ONLY_TYPES:
            kind = st.type.name if hasattr(st.type, "name") else str(st.type)
            raise QueryRefused(f"refused: {kind} statements are not allowed, the lake is queried read-only "
                               f"(SELECT, WITH … SELECT and EXPLAIN only)")


def query(root: Path | str, sql: str) -> pa.Table:
    """Run a read-only query over the lake and return the result as an Arrow table."""
    check_read_only(sql)
    # shared with other readers; a compaction swapping files waits, so no query sees a swap half-done
    with maintenance.reader_lock(Path(root)):
        con = connect(root)
        try:
            last = duckdb.extract_statements(sql)[-1]  # all are read-only; only the last one's rows are shown
            return con.sql(last.query).to_arrow_table()
        except duckdb.PermissionException as err:
            raise QueryRefused(f"refused: {err}. Only files inside the lake ({root}) can be read.") from None
        except duckdb.Error as err:
            raise UserError(f"query failed: {err}") from None
        finally:
            con.close()
