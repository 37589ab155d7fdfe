"""Small UI helpers the pages share: problem and empty-lake messages, pickers, number formatting."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd
import streamlit as st

from adaptwin.cliutil import UserError
from adaptwin.dashboard.data import LakeProblem

FILL_HINTS = {
    "requests": "adaptwin ingest --trace azure-conv --adapters 64 && adaptwin sink --idle-exit 5",
    "telemetry": "adaptwin replay --backend twin … && adaptwin sink --idle-exit 5",
    "windows": "adaptwin replay --backend twin … && adaptwin sink --idle-exit 5",
    "recommendations": "adaptwin learn … && adaptwin sink --idle-exit 5",
    "deadletter": "(rows appear here when ingest, replay, sink or the learner refuse a record)",
}


def problem(err: Exception) -> None:
    """Show a lake problem or a refused query as a message the operator can act on (no traceback)."""
    if isinstance(err, LakeProblem):
        st.error(str(err), icon="⚠️")
        if err.hint:
            st.caption(err.hint)
        if err.files:
            st.code("\n".join(err.files), language=None)
    else:
        st.error(str(err), icon="⛔")


@contextmanager
def guarded() -> Iterator[None]:
    """Render the block's data, or a message instead of a traceback when the lake cannot answer."""
    try:
        yield
    except (LakeProblem, UserError) as err:
        problem(err)


def empty(table: str, lake: Path, what: str = "") -> None:
    """The message a page shows when the table it needs has no rows (yet)."""
    st.info(f"No {what or table} in the lake at `{lake}` yet. The `{table}` table fills when this runs:\n\n"
            f"`{FILL_HINTS[table]}`", icon="ℹ️")


def series_label(run_id: str, backend: str) -> str:
    return f"{run_id} · {backend}"


def fmt(value: object, digits: int = 1, unit: str = "") -> str:
    """A metric value: thousands separators, fixed decimals, '—' for missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "—"
    if isinstance(value, (int,)) or (isinstance(value, float) and value.is_integer() and digits == 0):
        text = f"{int(value):,}"
    else:
        text = f"{float(value):,.{digits}f}"
    return f"{text} {unit}".rstrip()


def fmt_age(seconds: float | None) -> str:
    if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def fragment(body, run_every: float | None, *args) -> None:
    """Run ``body(*args)`` as a Streamlit fragment that reruns itself every ``run_every`` seconds.

    Only the fragment reruns (not the page); AppTest does not tick ``run_every``, so tests call ``.run()``.
    """
    st.fragment(body, run_every=run_every)(*args)


def auto_refresh() -> float | None:
    """The live refresh period chosen in the sidebar (None: paused)."""
    return st.session_state.get("refresh_every")
