"""Adapters: per-adapter load and starvation over time (heatmap), adapter loads, the most starved adapters."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from adaptwin.dashboard import charts, data, runs, settings, sql_adapters, ui

HEATMAP_BUCKETS = 60


def render() -> None:
    s = settings.current()
    st.title("Adapters")
    st.caption("Per-adapter offered and completed tokens from each window's `adapters` list; starvation = "
               "1 − completed / offered (an adapter starves at ≥ 0.1, as the paper defines it).")
    ui.fragment(_body, ui.auto_refresh(), s)


def _pick_series(series: pd.DataFrame, key: str) -> tuple[str, str] | None:
    labels = list(series["series"])
    label = st.selectbox("Run · backend", labels, index=0, key=key)
    if label is None:
        return None
    row = series[series["series"] == label].iloc[0]
    return str(row.run_id), str(row.backend)


def _body(s: settings.Settings) -> None:
    with ui.guarded():
        series = runs.series(s.lake)
        if series.empty:
            ui.empty("windows", s.lake, "windows or telemetry")
            return
        c1, c2 = st.columns([3, 1])
        with c1:
            picked = _pick_series(series, "adapters_series")
        with c2:
            top_k = st.slider("Adapters in the heatmap", 5, 100, 30, step=5, key="adapters_top")
        if picked is None:
            return
        run_id, backend = picked
        totals = data.frame(s.lake, sql_adapters.TOTALS, [run_id, backend])
        if totals.empty:
            st.info(f"`{run_id} · {backend}` has no windows with per-adapter rows yet; below is its request load "
                    "from telemetry.", icon="ℹ️")
        else:
            n_starved = int((totals["starvation_ratio"] >= 0.1).sum())
            cols = st.columns(4)
            cols[0].metric("Adapters seen", ui.fmt(len(totals)))
            cols[1].metric("Starved adapters", ui.fmt(n_starved), help="starvation ratio ≥ 0.1 over the run")
            cols[2].metric("Offered tokens", ui.fmt(int(totals["offered_tokens"].sum())))
            cols[3].metric("Completed tokens", ui.fmt(int(totals["completed_tokens"].sum())))
            heat = data.frame(s.lake, sql_adapters.HEATMAP, [run_id, backend, top_k, HEATMAP_BUCKETS])
            order = list(heat.groupby("adapter_id")["offered_tokens"].sum().sort_values(ascending=False).index)
            charts.show(charts.heatmap(heat, "t", "adapter_id", "starvation_ratio", y_sort=order,
                                       title=f"Starvation of the {len(order)} busiest adapters over time"))
            left, right = st.columns(2)
            with left:
                st.subheader("Most starved adapters")
                st.dataframe(totals.head(20), hide_index=True, key="adapters_starved",
                             column_config={"starvation_ratio": st.column_config.NumberColumn(format="%.3f")})
            with right:
                loads = data.frame(s.lake, sql_adapters.LOADS, [run_id, backend])
                charts.show(charts.lines(loads, "window_end", ["adapter_loads", "active_adapters"],
                                         title="Adapter loads and active adapters per window", y_title="adapters"))
        tele = data.frame(s.lake, sql_adapters.TELEMETRY, [run_id, backend, 25])
        if not tele.empty:
            charts.show(charts.bars(tele, "tokens", "adapter_id", title="Request load per adapter (telemetry, top 25)",
                                    horizontal=True))
