"""Example statements the Query page offers (each runs on an empty lake as well)."""

from __future__ import annotations

EXAMPLES: dict[str, str] = {
    "Throughput per run and configuration":
        "SELECT run_id, backend, served, max_loras, count(*) AS windows,\n"
        "       round(avg(throughput), 1) AS mean_tok_s, round(avg(starvation_ratio), 3) AS starvation\n"
        "FROM windows WHERE scope = 'window'\nGROUP BY ALL ORDER BY run_id, backend",
    "TTFT percentiles per minute":
        "SELECT run_id, floor(ts / 60) * 60 AS minute,\n"
        "       quantile_cont(ttft_ms, 0.5) AS ttft_p50, quantile_cont(ttft_ms, 0.99) AS ttft_p99\n"
        "FROM telemetry GROUP BY ALL ORDER BY run_id, minute",
    "Busiest adapters (requests)":
        "SELECT adapter_id, count(*) AS requests, sum(prompt_tokens + output_tokens) AS tokens\n"
        "FROM requests GROUP BY adapter_id ORDER BY requests DESC LIMIT 20",
    "Most starved adapters (windows)":
        "SELECT a.adapter_id, sum(a.offered_tokens) AS offered, sum(a.completed_tokens) AS completed,\n"
        "       1 - sum(a.completed_tokens) / nullif(sum(a.offered_tokens), 0) AS starvation\n"
        "FROM (SELECT unnest(adapters) AS a FROM windows WHERE scope = 'window')\n"
        "GROUP BY 1 ORDER BY starvation DESC LIMIT 20",
    "Latest recommendation per run":
        "SELECT run_id, arg_max(served, window_end) AS served, arg_max(max_loras, window_end) AS max_loras,\n"
        "       arg_max(predicted_throughput, window_end) AS predicted_tok_s, max(window_end) AS at_s\n"
        "FROM recommendations WHERE kind = 'recommendation' GROUP BY run_id",
    "Dead letters by reason":
        "SELECT stage, reason, count(*) AS rows FROM deadletter GROUP BY ALL ORDER BY rows DESC",
    "Requests per second of trace time":
        "SELECT run_id, floor(ts) AS second, count(*) AS requests\n"
        "FROM requests GROUP BY ALL ORDER BY run_id, second",
}
