"""SQL of the Recommendations page: the learner's output (``recommendations``, kind ``recommendation`` or
``drift``) next to what the run actually did (``windows``).

The learner's error is scored prequentially: each window is compared with the latest prediction issued
before it started (ASOF join on ``recommendations.window_end <= windows.window_start``), and only when
the window ran the predicted configuration (same ``served`` and ``max_loras``); otherwise the prediction
is about a configuration nobody ran and there is nothing to score it against.
"""

from __future__ import annotations

from adaptwin.dashboard.sql_common import half_smape

# runs with recommendations, newest first
RUNS = """
SELECT run_id, count(*) FILTER (WHERE kind = 'recommendation') AS recommendations,
       count(*) FILTER (WHERE kind = 'drift') AS drift_events, max(window_end) AS last_window_end,
       max(date) AS last_date
FROM recommendations GROUP BY run_id ORDER BY last_date DESC, run_id DESC
"""

LATEST = """
SELECT window_end, served, max_loras, predicted_throughput, interval_low, interval_high, starvation_prob,
       model, model_version, changed, asked_twin, reason
FROM recommendations WHERE run_id = ? AND kind = 'recommendation'
ORDER BY window_end DESC, model_version DESC LIMIT 1
"""

# the configuration each backend of the run ran in its latest window
CURRENT = """
SELECT backend, arg_max(served, window_end) AS served, arg_max(max_loras, window_end) AS max_loras,
       arg_max(throughput, window_end) AS throughput, max(window_end) AS window_end
FROM windows WHERE scope = 'window' AND run_id = ? GROUP BY backend ORDER BY backend
"""

PREDICTIONS = """
SELECT window_end, predicted_throughput, interval_low, interval_high, served, max_loras, starvation_prob,
       changed, model_version
FROM recommendations WHERE run_id = ? AND kind = 'recommendation' ORDER BY window_end
"""

OBSERVED = """
SELECT window_end, backend, throughput, served, max_loras
FROM windows WHERE scope = 'window' AND run_id = ? ORDER BY window_end
"""

ERROR = f"""
WITH r AS (SELECT run_id, window_end, predicted_throughput, interval_low, interval_high, served, max_loras
           FROM recommendations
           WHERE run_id = ? AND kind = 'recommendation' AND predicted_throughput IS NOT NULL),
w AS (SELECT run_id, backend, window_start, window_end, throughput, served, max_loras
      FROM windows WHERE scope = 'window' AND run_id = ?),
scored AS (
    SELECT w.backend, w.window_end, w.throughput AS observed, r.predicted_throughput AS predicted,
           r.interval_low, r.interval_high,
           {half_smape('w.throughput', 'r.predicted_throughput')} OVER (
               PARTITION BY w.backend ORDER BY w.window_end ROWS BETWEEN 9 PRECEDING AND CURRENT ROW)
               AS rolling_half_smape,
           abs(w.throughput - r.predicted_throughput) AS abs_error,
           w.throughput BETWEEN r.interval_low AND r.interval_high AS inside
    FROM w ASOF JOIN r ON w.run_id = r.run_id AND w.window_start >= r.window_end
    WHERE w.served = r.served AND w.max_loras = r.max_loras)
SELECT * FROM scored ORDER BY backend, window_end
"""

DRIFT = """
SELECT window_end, model, model_version, reason FROM recommendations
WHERE run_id = ? AND kind = 'drift' ORDER BY window_end
"""
