"""SQL of the Adapters page: per-adapter load and starvation from ``windows.adapters`` (one struct per
adapter and window), adapter loads per window, and per-adapter request load from ``telemetry``."""

from __future__ import annotations

_PER_ADAPTER = """
per_adapter AS (
    SELECT window_start, window_end, a.adapter_id AS adapter_id, a.offered_tokens AS offered,
           a.completed_tokens AS completed, a.starvation_ratio AS ratio
    FROM (SELECT window_start, window_end, unnest(adapters) AS a FROM windows
          WHERE scope = 'window' AND run_id = ? AND backend = ?))
"""

# every adapter's totals over the run, most starved first (starvation = 1 - completed / offered)
TOTALS = f"""
WITH {_PER_ADAPTER}
SELECT adapter_id, sum(offered) AS offered_tokens, sum(completed) AS completed_tokens,
       greatest(0.0, 1 - sum(completed) / nullif(sum(offered), 0)) AS starvation_ratio,
       count(*) FILTER (WHERE ratio >= 0.1) AS starved_windows, count(*) AS active_windows
FROM per_adapter GROUP BY adapter_id
ORDER BY starvation_ratio DESC NULLS LAST, offered_tokens DESC
"""

# starvation heatmap: the ? busiest adapters x time buckets (at most ? buckets over the run)
HEATMAP = f"""
WITH {_PER_ADAPTER},
top AS (SELECT adapter_id FROM per_adapter GROUP BY 1 ORDER BY sum(offered) DESC, adapter_id LIMIT ?),
b AS (SELECT greatest((max(window_end) - min(window_start)) / ?, max(window_end - window_start)) AS w,
             min(window_start) AS t0 FROM per_adapter)
SELECT adapter_id, round(b.t0 + floor((window_start - b.t0) / b.w) * b.w) AS t,
       sum(offered) AS offered_tokens, sum(completed) AS completed_tokens,
       greatest(0.0, 1 - sum(completed) / nullif(sum(offered), 0)) AS starvation_ratio
FROM per_adapter JOIN top USING (adapter_id), b
GROUP BY ALL ORDER BY adapter_id, t
"""

# adapter loads and distinct active adapters per window
LOADS = """
SELECT window_end, adapter_loads, len(adapters) AS active_adapters, served, max_loras
FROM windows WHERE scope = 'window' AND run_id = ? AND backend = ?
ORDER BY window_end
"""

# request load per adapter from telemetry (works before any window arrives)
TELEMETRY = """
SELECT adapter_id, count(*) AS requests, sum(prompt_tokens + output_tokens) AS tokens,
       count(*) FILTER (WHERE NOT finished) AS unfinished, quantile_cont(ttft_ms, 0.99) AS ttft_p99_ms
FROM telemetry WHERE run_id = ? AND backend = ?
GROUP BY adapter_id ORDER BY tokens DESC
LIMIT ?
"""
