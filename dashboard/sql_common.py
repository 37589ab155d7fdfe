"""SQL pieces several pages use. Every page's SQL lives in its ``sql_<page>.py`` module, over the catalog's
views (``requests``, ``telemetry``, ``windows``, ``recommendations``, ``deadletter``); run filters are
bound parameters (``?``), never pasted text."""

from __future__ import annotations


def half_smape(a: str, b: str) -> str:
    """The benchmarks' error metric (paper Table 1; shared/data/README.md): half-sMAPE in %,
    ``100 · mean(|a − b| / (|a| + |b|))``, a pair of zeros counting 0; rows where either side is NULL are
    left out. Textbook sMAPE is twice this value."""
    return (f"100 * avg(CASE WHEN abs({a}) + abs({b}) = 0 THEN 0.0 "
            f"ELSE abs({a} - {b}) / (abs({a}) + abs({b})) END)")


def half_smape_py(actual, predicted) -> float:
    """The same definition in Python (tests check the SQL against it)."""
    pairs = [(a, p) for a, p in zip(actual, predicted) if a is not None and p is not None]
    if not pairs:
        return float("nan")
    return 100 * sum(0.0 if abs(a) + abs(p) == 0 else abs(a - p) / (abs(a) + abs(p)) for a, p in pairs) / len(pairs)


# (run_id, backend) series with windows, and runs with telemetry (their backend is NULL here: grouping
# 10 M telemetry rows by backend costs a scan, by the run_id partition column almost nothing), newest first
RUNS = """
WITH w AS (
    SELECT run_id, backend, count(*) AS windows, max(window_end) AS trace_s, max(date) AS last_date,
           arg_max(served, window_end) AS served, arg_max(max_loras, window_end) AS max_loras
    FROM windows WHERE scope = 'window' GROUP BY ALL),
t AS (SELECT run_id, count(*) AS requests, max(date) AS last_date FROM telemetry GROUP BY run_id)
SELECT run_id, w.backend, coalesce(w.windows, 0) AS windows, coalesce(t.requests, 0) AS run_requests,
       w.trace_s, greatest(w.last_date, t.last_date) AS last_date, w.served, w.max_loras
FROM w FULL JOIN t USING (run_id)
ORDER BY last_date DESC NULLS LAST, run_id DESC, backend
"""

# backends of runs that have telemetry but no windows yet
TELEMETRY_BACKENDS = """
SELECT DISTINCT run_id, backend FROM telemetry WHERE list_contains(?, run_id) ORDER BY run_id, backend
"""
