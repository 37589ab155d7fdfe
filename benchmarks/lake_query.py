"""`adaptwin query` on a 10 M-row telemetry lake: a group-by must answer in < 1 s (issue: Foundation).

    python -m benchmarks.lake_query [--rows 10000000]

Times the whole `catalog.query` call (connect, build views, run) as the CLI does it, best and median of 5.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from adaptwin.ingest import catalog
from benchmarks.lakegen import telemetry_lake

QUERIES = {
    "group-by adapter": "select adapter_id, count(*) n, avg(ttft_ms) ttft, sum(prompt_tokens + output_tokens) tok "
                        "from telemetry group by 1 order by n desc limit 10",
    "group-by run, minute": "select run_id, floor(ts / 60) m, quantile_cont(ttft_ms, 0.99) p99 from telemetry "
                            "group by 1, 2",
    "count": "select count(*) from telemetry",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--lake", type=Path, default=None, help="reuse/generate the lake here")
    args = ap.parse_args()
    root = args.lake or Path(tempfile.mkdtemp(prefix="adaptwin-lake-"))
    if not (root / "telemetry").exists():
        t0 = time.perf_counter()
        n_files = telemetry_lake(root, args.rows)
        print(f"generated {args.rows:,} telemetry rows in {n_files} files in {time.perf_counter() - t0:.1f} s")
    rows = catalog.query(root, "select count(*) n from telemetry").column("n")[0].as_py()
    print(f"lake {root}: {rows:,} telemetry rows")
    for name, sql in QUERIES.items():
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            catalog.query(root, sql)
            times.append(time.perf_counter() - t0)
        print(f"{name:24s} best {min(times):.3f} s  median {statistics.median(times):.3f} s  (target < 1 s)")


if __name__ == "__main__":
    main()
