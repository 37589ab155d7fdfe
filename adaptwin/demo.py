"""``adaptwin demo``: the main job end to end on a real public trace, with what exists of the pipeline.

Today: the Azure conversation trace (adapters assigned by a Zipf popularity law) → validation →
Kafka → replay through the twin (served 64, max_loras 16) → telemetry and windows → exactly-once lake
sink → a DuckDB summary. The learner and the dashboard join as the end-to-end issue lands.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from adaptwin.cliutil import render_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    bootstrap: str
    lake: Path
    trace: str = "azure-conv"
    adapters: int = 64
    popularity: str = "zipf:1.1"
    ranks: tuple[int, ...] = (8, 16, 32)
    limit: int | None = None
    seed: int = 0
    served: int = 64
    max_loras: int = 16


SUMMARY_SQL = {
    "requests in the lake, by run": "select run_id, count(*) as requests, round(avg(prompt_tokens), 1) as mean_prompt, "
                                    "round(avg(output_tokens), 1) as mean_output, round(max(ts), 1) as span_s "
                                    "from requests where run_id = '{run}' group by 1",
    "busiest adapters": "select adapter_id, adapter_rank, count(*) as requests, "
                        "round(count(*) / (max(ts) - min(ts) + 1e-9), 3) as rate_per_s "
                        "from requests where run_id = '{run}' group by 1, 2 order by requests desc limit 8",
    "replay through the twin, by window (first 10)":
        "select window_start, window_end, arrivals, finished, round(throughput, 1) as throughput, "
        "round(starvation_ratio, 3) as starvation, starved, round(running, 1) as running, "
        "round(waiting, 1) as waiting, round(kv_usage, 3) as kv_usage from windows "
        "where run_id = '{run}-twin' and scope = 'window' order by window_start limit 10",
    "replay run summary":
        "select served, max_loras, arrivals, finished, round(throughput, 1) as throughput, "
        "round(starvation_ratio, 3) as starvation, starved, round(mean_ttft_ms, 1) as mean_ttft_ms, "
        "round(mean_itl_ms, 2) as mean_itl_ms, adapter_loads from windows "
        "where run_id = '{run}-twin' and scope = 'run'",
    "dead letters by reason": "select split_part(reason, ':', 1) as reason, count(*) as rows from deadletter "
                              "where run_id = '{run}' group by 1 order by rows desc",
}


def run(config: DemoConfig) -> str:
    """Run the demo; returns the run id. Progress goes to stderr, the summary to stdout."""
    from adaptwin.ingest import catalog, producer, source
    from adaptwin.ingest.sink import LakeSink, SinkConfig
    from adaptwin.kafka import ensure_topics, wait_for_broker

    run_id = f"demo-{time.strftime('%Y%m%dT%H%M%S')}"
    wait_for_broker(config.bootstrap, 60)
    ensure_topics(config.bootstrap)
    report = producer.produce(source.IngestConfig(
        trace=config.trace, adapters=config.adapters, popularity=config.popularity, ranks=config.ranks,
        seed=config.seed, run_id=run_id, max_rows=config.limit), config.bootstrap)
    print(f"ingest  {report.accepted:,} requests of {config.trace} → Kafka in {report.wall_s:.1f} s "
          f"({report.requests_per_s:,.0f} req/s), {report.dead_lettered} dead-lettered")
    t0 = time.perf_counter()
    replay = subprocess.run([sys.executable, "-m", "adaptwin", "replay", "--run-id-in", run_id, "--run-id",
                             f"{run_id}-twin", "--served", str(config.served), "--max-loras", str(config.max_loras),
                             "--bootstrap", config.bootstrap, "--json", "--no-progress"],
                            stdout=subprocess.PIPE, text=True)
    if replay.returncode:
        raise RuntimeError(f"the replay failed (exit status {replay.returncode}); see its log above")
    summary = json.loads(replay.stdout.strip().splitlines()[-1])
    print(f"replay  twin, served {config.served}, max_loras {config.max_loras}: "
          f"{summary.get('total_throughput', 0):,.0f} tok/s, starved={summary.get('starved')} "
          f"in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    stats = LakeSink(SinkConfig(config.bootstrap, config.lake, group_id="adaptwin-demo-sink",
                                idle_exit_s=3.0)).run()
    print(f"sink    {stats.rows:,} rows → {config.lake} in {stats.files} Parquet files "
          f"({time.perf_counter() - t0:.1f} s incl. 3 s idle wait)")
    for title, sql in SUMMARY_SQL.items():
        print(f"\n{title}\n" + render_table(catalog.query(config.lake, sql.format(run=run_id)), 20))
    print(f"\nquery the lake yourself:  adaptwin query \"select * from requests where run_id = '{run_id}' limit 5\""
          f" --lake {config.lake}")
    print(f"watch it in the dashboard:  adaptwin dashboard --lake {config.lake}   (http://127.0.0.1:8501)")
    return run_id
