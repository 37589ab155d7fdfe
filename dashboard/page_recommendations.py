"""Recommendations: the learner's current advice next to what the run runs, predicted vs observed
throughput with the prediction interval, the learner's error over time and drift events."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from adaptwin.dashboard import charts, data, settings, sql_recommendations as q, ui


def render() -> None:
    s = settings.current()
    st.title("Recommendations")
    st.caption("What the online learner recommends (`recommendations`, kind = recommendation) against what the "
               "run actually runs and completes (`windows`); drift events are the red dashed rules.")
    ui.fragment(_body, ui.auto_refresh(), s)


def _body(s: settings.Settings) -> None:
    with ui.guarded():
        rec_runs = data.frame(s.lake, q.RUNS)
        if rec_runs.empty:
            ui.empty("recommendations", s.lake)
            return
        run_id = st.selectbox("Run", list(rec_runs["run_id"]), index=0, key="rec_run")
        latest = data.frame(s.lake, q.LATEST, [run_id])
        current = data.frame(s.lake, q.CURRENT, [run_id])
        drift = data.frame(s.lake, q.DRIFT, [run_id])
        _headline(latest, current, drift)
        preds = data.frame(s.lake, q.PREDICTIONS, [run_id])
        observed = data.frame(s.lake, q.OBSERVED, [run_id])
        if preds.empty:
            st.info("This run has drift events but no recommendation yet.")
        else:
            charts.show(charts.band(preds, "window_end", "interval_low", "interval_high", "predicted_throughput",
                                    observed=observed, rules=drift,
                                    title="Predicted throughput (line, interval band) vs observed (dashed)"))
        err = data.frame(s.lake, q.ERROR, [run_id, run_id])
        if err.empty:
            st.info("No window has run a recommended configuration yet, so the learner's error cannot be scored "
                    "(it is scored only on windows that ran the configuration it predicted).", icon="ℹ️")
        else:
            cols = st.columns(3)
            cols[0].metric("Learner error (half-sMAPE)",
                           f"{q_half_smape(err):.2f} %", help="all scored windows; textbook sMAPE is twice this")
            cols[1].metric("Observed inside the interval", f"{100 * err['inside'].mean():.0f} %")
            cols[2].metric("Scored windows", ui.fmt(len(err)))
            charts.show(charts.lines(err, "window_end", "rolling_half_smape", "backend", rules=drift,
                                     title="Learner error over time (half-sMAPE, rolling 10 windows)", y_title="%"))
        st.subheader("Drift events")
        if drift.empty:
            st.caption("none so far")
        else:
            st.dataframe(drift, hide_index=True, key="rec_drift")


def q_half_smape(err: pd.DataFrame) -> float:
    from adaptwin.dashboard.sql_common import half_smape_py

    return half_smape_py(err["observed"].tolist(), err["predicted"].tolist())


def _headline(latest: pd.DataFrame, current: pd.DataFrame, drift: pd.DataFrame) -> None:
    cols = st.columns(5)
    cur = current.iloc[0] if not current.empty else None
    rec = latest.iloc[0] if not latest.empty else None
    cols[0].metric("Served adapters: current", "—" if cur is None else ui.fmt(int(cur.served)))
    cols[1].metric("Served adapters: recommended", "—" if rec is None or pd.isna(rec.served) else
                   ui.fmt(int(rec.served)),
                   delta=None if rec is None or cur is None or pd.isna(rec.served) else int(rec.served - cur.served))
    cols[2].metric("max_loras: current", "—" if cur is None else ui.fmt(int(cur.max_loras)))
    cols[3].metric("max_loras: recommended", "—" if rec is None or pd.isna(rec.max_loras) else
                   ui.fmt(int(rec.max_loras)),
                   delta=None if rec is None or cur is None or pd.isna(rec.max_loras) else
                   int(rec.max_loras - cur.max_loras))
    cols[4].metric("Predicted throughput", "—" if rec is None else ui.fmt(rec.predicted_throughput, 0, "tok/s"),
                   help=None if rec is None else
                   f"interval {rec.interval_low:,.1f} – {rec.interval_high:,.1f} tok/s; model {rec.model} "
                   f"v{rec.model_version}; {rec.reason or ''}")
    if cur is not None and len(current) > 1:
        st.caption("current configuration per backend: " + ", ".join(
            f"{r.backend} {int(r.served)}/{int(r.max_loras)}" for r in current.itertuples()))
    if rec is not None:
        st.caption(f"latest recommendation at {rec.window_end:,.0f} s of trace time"
                   + (f"; {len(drift)} drift event(s)" if not drift.empty else ""))
