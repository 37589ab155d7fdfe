"""Live: throughput, offered vs completed tokens, TTFT/ITL, running/waiting and KV usage over trace time, per
run and backend. The body is a fragment that reruns every few seconds on its own.

Telemetry is scanned once per refresh (whole-run totals and exact p50/p99); the latency charts show the
per-window means the WINDOW records carry, and per-bucket percentiles (a second full scan, the costlier part
of the page on a large run) only when the toggle asks for them."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from adaptwin.dashboard import charts, data, runs, settings, sql_live, ui

MAX_SERIES = 6
LATENCY_BUCKETS = 120  # percentiles per time bucket: at most this many buckets per run
MIN_BUCKET_S = 5.0


def render() -> None:
    s = settings.current()
    st.title("Live")
    st.caption("Replays and the learner as they run: every chart is per run and backend over trace time "
               "(seconds since the trace started). Data: the `windows` and `telemetry` tables of the lake.")
    ui.fragment(_body, ui.auto_refresh(), s)


def _body(s: settings.Settings) -> None:
    with ui.guarded():
        series = runs.series(s.lake)
        if series.empty:
            ui.empty("telemetry", s.lake, "telemetry or windows")
            return
        ids = runs.run_ids(series)
        chosen = st.multiselect("Runs", ids, default=ids[:1], key="live_runs",
                                help="newest first; each run is shown per backend")
        if not chosen:
            st.info("Pick one or more runs.")
            return
        percentiles = st.toggle(
            "TTFT / ITL percentiles per time bucket", key="live_percentiles",
            help="Off: the latency charts show the per-window means the replay wrote into `windows` (no extra "
                 "scan). On: p50/p90/p99 per time bucket computed from every telemetry row of the runs "
                 "(one more full scan of their telemetry on every refresh).")
        windows = data.frame(s.lake, sql_live.WINDOWS, [chosen])
        totals = data.frame(s.lake, sql_live.TOTALS, [chosen])
        latency = data.frame(s.lake, sql_live.LATENCY, [chosen, MIN_BUCKET_S, LATENCY_BUCKETS]) \
            if percentiles else None
        _metrics(series[series["run_id"].isin(chosen)].head(MAX_SERIES), windows, totals)
        _charts(windows, latency, s)


def _metrics(series: pd.DataFrame, windows: pd.DataFrame, totals: pd.DataFrame) -> None:
    for row in series.itertuples():
        w = windows[(windows["run_id"] == row.run_id) & (windows["backend"] == row.backend)]
        t = totals[(totals["run_id"] == row.run_id) & (totals["backend"] == row.backend)]
        last = w.iloc[-1] if not w.empty else None
        tot = t.iloc[0] if not t.empty else None
        st.markdown(f"**{row.series}**" + (f" — served {int(last.served)}, max_loras {int(last.max_loras)}, "
                                          f"window ending at {last.window_end:,.0f} s" if last is not None else ""))
        cols = st.columns(4) + st.columns(4)
        cols[0].metric("Requests", ui.fmt(int(tot.requests)) if tot is not None else "—")
        cols[1].metric("Finished", ui.fmt(int(tot.finished)) if tot is not None else "—")
        cols[2].metric("TTFT p99", ui.fmt(None if tot is None else tot.ttft_p99, 1, "ms"),
                       help="99th percentile over the run's telemetry" + _p50(tot, "ttft"))
        cols[3].metric("ITL p99", ui.fmt(None if tot is None else tot.itl_p99, 2, "ms"), help="99th percentile" + _p50(tot, "itl"))
        cols[4].metric("Throughput", ui.fmt(last.throughput if last is not None else None, 1, "tok/s"),
                       help="completed tokens / window length, latest window")
        cols[5].metric("Windows", ui.fmt(len(w)))
        cols[6].metric("Running / waiting", "—" if last is None else
                       f"{ui.fmt(last.running, 1)} / {ui.fmt(last.waiting, 1)}", help="means over the latest window")
        cols[7].metric("KV usage", "—" if last is None or pd.isna(last.kv_usage) else f"{100 * last.kv_usage:.1f} %")


def _p50(tot, col: str) -> str:
    return "" if tot is None or pd.isna(tot[f"{col}_p50"]) else f"; p50 {tot[f'{col}_p50']:,.2f} ms"


def _charts(windows: pd.DataFrame, latency: pd.DataFrame | None, s: settings.Settings) -> None:
    left, right = st.columns(2)
    with left:
        if windows.empty:
            ui.empty("windows", s.lake, "windows for these runs")
        else:
            charts.show(charts.lines(windows, "window_end", "throughput", "series", title="Throughput",
                                     y_title="tokens/s"))
            charts.show(charts.lines(windows, "window_end", ["running", "waiting"], "series",
                                     title="Running and waiting requests", y_title="requests"))
    with right:
        if not windows.empty:
            charts.show(charts.lines(windows, "window_end", ["offered_tokens", "completed_tokens"], "series",
                                     title="Offered vs completed tokens per window", y_title="tokens"))
            charts.show(charts.lines(windows.assign(kv_usage_pct=100 * windows["kv_usage"]), "window_end",
                                     "kv_usage_pct", "series", title="KV cache usage", y_title="%"))
    if latency is None:  # the per-window means of the WINDOW records: no telemetry scan
        if windows.empty:
            return
        left, right = st.columns(2)
        with left:
            charts.show(charts.lines(windows, "window_end", "mean_ttft_ms", "series",
                                     title="Mean TTFT per window (requests finished in it)", y_title="ms"))
        with right:
            charts.show(charts.lines(windows, "window_end", "mean_itl_ms", "series",
                                     title="Mean ITL per window (token-weighted)", y_title="ms"))
        return
    if latency.empty:
        ui.empty("telemetry", s.lake, "telemetry for these runs")
        return
    left, right = st.columns(2)
    with left:
        charts.show(charts.lines(latency, "t", ["ttft_p50", "ttft_p90", "ttft_p99"], "series",
                                 title="TTFT percentiles (by arrival time)", y_title="ms"))
    with right:
        charts.show(charts.lines(latency, "t", ["itl_p50", "itl_p90", "itl_p99"], "series",
                                 title="ITL percentiles (by arrival time)", y_title="ms"))
