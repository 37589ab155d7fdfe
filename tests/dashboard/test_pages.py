"""Every page under Streamlit's AppTest, with data, on an empty lake and with a corrupt file; the numbers
the pages show are checked against DuckDB (through the project's catalog) and against Python."""

from __future__ import annotations

import pytest
import streamlit as st

from adaptwin.dashboard.sql_common import half_smape_py
from adaptwin.ingest import catalog

import sys

lakedata = sys.modules["adaptwin_dashboard_tests_lakedata"]  # loaded by path in conftest.py
PAGES = {
    "page_live": "Live",
    "page_adapters": "Adapters",
    "page_recommendations": "Recommendations",
    "page_compare": "Twin vs real",
    "page_query": "Query",
    "page_pipeline": "Pipeline",
}


@pytest.fixture(autouse=True)
def _fresh_caches():
    st.cache_data.clear()
    st.cache_resource.clear()
    yield


def _texts(at) -> str:
    return "\n".join(e.value for e in [*at.info, *at.warning, *at.error, *at.markdown, *at.caption])


def _metrics(at) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _frame(at, column: str):
    """The first table on the page with ``column`` (AppTest's dataframes carry no key)."""
    for df in at.dataframe:
        if column in df.value.columns:
            return df.value
    raise AssertionError(f"no table with a {column!r} column")


def _num(text: str) -> float:
    return float(text.split()[0].replace(",", ""))


def _q(lake, sql):
    return catalog.query(lake, sql).to_pylist()


@pytest.mark.parametrize("module", list(PAGES))
def test_page_renders_with_data(page_app, sample_lake, module):
    lake, _ = sample_lake
    at = page_app(module, lake).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value == PAGES[module]
    if module not in ("page_query",):
        assert at.metric, "a page with data shows its headline numbers"


@pytest.mark.parametrize("module", list(PAGES))
def test_page_renders_on_empty_lake(page_app, empty_lake, module):
    at = page_app(module, empty_lake).run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    if module != "page_query":
        assert "yet" in _texts(at) or "empty" in _texts(at), _texts(at)


# a table each page reads (the views bind from one footer, so only queries that read the file fail)
READS = {"page_live": "telemetry", "page_adapters": "windows", "page_recommendations": "recommendations",
         "page_compare": "windows", "page_pipeline": "telemetry"}


@pytest.mark.parametrize("module", list(READS))
def test_corrupt_file_is_a_message_not_a_traceback(page_app, sample_lake, tmp_path, module):
    import shutil

    lake = tmp_path / "lake"
    shutil.copytree(sample_lake[0], lake)
    bad = lakedata.corrupt(lake, READS[module])
    at = page_app(module, lake).run()
    assert not at.exception, at.exception
    assert at.error and "not valid Parquet" in at.error[0].value
    assert any(str(bad) in c.value for c in at.code), "the page names the corrupt file"


@pytest.mark.parametrize("module", ["page_recommendations", "page_compare"])
def test_corrupt_file_stops_only_pages_that_read_it(page_app, sample_lake, tmp_path, module):
    import shutil

    lake = tmp_path / "lake"
    shutil.copytree(sample_lake[0], lake)
    lakedata.corrupt(lake, "telemetry")  # neither page reads telemetry
    at = page_app(module, lake).run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.metric


def test_live_numbers_match_duckdb_and_refresh(page_app, sample_lake, tmp_path):
    import shutil

    lake = tmp_path / "lake"
    shutil.copytree(sample_lake[0], lake)
    at = page_app("page_live", lake).run()
    run = at.multiselect(key="live_runs").value[0]
    (expect,) = _q(lake, f"select count(*) n, count(*) filter (where finished) f, "
                         f"quantile_cont(ttft_ms, 0.99) p99 from telemetry where run_id = '{run}'")
    (win,) = _q(lake, f"select count(*) n, arg_max(throughput, window_end) tp from windows "
                      f"where run_id = '{run}' and scope = 'window'")
    m = _metrics(at)
    assert _num(m["Requests"]) == expect["n"] and _num(m["Finished"]) == expect["f"]
    assert _num(m["TTFT p99"]) == pytest.approx(expect["p99"], abs=0.06)
    assert _num(m["Windows"]) == win["n"] and _num(m["Throughput"]) == pytest.approx(win["tp"], abs=0.06)
    # new windows land in the lake: the next fragment rerun shows them (AppTest does not tick run_every)
    backend = "twin" if run.endswith("twin") else "vllm"
    extra = lakedata.simulate(lakedata.make_trace(200, 30.0, seed=5), run, backend, 32, 8).windows
    lakedata.write(lake, "windows", extra, run)
    st.cache_data.clear()
    at.run()
    assert _num(_metrics(at)["Windows"]) == win["n"] + extra.num_rows - 1  # the scope='run' row is not a window


def test_live_picks_several_runs(page_app, sample_lake):
    lake, sample = sample_lake
    at = page_app("page_live", lake).run()
    at.multiselect(key="live_runs").set_value([sample.twin_run, sample.real_run]).run()
    assert not at.exception
    assert _texts(at).count("· twin") >= 1 and _texts(at).count("· vllm") >= 1
    assert [m.label for m in at.metric].count("Requests") == 2


def test_live_latency_charts_means_by_default_percentiles_on_request(page_app, sample_lake):
    lake, _ = sample_lake
    at = page_app("page_live", lake).run()

    def titles():  # the Vega-Lite specs of every chart on the page (AppTest has no chart element type)
        def walk(node):
            yield node
            for child in getattr(node, "children", {}).values():
                yield from walk(child)
        return [n.proto.spec for n in walk(at.main) if getattr(n, "type", None) == "vega_lite_chart"]

    assert any("Mean TTFT per window" in t for t in titles()) and not any("TTFT percentiles" in t for t in titles())
    at.toggle(key="live_percentiles").set_value(True).run()
    assert not at.exception and not at.error
    assert any("TTFT percentiles" in t for t in titles()) and any("ITL percentiles" in t for t in titles())
    assert not any("Mean TTFT per window" in t for t in titles())


def test_adapters_numbers_match_duckdb(page_app, sample_lake):
    lake, _ = sample_lake
    at = page_app("page_adapters", lake).run()
    run, backend = at.selectbox(key="adapters_series").value.split(" · ")
    (expect,) = _q(lake, f"select count(distinct a.adapter_id) n, sum(a.offered_tokens) o, "
                         f"sum(a.completed_tokens) c from (select unnest(adapters) a from windows "
                         f"where run_id = '{run}' and backend = '{backend}' and scope = 'window')")
    m = _metrics(at)
    assert _num(m["Adapters seen"]) == expect["n"]
    assert _num(m["Offered tokens"]) == expect["o"] and _num(m["Completed tokens"]) == expect["c"]
    starved = _frame(at, "starvation_ratio")
    assert list(starved["starvation_ratio"]) == sorted(starved["starvation_ratio"], reverse=True)


def test_recommendations_current_vs_recommended_and_error(page_app, sample_lake):
    lake, sample = sample_lake
    at = page_app("page_recommendations", lake).run()
    assert at.selectbox(key="rec_run").value == sample.twin_run
    m = _metrics(at)
    (last,) = _q(lake, f"select served, max_loras, predicted_throughput p from recommendations where run_id = "
                       f"'{sample.twin_run}' and kind = 'recommendation' order by window_end desc limit 1")
    assert _num(m["Served adapters: recommended"]) == last["served"]
    assert _num(m["max_loras: recommended"]) == last["max_loras"]
    assert _num(m["Served adapters: current"]) == 32 and _num(m["max_loras: current"]) == 8
    # the error metric: windows that ran the predicted config, against the latest earlier prediction
    rows = _q(lake, f"""
        select w.throughput o, r.predicted_throughput p from
          (select * from windows where run_id = '{sample.twin_run}' and scope = 'window') w
          asof join (select * from recommendations where kind = 'recommendation') r
          on w.run_id = r.run_id and w.window_start >= r.window_end
        where w.served = r.served and w.max_loras = r.max_loras""")
    assert _num(m["Scored windows"]) == len(rows) > 0
    assert _num(m["Learner error (half-sMAPE)"]) == pytest.approx(
        half_smape_py([r["o"] for r in rows], [r["p"] for r in rows]), abs=0.006)
    assert not _frame(at, "reason").empty


def test_twin_vs_real_error_table(page_app, sample_lake):
    lake, sample = sample_lake
    at = page_app("page_compare", lake).run()
    assert at.selectbox(key="cmp_twin").value.startswith(sample.twin_run + " · twin")
    assert at.selectbox(key="cmp_real").value.startswith(sample.real_run + " · vllm")
    pairs = _q(lake, f"""select t.throughput tw, r.throughput re, t.mean_ttft_ms ttw, r.mean_ttft_ms tre
        from (select * from windows where run_id = '{sample.twin_run}' and scope = 'window') t
        join (select * from windows where run_id = '{sample.real_run}' and scope = 'window') r
        using (window_start, served, max_loras)""")
    m = _metrics(at)
    assert _num(m["Matched windows"]) == len(pairs) == sample.windows
    tp = half_smape_py([p["re"] for p in pairs], [p["tw"] for p in pairs])
    assert _num(m["Throughput half-sMAPE"]) == pytest.approx(tp, abs=0.006)
    table = _frame(at, "half_smape_pct").set_index("metric")
    assert table.loc["throughput (tok/s)", "half_smape_pct"] == pytest.approx(tp)
    assert table.loc["throughput (tok/s)", "smape_pct"] == pytest.approx(2 * tp)
    ttft = half_smape_py([p["tre"] for p in pairs], [p["ttw"] for p in pairs])
    assert table.loc["mean TTFT (ms)", "half_smape_pct"] == pytest.approx(ttft)


def test_twin_vs_real_needs_both_backends(page_app, tmp_path):
    lake = tmp_path / "lake"
    rep = lakedata.simulate(lakedata.make_trace(300, 60.0), "only-twin", "twin", 16, 4)
    lakedata.write(lake, "windows", rep.windows, "only-twin")
    at = page_app("page_compare", lake).run()
    assert not at.exception and not at.error
    assert "both backends" in at.info[0].value


def test_half_smape_sql_matches_python():
    import duckdb

    from adaptwin.dashboard.sql_common import half_smape

    a, b = [10.0, 0.0, 5.0, None, 3.0], [12.0, 0.0, 0.0, 4.0, 3.0]
    con = duckdb.connect()
    got = con.execute(f"select {half_smape('a', 'b')} from (select unnest(?) a, unnest(?) b)", [a, b]).fetchone()[0]
    assert got == pytest.approx(half_smape_py(a, b)) == pytest.approx(100 * (2 / 22 + 0 + 1 + 0) / 4)


def test_pipeline_counts_and_no_broker(page_app, sample_lake):
    lake, _ = sample_lake
    at = page_app("page_pipeline", lake, bootstrap="127.0.0.1:1").run()
    m = _metrics(at)
    (dead,) = _q(lake, "select count(*) n from deadletter")
    assert _num(m["Dead-lettered rows"]) == dead["n"]
    assert _num(m["Files"]) == sum(1 for _ in lake.glob("*/run_id=*/date=*/*.parquet"))
    assert any("no Kafka broker answers at 127.0.0.1:1" in w.value for w in at.warning)
    tables = _frame(at, "temp files").set_index("table")
    (tel,) = _q(lake, "select count(*) n from telemetry")
    assert tables.loc["telemetry", "rows"] == tel["n"]


def test_pipeline_lag_from_real_broker(page_app, sample_lake, bootstrap, make_topic):
    """Lag of a group that committed part of a topic; a topic the project needs but that is missing."""
    from kafka import TopicPartition

    from adaptwin.kafka import commit_offsets, make_consumer, make_producer

    topic = make_topic(partitions=1, prefix="dash")
    producer = make_producer(bootstrap)
    for i in range(10):
        producer.send(topic, b"x%d" % i)
    producer.flush()
    producer.close()
    group = f"dash-{topic}"
    consumer = make_consumer(bootstrap, group)
    commit_offsets(consumer, {TopicPartition(topic, 0): 3})  # records 0..3 done: 6 left
    consumer.close()
    import os

    os.environ["ADAPTWIN_DASHBOARD_GROUPS"] = group
    try:
        at = page_app("page_pipeline", sample_lake[0], bootstrap=bootstrap).run()
    finally:
        del os.environ["ADAPTWIN_DASHBOARD_GROUPS"]
    assert not at.exception
    lag = _frame(at, "lag")
    assert lag.to_dict("records") == [{"group": group, "topic": topic, "lag": 6}]
    assert _num(_metrics(at)["Total lag"]) == 6
