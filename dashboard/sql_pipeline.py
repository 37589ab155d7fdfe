"""SQL of the Pipeline page: dead letters and row counts (file sizes and freshness come from the file
system, ``lakefs.py``; consumer lag from Kafka, ``kafka_status.py``)."""

from __future__ import annotations

# reasons embed the offending value ("… got 'abc'"); group on the text before it, keep one example
DEADLETTER_BY_REASON = r"""
SELECT stage, regexp_replace(reason, ',? got .*$', '') AS reason, count(*) AS rows,
       count(DISTINCT run_id) AS runs, any_value(reason) AS example, max(date) AS last_date
FROM deadletter GROUP BY ALL ORDER BY rows DESC, reason
"""

DEADLETTER_BY_RUN = """
SELECT run_id, stage, count(*) AS rows, max(date) AS last_date
FROM deadletter GROUP BY ALL ORDER BY last_date DESC, rows DESC LIMIT 50
"""

ROWS = " UNION ALL ".join(
    f"SELECT '{t}' AS \"table\", count(*) AS rows FROM {t}"
    for t in ("requests", "telemetry", "windows", "recommendations", "deadletter"))
