"""Dashboard page render time on a 10 M-row telemetry lake: every page must render in ≤ 2 s (issue 8).

    python -m benchmarks.dashboard_render [--rows 10000000] [--lake DIR] [--out FILE]

The lake: ``benchmarks.lakegen`` telemetry (4 runs, 10 M rows in 500 k-row files) plus, for each of those
runs, windows from the twin and from a "real" backend (360 ten-second windows each, with per-adapter rows
for 256 adapters), recommendations with drift events and dead letters (tests/dashboard/lakedata.py).

Each page is rendered by Streamlit's AppTest (the whole script: queries, pandas, Altair specs, protobuf),
which is what a browser waits for minus the network and the browser's own drawing:
- cold: a fresh DuckDB connection and empty caches (the first visitor after a start),
- miss: caches empty, connection kept (a visitor after the TTL expired: the live refresh case),
- warm: results cached (another visitor or a rerun within the TTL).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

PAGES = ["page_live", "page_live+percentiles", "page_adapters", "page_recommendations", "page_compare", "page_query",
         "page_pipeline"]
# "page+key": the page with the session-state toggle ``key`` on (Live's per-bucket percentiles: its extra scan)
TOGGLES = {"percentiles": "live_percentiles"}
TARGET_S = 2.0


def _lakedata():
    path = Path(__file__).resolve().parent.parent / "tests" / "dashboard" / "lakedata.py"
    spec = importlib.util.spec_from_file_location("dashboard_lakedata", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def build_lake(root: Path, rows: int) -> None:
    from benchmarks.lakegen import telemetry_lake

    lakedata = _lakedata()
    t0 = time.perf_counter()
    files = telemetry_lake(root, rows)
    print(f"telemetry: {rows:,} rows in {files} files, {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    for k in range(4):
        run = f"bench-{k}"
        trace = lakedata.make_trace(60_000, 3600.0, adapters=256, seed=k)
        for backend in ("twin", "vllm"):
            rep = lakedata.simulate(trace, run, backend, served=128, max_loras=32, window_s=10.0, seed=k)
            lakedata.write(root, "windows", rep.windows, run)
            if backend == "twin":
                lakedata.write(root, "recommendations", lakedata.recommendations(rep.windows, seed=k), run)
        lakedata.write(root, "deadletter", lakedata.deadletters(run, 500, seed=k), run)
    print(f"windows/recommendations/deadletter: {time.perf_counter() - t0:.1f} s", flush=True)


def render(page: str, timeout: float = 120.0) -> float:
    from streamlit.testing.v1 import AppTest

    page, _, toggle = page.partition("+")
    at = AppTest.from_string(f"from adaptwin.dashboard import {page}\n{page}.render()\n", default_timeout=timeout)
    if toggle:
        at.session_state[TOGGLES[toggle]] = True
    t0 = time.perf_counter()
    at.run()
    took = time.perf_counter() - t0
    if at.exception:
        raise RuntimeError(f"{page} raised: {at.exception[0].value}")
    problems = [e.value for e in at.error]
    if problems:
        raise RuntimeError(f"{page} showed errors: {problems}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--lake", type=Path, default=None, help="reuse/generate the lake here")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write a Markdown table here")
    args = ap.parse_args()
    root = (args.lake or Path(tempfile.mkdtemp(prefix="adaptwin-dash-lake-"))).resolve()
    if not (root / "telemetry").exists():
        build_lake(root, args.rows)
    os.environ["ADAPTWIN_LAKE"] = str(root)
    os.environ["ADAPTWIN_BOOTSTRAP"] = "127.0.0.1:1"  # no broker: the Pipeline page's lag probe fails fast

    import logging

    import streamlit as st
    from adaptwin.ingest import catalog

    logging.getLogger("streamlit").setLevel(logging.ERROR)
    n = catalog.query(root, "select count(*) n from telemetry").column("n")[0].as_py()
    print(f"lake {root}: {n:,} telemetry rows", flush=True)
    for page in PAGES:  # import every module once (altair, pandas, …): not a page's render time
        render(page)
    load = os.getloadavg()
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}", flush=True)
    results = {}
    for page in PAGES:
        cold, miss, warm = [], [], []
        for _ in range(args.repeat):
            st.cache_resource.clear()
            st.cache_data.clear()
            cold.append(render(page))
            st.cache_data.clear()
            miss.append(render(page))
            warm.append(render(page))
        results[page] = (statistics.median(cold), statistics.median(miss), statistics.median(warm), max(cold))
        c, m, w, worst = results[page]
        print(f"{page:26s} cold {c:.2f} s (worst {worst:.2f})  miss {m:.2f} s  warm {w:.2f} s  "
              f"{'OK' if worst <= TARGET_S else 'OVER ' + str(TARGET_S)}", flush=True)
    if args.out:
        lines = [
            "# Dashboard render times (issue 8)",
            "",
            f"`python -m benchmarks.dashboard_render --rows {args.rows}`; {n:,} telemetry rows; "
            f"{platform.python_version()}, {os.cpu_count()} CPUs (shared, load average {load[0]:.1f} before, "
            f"{os.getloadavg()[0]:.1f} after), median of {args.repeat}; "
            "AppTest render of the whole page script (queries + pandas + chart specs), target ≤ 2 s.",
            "",
            "| page | cold (new connection, empty cache) | worst cold | cache miss (TTL expired) | warm (cached) |",
            "|---|---|---|---|---|",
        ]
        for page, (c, m, w, worst) in results.items():
            lines.append(f"| {page.removeprefix('page_')} | {c:.2f} s | {worst:.2f} s | {m:.2f} s | {w:.2f} s |")
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
