"""Pipeline: consumer lag per group and topic, dead-letter counts by reason, lake size and freshness."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from adaptwin.dashboard import charts, data, kafka_status, lakefs, settings, sql_pipeline as q, ui

LAG_TTL_S = 5.0


@st.cache_data(ttl=LAG_TTL_S, show_spinner=False)
def _kafka(bootstrap: str, groups: tuple[str, ...]) -> kafka_status.KafkaStatus:
    return kafka_status.status(bootstrap, groups)


def render() -> None:
    s = settings.current()
    st.title("Pipeline")
    st.caption("Kafka consumer lag (from the broker's admin API, nothing is consumed), dead letters and the "
               "lake's files.")
    ui.fragment(_body, ui.auto_refresh(), s)


def _body(s: settings.Settings) -> None:
    readable = _lake(s)
    _lag(s)
    _deadletter(s, readable)


def _lake(s: settings.Settings) -> bool:
    """Files and rows per table; False when DuckDB cannot read the lake (the problem is shown here)."""
    st.subheader("Lake")
    tables = lakefs.scan(s.lake)
    total = sum(t.files for t in tables)
    newest = max((t.newest_mtime for t in tables if t.newest_mtime), default=None)
    ages = [t.age_s for t in tables if t.age_s is not None]
    cols = st.columns(4)
    cols[0].metric("Lake size", lakefs.human_bytes(sum(t.bytes for t in tables)))
    cols[1].metric("Files", ui.fmt(total))
    cols[2].metric("Newest file", ui.fmt_age(min(ages)) if ages else "—",
                   help=None if newest is None else pd.Timestamp(newest, unit="s").isoformat(timespec="seconds"))
    cols[3].metric("Temp files", ui.fmt(sum(t.temp_files for t in tables)),
                   help="*.parquet.tmp: a sink is writing, or one died mid-write (the next sink start removes them)")
    if total == 0:
        st.info(f"The lake at `{s.lake}` is empty. Fill it with `adaptwin ingest …` and `adaptwin sink`; "
                "replay and the learner add telemetry, windows and recommendations.", icon="ℹ️")
    rows: dict[str, int | None] = {}
    try:
        counts = data.frame(s.lake, q.ROWS)
        rows = dict(zip(counts["table"], counts["rows"]))
    except data.LakeProblem as err:
        ui.problem(err)
        readable = False
    else:
        readable = True
    table = pd.DataFrame([{
        "table": t.table, "rows": rows.get(t.table), "files": t.files, "size": lakefs.human_bytes(t.bytes),
        "runs": t.runs, "newest file": ui.fmt_age(t.age_s), "temp files": t.temp_files} for t in tables])
    st.dataframe(table, hide_index=True, key="pipe_tables")
    return readable


def _lag(s: settings.Settings) -> None:
    st.subheader("Consumer lag")
    k = _kafka(s.bootstrap, s.groups)
    if k.error:
        st.warning(k.error, icon="⚠️")
        return
    if k.missing_topics:
        st.warning(f"topic(s) missing on {k.bootstrap}: {', '.join(k.missing_topics)}. Create them with "
                   f"`adaptwin topics create --bootstrap {k.bootstrap}`; until then nothing flows into those "
                   "tables.", icon="⚠️")
    if not k.lag:
        st.info(f"No consumer group has committed offsets on {k.bootstrap} yet"
                + (f" (looked at: {', '.join(k.groups)})" if k.groups else "") + ".", icon="ℹ️")
        return
    lag = pd.DataFrame(k.lag)
    by_topic = lag.groupby(["group", "topic"], as_index=False)["lag"].sum()
    cols = st.columns(3)
    cols[0].metric("Total lag", ui.fmt(int(lag["lag"].sum())), help="records not yet committed, all groups")
    cols[1].metric("Groups", ui.fmt(lag["group"].nunique()))
    cols[2].metric("Topics", ui.fmt(lag["topic"].nunique()))
    left, right = st.columns(2)
    with left:
        st.dataframe(by_topic, hide_index=True, key="pipe_lag")
    with right:
        by_topic["group · topic"] = by_topic["group"] + " · " + by_topic["topic"]
        charts.show(charts.bars(by_topic, "lag", "group · topic", title="Lag per group and topic", horizontal=True))


def _deadletter(s: settings.Settings, readable: bool) -> None:
    st.subheader("Dead letters")
    if not readable:
        st.caption("unavailable until the lake problem above is fixed")
        return
    with ui.guarded():
        by_reason = data.frame(s.lake, q.DEADLETTER_BY_REASON)
        if by_reason.empty:
            st.caption("none: every record so far was valid")
            return
        st.metric("Dead-lettered rows", ui.fmt(int(by_reason["rows"].sum())))
        left, right = st.columns(2)
        with left:
            st.dataframe(by_reason, hide_index=True, key="pipe_dead_reason")
        with right:
            charts.show(charts.bars(by_reason.assign(what=by_reason["stage"] + ": " + by_reason["reason"]),
                                    "rows", "what", title="Dead letters by reason", horizontal=True))
        st.dataframe(data.frame(s.lake, q.DEADLETTER_BY_RUN), hide_index=True, key="pipe_dead_run")
