"""SQL of the Twin-vs-real page: the same trace replayed on the twin and on a real server, window by
window (windows aligned on ``window_start`` and configuration), and the error table with the
benchmarks' half-sMAPE."""

from __future__ import annotations

from adaptwin.dashboard.sql_common import half_smape

# (run_id, backend) candidates with their window count and span
SERIES = """
SELECT run_id, backend, count(*) AS windows, min(window_start) AS first_s, max(window_end) AS last_s,
       max(date) AS last_date, string_agg(DISTINCT served || '/' || max_loras, ', ') AS configs
FROM windows WHERE scope = 'window' GROUP BY ALL
ORDER BY last_date DESC, run_id DESC, backend
"""

METRICS = {  # column -> label; compared window by window
    "throughput": "throughput (tok/s)",
    "completed_tokens": "completed tokens",
    "finished": "finished requests",
    "mean_ttft_ms": "mean TTFT (ms)",
    "mean_itl_ms": "mean ITL (ms)",
    "starvation_ratio": "starvation ratio",
    "running": "running (mean)",
    "waiting": "waiting (mean)",
    "kv_usage": "KV usage",
    "adapter_loads": "adapter loads",
}

_SIDES = """
twin AS (SELECT * FROM windows WHERE scope = 'window' AND run_id = ? AND backend = ?),
real AS (SELECT * FROM windows WHERE scope = 'window' AND run_id = ? AND backend = ?)
"""

OVERLAY = f"""
WITH {_SIDES}
SELECT coalesce(twin.window_start, real.window_start) AS window_start,
       coalesce(twin.window_end, real.window_end) AS window_end,
       coalesce(twin.served, real.served) AS served, coalesce(twin.max_loras, real.max_loras) AS max_loras,
       {", ".join(f"twin.{m} AS twin_{m}, real.{m} AS real_{m}" for m in METRICS)}
FROM twin FULL JOIN real USING (window_start, served, max_loras)
ORDER BY window_start
"""

ERRORS = f"""
WITH {_SIDES}
{" UNION ALL ".join(
    f"SELECT '{label}' AS metric, count(twin.{m}) FILTER (WHERE real.{m} IS NOT NULL) AS windows, "
    f"avg(twin.{m}) AS twin_mean, avg(real.{m}) AS real_mean, "
    f"{half_smape(f'twin.{m}', f'real.{m}')} AS half_smape_pct, "
    f"2 * {half_smape(f'twin.{m}', f'real.{m}')} AS smape_pct FROM twin JOIN real USING (window_start, served, max_loras)"
    for m, label in METRICS.items())}
"""

# whole-run rows (scope = 'run'), the pairs the twin-fidelity benchmark compares
RUN_SCOPE = f"""
WITH twin AS (SELECT * FROM windows WHERE scope = 'run' AND run_id = ? AND backend = ?),
real AS (SELECT * FROM windows WHERE scope = 'run' AND run_id = ? AND backend = ?)
SELECT served, max_loras, twin.throughput AS twin_throughput, real.throughput AS real_throughput,
       {half_smape('twin.throughput', 'real.throughput')} AS half_smape_pct,
       twin.starved AS twin_starved, real.starved AS real_starved,
       twin.mean_ttft_ms AS twin_ttft_ms, real.mean_ttft_ms AS real_ttft_ms
FROM twin JOIN real USING (served, max_loras) GROUP BY ALL ORDER BY served, max_loras
"""
