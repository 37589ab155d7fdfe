"""The Query page (results, CSV, chart, refusals), the app's navigation and the ``adaptwin dashboard`` CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import streamlit as st

from adaptwin.ingest import catalog


@pytest.fixture(autouse=True)
def _fresh_caches():
    st.cache_data.clear()
    st.cache_resource.clear()
    yield


def _submit(at, sql: str):
    at.text_area(key="query_sql").input(sql)
    at.button[0].click()  # the form's Run button
    return at.run()


def test_query_runs_example_with_table_chart_and_csv(page_app, sample_lake):
    lake, _ = sample_lake
    at = page_app("page_query", lake).run()
    at.selectbox(key="query_example").select("Throughput per run and configuration").run()
    sql = at.text_area(key="query_sql").value
    assert "FROM windows" in sql
    at = _submit(at, sql)
    assert not at.exception and not at.error
    shown = at.dataframe[0].value
    expect = catalog.query(lake, sql).to_pandas()
    assert shown.to_dict("records") == expect.to_dict("records")
    assert at.caption[-1].value.startswith(f"{len(expect)} rows") or any(
        c.value.startswith(f"{len(expect)} rows") for c in at.caption)
    assert at.selectbox(key="query_x").value == "run_id"  # the chart's controls are there
    assert at.get("download_button"), "CSV download offered"


@pytest.mark.parametrize("sql", [
    "COPY (SELECT 1) TO '/tmp/adaptwin-dash-copy.csv'",
    "ATTACH '/tmp/adaptwin-dash.duckdb' AS x",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CREATE TABLE t AS SELECT 1",
    "CREATE VIEW telemetry AS SELECT 1",
    "DELETE FROM telemetry",
    "SET enable_external_access = true",
    "SELECT 1; DROP VIEW windows",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "SELECT * FROM read_parquet('/tmp/*.parquet')",
    "SELECT * FROM glob('/etc/*')",
])
def test_query_refuses_writes_and_files_outside_the_lake(page_app, sample_lake, sql):
    lake, _ = sample_lake
    at = _submit(page_app("page_query", lake).run(), sql)
    assert not at.exception
    assert at.error, f"not refused: {sql}"
    assert "refused" in at.error[0].value or "Permission" in at.error[0].value, at.error[0].value
    assert not Path("/tmp/adaptwin-dash-copy.csv").exists()
    # and the lake is untouched: the views still answer
    assert catalog.query(lake, "select count(*) n from windows").column("n")[0].as_py() > 0


def test_query_bad_sql_is_a_message(page_app, sample_lake):
    at = _submit(page_app("page_query", sample_lake[0]).run(), "SELEC nonsense")
    assert not at.exception and at.error and "does not parse" in at.error[0].value
    at = _submit(at, "SELECT no_such_column FROM telemetry")
    assert not at.exception and at.error and "query failed" in at.error[0].value


def test_query_result_is_capped(page_app, sample_lake, monkeypatch):
    from adaptwin.dashboard import page_query

    monkeypatch.setattr(page_query, "MAX_ROWS", 50)
    at = _submit(page_app("page_query", sample_lake[0]).run(), "SELECT * FROM telemetry")
    assert not at.exception and len(at.dataframe[0].value) == 50
    assert any("first 50 shown" in c.value for c in at.caption)


def test_app_navigation_starts_on_live(monkeypatch, sample_lake):
    from streamlit.testing.v1 import AppTest

    from adaptwin.dashboard import cli

    monkeypatch.setenv("ADAPTWIN_LAKE", str(sample_lake[0]))
    monkeypatch.setenv("ADAPTWIN_BOOTSTRAP", "127.0.0.1:1")
    monkeypatch.setenv("ADAPTWIN_DASHBOARD_REFRESH", "3")
    app = Path(cli.__file__).with_name("app.py")
    at = AppTest.from_file(str(app), default_timeout=60).run()
    assert not at.exception and not at.error
    assert at.title[0].value == "Live"
    assert at.sidebar.toggle(key="auto_refresh").value is True
    assert "Auto-refresh every 3 s" in at.sidebar.toggle(key="auto_refresh").label
    at.sidebar.toggle(key="auto_refresh").set_value(False).run()  # paused: the page still renders
    assert not at.exception and at.title[0].value == "Live"


def _adaptwin(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaptwin", *args], capture_output=True, text=True, timeout=60)


def test_cli_refuses_non_loopback_without_flag():
    out = _adaptwin("dashboard", "--address", "0.0.0.0", "--port", "1")
    assert out.returncode == 2 and "--allow-remote" in out.stderr and "Traceback" not in out.stderr


def test_cli_streamlit_arguments_bind_loopback():
    from adaptwin.dashboard import cli

    argv = cli.streamlit_argv("127.0.0.1", 8600)
    assert argv[argv.index("--server.address") + 1] == "127.0.0.1"
    assert argv[argv.index("--server.port") + 1] == "8600"
    assert argv[argv.index("--browser.gatherUsageStats") + 1] == "false"
    assert cli._is_loopback("127.0.0.1") and cli._is_loopback("::1") and cli._is_loopback("localhost")
    assert not cli._is_loopback("0.0.0.0") and not cli._is_loopback("10.1.2.3")


def test_cli_lake_that_is_a_file(tmp_path):
    f = tmp_path / "lake"
    f.write_text("x")
    out = _adaptwin("dashboard", "--lake", str(f), "--port", "1")
    assert out.returncode == 2 and "is a file" in out.stderr
