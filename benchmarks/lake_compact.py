"""`adaptwin lake compact` on a lake of sink-sized small files: files, time, and query speed before/after.

    python -m benchmarks.lake_compact [--files 2000] [--rows-per-file 500]

The lake looks like a long sink run (one small telemetry file per 2-s batch, one Kafka partition, one run);
compaction is given every offset as committed. Prints the numbers and one JSON line; the query results
before and after must be equal (checked).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from adaptwin.config import TOPICS
from adaptwin.ingest import catalog, lake, maintenance
from benchmarks.lakegen import telemetry_table

QUERY = ("select adapter_id, count(*) n, avg(ttft_ms) ttft, sum(prompt_tokens + output_tokens) tok "
         "from telemetry group by 1 order by 1")


def small_file_lake(root: Path, files: int, rows_per_file: int, seed: int = 0) -> int:
    """``files`` telemetry files of ``rows_per_file`` rows as the sink names them; returns the next offset."""
    rng = np.random.default_rng(seed)
    today = dt.datetime.now(dt.timezone.utc).date()
    offset = 0
    for i in range(files):
        n = rows_per_file
        ts = np.sort(rng.uniform(2 * i, 2 * i + 2, n))
        table = telemetry_table(rng, n, "bench", i * n, rng.integers(0, 64, n), ts, served=64, max_loras=16,
                                max_output=512)
        # a sink batch is a few Kafka messages; offsets leave gaps as other runs' messages would
        lake.write_atomic(table, lake.file_path(root, "telemetry", "bench", today, 0, offset, offset + 9))
        offset += 12
    return offset


def _time_query(root: Path) -> tuple[float, list[dict]]:
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        result = catalog.query(root, QUERY).to_pylist()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--rows-per-file", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="adaptwin-compact-") as tmp:
        root = Path(tmp)
        end = small_file_lake(root, args.files, args.rows_per_file)
        before_s, before = _time_query(root)
        t0 = time.perf_counter()
        report = maintenance.compact(maintenance.CompactConfig(root, "unused:0", tables=("telemetry",)),
                                     committed={(TOPICS.telemetry, 0): end})
        compact_s = time.perf_counter() - t0
        after_s, after = _time_query(root)
        # float sums depend on the order DuckDB adds them in: compare to 1e-9 relative
        same = len(before) == len(after) and all(
            a.keys() == b.keys() and all(a[k] == b[k] if not isinstance(a[k], float)
                                         else abs(a[k] - b[k]) <= 1e-9 * max(1.0, abs(a[k])) for k in a)
            for a, b in zip(before, after))
        assert same, "compaction changed a query result"
        out = {"files_before": report.files_before, "files_after": report.files_after,
               "rows": args.files * args.rows_per_file, "compact_s": round(compact_s, 2),
               "query_before_s": round(before_s, 3), "query_after_s": round(after_s, 3),
               "query_speedup": round(before_s / after_s, 1)}
    print(f"{out['rows']:,} telemetry rows: {out['files_before']} files -> {out['files_after']} in "
          f"{out['compact_s']} s; group-by query (whole `adaptwin query` call, median of 5) "
          f"{out['query_before_s']} s -> {out['query_after_s']} s ({out['query_speedup']}x), results equal")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
