"""SQL of the Live page: per (run, backend) time series from ``windows``, latency percentiles from ``telemetry``."""

from __future__ import annotations

# the selected runs' windows, oldest first
WINDOWS = """
SELECT run_id, backend, run_id || ' · ' || backend AS series, window_start, window_end,
       throughput, offered_tokens, completed_tokens, starvation_ratio, starved, arrivals, finished,
       running, waiting, kv_usage, adapter_loads, served, max_loras, mean_ttft_ms, mean_itl_ms
FROM windows
WHERE scope = 'window' AND list_contains(?, run_id)
ORDER BY run_id, backend, window_end
"""

# TTFT / ITL percentiles per time bucket (bucket = the span / ?, at least ? s), by arrival time
LATENCY = """
WITH t AS (
    SELECT run_id, backend, ts, ttft_ms, itl_ms FROM telemetry WHERE list_contains(?, run_id)),
b AS (SELECT greatest(?, (max(ts) - min(ts)) / ?) AS w FROM t),
q AS (
    SELECT run_id, backend, floor(ts / b.w) * b.w AS t, count(*) AS requests,
           quantile_cont(ttft_ms, [0.5, 0.9, 0.99]) AS ttft, quantile_cont(itl_ms, [0.5, 0.9, 0.99]) AS itl
    FROM t, b GROUP BY ALL)
SELECT run_id, backend, run_id || ' · ' || backend AS series, t, requests,
       ttft[1] AS ttft_p50, ttft[2] AS ttft_p90, ttft[3] AS ttft_p99,
       itl[1] AS itl_p50, itl[2] AS itl_p90, itl[3] AS itl_p99
FROM q ORDER BY run_id, backend, t
"""

# whole-run request totals and latency percentiles of the selected runs
TOTALS = """
WITH q AS (
    SELECT run_id, backend, count(*) AS requests, count(*) FILTER (WHERE finished) AS finished,
           count(*) FILTER (WHERE error IS NOT NULL) AS errors, sum(preempted) AS preemptions,
           sum(prompt_tokens + output_tokens) FILTER (WHERE finished) AS completed_tokens,
           quantile_cont(ttft_ms, [0.5, 0.99]) AS ttft, quantile_cont(itl_ms, [0.5, 0.99]) AS itl
    FROM telemetry WHERE list_contains(?, run_id) GROUP BY ALL)
SELECT * EXCLUDE (ttft, itl), ttft[1] AS ttft_p50, ttft[2] AS ttft_p99, itl[1] AS itl_p50, itl[2] AS itl_p99
FROM q ORDER BY run_id, backend
"""
