"""DuckDB views over a real Parquet lake, and the read-only guard."""

import datetime as dt

import pyarrow as pa
import pytest

from adaptwin import schemas
from adaptwin.cliutil import UserError
from adaptwin.ingest import catalog, lake


def _requests(n, run_id="run-a", adapter_mod=3):
    return schemas.to_table([
        {"v": 1, "request_id": f"{run_id}-{i}", "run_id": run_id, "ts": float(i), "adapter_id": f"lora-{i % adapter_mod}",
         "adapter_rank": 8, "prompt_tokens": 10 + i, "output_tokens": 5, "source": f"t:{i + 2}"} for i in range(n)],
        schemas.REQUEST)


def test_empty_lake_has_every_view(tmp_path):
    for name in lake.TABLES:
        out = catalog.query(tmp_path, f"select count(*) as n from {name}")
        assert out.to_pylist() == [{"n": 0}]
    cols = catalog.query(tmp_path, "select * from telemetry").schema.names
    assert cols == schemas.TELEMETRY.names + ["date"]


def test_views_read_published_files_only(tmp_path):
    today = dt.date(2026, 11, 26)
    lake.write_atomic(_requests(30), lake.file_path(tmp_path, "requests", "run-a", today, 0, 0, 9))
    lake.write_atomic(_requests(12, "run-b"), lake.file_path(tmp_path, "requests", "run-b", today, 1, 0, 3))
    # a half-written file under the temp name must not be read
    (tmp_path / "requests" / "run_id=run-a" / "date=2026-11-26" / "p000-000000000010-000000000019.parquet.tmp").write_bytes(b"PAR1junk")
    rows = catalog.query(tmp_path, "select run_id, count(*) n, sum(prompt_tokens) p from requests group by 1 order by 1")
    assert rows.to_pylist() == [{"run_id": "run-a", "n": 30, "p": sum(10 + i for i in range(30))},
                                {"run_id": "run-b", "n": 12, "p": sum(10 + i for i in range(12))}]
    assert catalog.query(tmp_path, "select distinct date from requests").to_pylist() == [{"date": today}]


@pytest.mark.parametrize("sql", [
    "COPY (select 1) TO '/tmp/adaptwin-x.csv'",
    "ATTACH '/tmp/adaptwin-x.duckdb'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CREATE TABLE t AS SELECT 1",
    "DELETE FROM requests",
    "DROP VIEW requests",
    "SET enable_external_access = true",
    "select 1; create table t(a int)",
    "select * from read_csv('/etc/passwd')",
    "select * from read_text('/etc/hostname')",
    "select * from glob('/etc/*')",
    "select * from read_parquet('/tmp/**/*.parquet')",
])
def test_writes_and_outside_files_are_refused(tmp_path, sql):
    with pytest.raises(catalog.QueryRefused, match="refused"):
        catalog.query(tmp_path, sql)


def test_syntax_error_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="parse|failed"):
        catalog.query(tmp_path, "selec 1")


def test_schema_columns_types_survive(tmp_path):
    lake.write_atomic(_requests(3), lake.file_path(tmp_path, "requests", "r", dt.date.today(), 0, 0, 0))
    t = catalog.query(tmp_path, "select * from requests")
    for f in schemas.REQUEST:
        assert t.schema.field(f.name).type == f.type or (pa.types.is_integer(f.type) and pa.types.is_integer(t.schema.field(f.name).type))


def test_query_cli_formats(tmp_path):
    import csv
    import io
    import json
    import subprocess
    import sys

    lake.write_atomic(_requests(5), lake.file_path(tmp_path, "requests", "run-a", dt.date.today(), 0, 0, 4))
    sql = "select adapter_id, count(*) as n from requests group by 1 order by 1"

    def run(*fmt):
        out = subprocess.run([sys.executable, "-m", "adaptwin", "query", sql, "--lake", str(tmp_path), *fmt],
                             capture_output=True, text=True, check=True)
        return out.stdout

    assert [json.loads(line) for line in run("--format", "json").splitlines()] == [
        {"adapter_id": "lora-0", "n": 2}, {"adapter_id": "lora-1", "n": 2}, {"adapter_id": "lora-2", "n": 1}]
    rows = list(csv.DictReader(io.StringIO(run("--format", "csv"))))
    assert [(r["adapter_id"], int(r["n"])) for r in rows] == [("lora-0", 2), ("lora-1", 2), ("lora-2", 1)]
    table = run()
    assert table.splitlines()[0].split() == ["adapter_id", "n"] and "(3 rows)" in table
