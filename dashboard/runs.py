"""Which (run, backend) series exist, newest first: the pickers every page shares."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from adaptwin.dashboard import data, lakefs, sql_common


def series(root: Path) -> pd.DataFrame:
    """run_id, backend, windows, run_requests, trace_s, served, max_loras, series; newest file first."""
    df = data.frame(root, sql_common.RUNS).copy()
    if df.empty:
        return df
    no_windows = df[df["backend"].isna()]
    if not no_windows.empty:  # telemetry only (so far): ask telemetry for those runs' backends
        backends = data.frame(root, sql_common.TELEMETRY_BACKENDS, [sorted(no_windows["run_id"])])
        filled = no_windows.drop(columns="backend").merge(backends, on="run_id")
        df = pd.concat([df[df["backend"].notna()], filled], ignore_index=True)
    newest = lakefs.newest_per_run(root)
    df["mtime"] = df["run_id"].map(lambda r: newest.get(r, 0.0))
    df["series"] = df["run_id"] + " · " + df["backend"]
    return df.sort_values(["mtime", "run_id", "backend"], ascending=[False, False, True], kind="stable") \
        .reset_index(drop=True)


def run_ids(df: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(df["run_id"]))
