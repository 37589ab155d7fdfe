"""Altair charts the pages share: interactive (wheel zoom, drag pan, tooltips), one look everywhere."""

from __future__ import annotations

from typing import Sequence

import altair as alt
import pandas as pd
import streamlit as st

alt.data_transformers.disable_max_rows()  # inputs are aggregated per window / bucket; never raw telemetry

HEIGHT = 260


def show(chart: alt.Chart, key: str | None = None) -> None:
    st.altair_chart(chart, width="stretch", key=key)


def lines(df: pd.DataFrame, x: str, y: str | Sequence[str], color: str | None = None, *,
          title: str = "", x_title: str = "trace time (s)", y_title: str = "", dash: str | None = None,
          rules: pd.DataFrame | None = None) -> alt.Chart:
    """Lines of ``y`` over ``x``; several ``y`` columns are folded into one 'measure' legend."""
    ys = [y] if isinstance(y, str) else list(y)
    data = df
    if len(ys) > 1:
        keep = [c for c in {x, color, dash} if c]
        data = df.melt(id_vars=keep, value_vars=ys, var_name="measure", value_name="value")
        ycol = "value"
        if color is None:
            color, dash = "measure", dash
        elif dash is None:
            dash = "measure"
    else:
        ycol = ys[0]
    enc = {
        "x": alt.X(f"{x}:Q", title=x_title),
        "y": alt.Y(f"{ycol}:Q", title=y_title or ycol),
        "tooltip": [alt.Tooltip(f"{c}", format=",.3~f") if c in (x, ycol) else alt.Tooltip(c)
                    for c in dict.fromkeys(c for c in (color, dash, x, ycol) if c)],
    }
    if color:
        enc["color"] = alt.Color(f"{color}:N", title=None, legend=alt.Legend(orient="bottom"))
    if dash:
        enc["strokeDash"] = alt.StrokeDash(f"{dash}:N", title=None, legend=alt.Legend(orient="bottom"))
    chart = alt.Chart(data).mark_line(point=len(data) < 60).encode(**enc)
    if rules is not None and not rules.empty:
        chart = chart + drift_rules(rules, x)
    return chart.properties(title=title, height=HEIGHT).interactive(bind_y=False)


def drift_rules(rules: pd.DataFrame, x: str) -> alt.Chart:
    return alt.Chart(rules).mark_rule(color="#d62728", strokeDash=[4, 3]).encode(
        x=alt.X(f"{x}:Q"), tooltip=[c for c in rules.columns][:4])


def band(df: pd.DataFrame, x: str, low: str, high: str, mid: str, observed: pd.DataFrame | None = None,
         observed_y: str = "throughput", color: str = "backend", title: str = "",
         rules: pd.DataFrame | None = None) -> alt.Chart:
    """A prediction line with its interval as a band, and the observed values on top."""
    base = alt.Chart(df)
    area = base.mark_area(opacity=0.25, color="#4c78a8").encode(
        x=alt.X(f"{x}:Q", title="trace time (s)"), y=alt.Y(f"{low}:Q", title="tokens/s"), y2=f"{high}:Q",
        tooltip=[x, low, high, mid])
    line = base.mark_line(color="#4c78a8").encode(x=f"{x}:Q", y=f"{mid}:Q", tooltip=[x, mid, low, high])
    layers = [area, line]
    if observed is not None and not observed.empty:
        layers.append(alt.Chart(observed).mark_line(strokeDash=[2, 2]).encode(
            x=f"{x}:Q", y=f"{observed_y}:Q", color=alt.Color(f"{color}:N", title="observed",
                                                            legend=alt.Legend(orient="bottom")),
            tooltip=[x, observed_y, color]))
    if rules is not None and not rules.empty:
        layers.append(drift_rules(rules, x))
    return alt.layer(*layers).properties(title=title, height=HEIGHT).interactive(bind_y=False)


def heatmap(df: pd.DataFrame, x: str, y: str, value: str, *, title: str = "", x_title: str = "trace time (s)",
            y_sort: Sequence[str] | None = None) -> alt.Chart:
    return alt.Chart(df).mark_rect().encode(
        x=alt.X(f"{x}:O", title=x_title, axis=alt.Axis(labelOverlap=True)),
        y=alt.Y(f"{y}:N", title=None, sort=list(y_sort) if y_sort is not None else "ascending"),
        color=alt.Color(f"{value}:Q", scale=alt.Scale(scheme="orangered", domain=[0, 1]), title=value),
        tooltip=[y, x, alt.Tooltip(f"{value}:Q", format=".2f"), *[c for c in df.columns if c not in (x, y, value)]],
    ).properties(title=title, height=max(HEIGHT, 14 * df[y].nunique()))


def bars(df: pd.DataFrame, x: str, y: str, color: str | None = None, *, title: str = "",
         horizontal: bool = False, sort: str | None = "-x") -> alt.Chart:
    if horizontal:
        enc = {"y": alt.Y(f"{y}:N", sort=sort, title=None), "x": alt.X(f"{x}:Q")}
    else:
        enc = {"x": alt.X(f"{x}:N", sort=None), "y": alt.Y(f"{y}:Q")}
    if color:
        enc["color"] = alt.Color(f"{color}:N", legend=alt.Legend(orient="bottom"))
    return alt.Chart(df).mark_bar().encode(**enc, tooltip=list(df.columns)).properties(
        title=title, height=max(HEIGHT if not horizontal else 120, 18 * len(df) if horizontal else 0))


def auto(df: pd.DataFrame, x: str, y: str, color: str | None, kind: str) -> alt.Chart:
    """Query page: a chart of any result (line, bar or point), types inferred from the data."""
    def typ(col: str) -> str:
        s = df[col]
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            return "Q"
        if pd.api.types.is_datetime64_any_dtype(s):
            return "T"
        return "N"
    mark = {"line": "mark_line", "bar": "mark_bar", "point": "mark_point"}[kind]
    enc = {"x": alt.X(f"{x}:{typ(x)}"), "y": alt.Y(f"{y}:{typ(y)}"), "tooltip": list(df.columns)[:8]}
    if color:
        enc["color"] = alt.Color(f"{color}:N")
    return getattr(alt.Chart(df), mark)().encode(**enc).properties(height=HEIGHT + 40).interactive()
