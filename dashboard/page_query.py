"""Query: read-only DuckDB SQL over the lake's views, with examples; the result as a table, a chart and CSV.

Statements go through ``catalog.check_read_only`` (the project's one guard: SELECT / WITH / EXPLAIN only)
and run on the sandboxed connection (files outside the lake cannot be read, settings are locked).
"""

from __future__ import annotations

import streamlit as st

from adaptwin.dashboard import charts, data, settings, ui
from adaptwin.dashboard.sql_examples import EXAMPLES

MAX_ROWS = 10_000
VIEWS = "requests, telemetry, windows, recommendations, deadletter"


def _use_example() -> None:
    st.session_state["query_sql"] = EXAMPLES[st.session_state["query_example"]]


def render() -> None:
    s = settings.current()
    st.title("Query")
    st.caption(f"Read-only DuckDB SQL over the lake at `{s.lake}`. Views: {VIEWS} (columns as in "
               "`adaptwin/schemas.py`, plus the partition columns `run_id` and `date`). SELECT, WITH and "
               f"EXPLAIN only; the first {MAX_ROWS:,} rows are shown.")
    st.session_state.setdefault("query_sql", next(iter(EXAMPLES.values())))
    st.selectbox("Examples", list(EXAMPLES), key="query_example", on_change=_use_example)
    with st.form("query_form"):
        sql = st.text_area("SQL", key="query_sql", height=160)
        submitted = st.form_submit_button("Run", type="primary")
    if not (submitted or st.session_state.get("query_ran")):
        return
    st.session_state["query_ran"] = True
    try:
        result = data.user_query(str(s.lake), sql, MAX_ROWS)
    except Exception as err:  # noqa: BLE001 -- refused / failed / lake problems are all shown as messages
        ui.problem(err)
        return
    df = result.frame
    note = f" (first {MAX_ROWS:,} shown)" if result.truncated else ""
    st.caption(f"{len(df):,} row{'s' if len(df) != 1 else ''}{note} in {result.seconds * 1000:,.0f} ms")
    st.dataframe(df, hide_index=True, key="query_result")
    st.download_button("Download CSV", df.to_csv(index=False).encode(), file_name="adaptwin-query.csv",
                       mime="text/csv", key="query_csv")
    _chart(df)


def _chart(df) -> None:
    numeric = [c for c in df.columns if df[c].dtype.kind in "iuf"]
    if df.empty or len(df.columns) < 2 or not numeric:
        return
    with st.expander("Chart", expanded=True):
        cols = st.columns(4)
        x = cols[0].selectbox("x", list(df.columns), index=0, key="query_x")
        y_opts = [c for c in numeric if c != x] or numeric
        y = cols[1].selectbox("y", y_opts, index=0, key="query_y")
        others = [None] + [c for c in df.columns if c not in (x, y) and df[c].nunique() <= 20]
        color = cols[2].selectbox("color", others, index=0, key="query_color")
        kind = cols[3].selectbox("mark", ["line", "bar", "point"],
                                 index=0 if df[x].dtype.kind in "iufM" else 1, key="query_mark")
        charts.show(charts.auto(df, x, y, color, kind))
