"""Twin vs real: one trace replayed on the twin and on a real vLLM server, window by window, and the
error table with the benchmarks' half-sMAPE."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from adaptwin.dashboard import charts, data, settings, sql_compare as q, ui

OVERLAYS = [("throughput", "Throughput", "tokens/s"), ("mean_ttft_ms", "Mean TTFT", "ms"),
            ("mean_itl_ms", "Mean ITL", "ms"), ("completed_tokens", "Completed tokens", "tokens"),
            ("running", "Running requests", "requests"), ("kv_usage", "KV usage", "fraction")]


def render() -> None:
    s = settings.current()
    st.title("Twin vs real")
    st.caption("Windows of the two replays are matched on their start (seconds since the trace start) and "
               "configuration. Error: half-sMAPE = 100 · mean(|twin − real| / (|twin| + |real|)), the "
               "benchmarks' and the paper's definition; textbook sMAPE is twice it.")
    ui.fragment(_body, ui.auto_refresh(), s)


def default_pair(series: pd.DataFrame) -> tuple[int, int] | None:
    """Indices of the twin and real series to compare: a run id replayed on both backends, else the newest
    twin run and the newest other-backend run."""
    twin = series[series["backend"] == "twin"]
    real = series[series["backend"] != "twin"]
    if twin.empty or real.empty:
        return None
    both = set(twin["run_id"]) & set(real["run_id"])
    for idx, row in twin.iterrows():  # newest first
        if row.run_id in both:
            return idx, real[real["run_id"] == row.run_id].index[0]
    return twin.index[0], real.index[0]


def _body(s: settings.Settings) -> None:
    with ui.guarded():
        series = data.frame(s.lake, q.SERIES)
        if series.empty:
            ui.empty("windows", s.lake)
            return
        series = series.assign(label=series["run_id"] + " · " + series["backend"]
                               + " (" + series["windows"].astype(str) + " windows, " + series["configs"] + ")")
        pair = default_pair(series)
        if pair is None:
            st.info("Twin vs real needs the same trace replayed on both backends: the lake has windows only from "
                    f"backend(s) {', '.join(sorted(series['backend'].unique()))}. Replay the trace on the other one, "
                    "e.g. `adaptwin replay --backend vllm --url http://… --source …`.", icon="ℹ️")
            return
        labels = list(series["label"])
        c1, c2 = st.columns(2)
        twin_label = c1.selectbox("Twin replay", labels, index=labels.index(series.loc[pair[0], "label"]),
                                  key="cmp_twin")
        real_label = c2.selectbox("Real replay", labels, index=labels.index(series.loc[pair[1], "label"]),
                                  key="cmp_real")
        twin = series[series["label"] == twin_label].iloc[0]
        real = series[series["label"] == real_label].iloc[0]
        params = [twin.run_id, twin.backend, real.run_id, real.backend]
        overlay = data.frame(s.lake, q.OVERLAY, params)
        errors = data.frame(s.lake, q.ERRORS, params)
        matched = int(errors["windows"].max()) if not errors.empty else 0
        if matched == 0:
            st.warning("These two replays share no window (same start and configuration): pick replays of the "
                       "same trace with the same window length.", icon="⚠️")
            return
        tp = errors[errors["metric"] == q.METRICS["throughput"]].iloc[0]
        cols = st.columns(4)
        cols[0].metric("Matched windows", ui.fmt(matched))
        cols[1].metric("Throughput half-sMAPE", f"{tp.half_smape_pct:.2f} %")
        cols[2].metric("Twin mean throughput", ui.fmt(tp.twin_mean, 1, "tok/s"))
        cols[3].metric("Real mean throughput", ui.fmt(tp.real_mean, 1, "tok/s"))
        grid = st.columns(2)
        for i, (metric, title, unit) in enumerate(OVERLAYS):
            long = overlay.melt(id_vars=["window_start"], value_vars=[f"twin_{metric}", f"real_{metric}"],
                                var_name="replay", value_name=metric)
            long["replay"] = long["replay"].str.split("_").str[0]
            with grid[i % 2]:
                charts.show(charts.lines(long, "window_start", metric, "replay", title=title, y_title=unit,
                                         x_title="window start (s)"))
        st.subheader("Error per metric")
        st.dataframe(errors, hide_index=True, key="cmp_errors", column_config={
            c: st.column_config.NumberColumn(format="%.3f") for c in ("twin_mean", "real_mean", "half_smape_pct",
                                                                       "smape_pct")})
        whole = data.frame(s.lake, q.RUN_SCOPE, params)
        if not whole.empty:
            st.subheader("Whole runs (scope = run)")
            st.dataframe(whole, hide_index=True, key="cmp_whole")
