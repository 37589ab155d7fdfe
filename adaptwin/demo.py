"""``adaptwin demo``: the whole pipeline end to end on a real public trace.

The Azure conversation trace (adapters assigned by a Zipf popularity law) → validation → Kafka → replay through
the twin (served 64, max_loras 16) → telemetry and windows → the online learner → recommendations → exactly-once
lake sink → a DuckDB summary → the dashboard, until Ctrl-C.

Every process the demo starts (a local broker when none answers, the replay, the learner, the dashboard) is its
child and is stopped when it ends, normally or by Ctrl-C. A second run needs no cleanup: each run has its own run id
and the learner its own checkpoint folder.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx

from adaptwin.cliutil import UserError, render_table

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
    dashboard: bool = True
    port: int = 8501


SUMMARY_SQL = {
    "busiest adapters": "select adapter_id, adapter_rank, count(*) as requests, "
                        "round(count(*) / (max(ts) - min(ts) + 1e-9), 3) as rate_per_s "
                        "from requests where run_id = '{run}' group by 1, 2 order by requests desc limit 8",
    "replay through the twin, by window (first 10)":
        "select window_start, window_end, arrivals, finished, round(throughput, 1) as throughput, "
        "round(starvation_ratio, 3) as starvation, starved, round(running, 1) as running, "
        "round(waiting, 1) as waiting, round(kv_usage, 3) as kv_usage from windows "
        "where run_id = '{run}-twin' and scope = 'window' order by window_start limit 10",
    "recommendation changes": "select window_end, served, max_loras, round(predicted_throughput, 1) as predicted, "
                              "round(starvation_prob, 3) as p_starve, model, asked_twin, reason "
                              "from recommendations where run_id = '{run}-twin' and kind = 'recommendation' "
                              "and changed order by window_end limit 10",
    "dead letters by reason": "select split_part(reason, ':', 1) as reason, count(*) as rows from deadletter "
                              "where run_id = '{run}' group by 1 order by rows desc",
}

RESULT_SQL = """
with req as (select count(*) as requests from requests where run_id = '{run}'),
     run as (select served, max_loras, throughput, starvation_ratio, starved from windows
             where run_id = '{run}-twin' and scope = 'run'),
     win as (select count(*) filter (where starved = 1) as starved_windows, count(*) as windows from windows
             where run_id = '{run}-twin' and scope = 'window'),
     rec as (select * from recommendations where run_id = '{run}-twin' and kind = 'recommendation'),
     last as (select served || ' / ' || max_loras as recommended, round(predicted_throughput, 1) as predicted
              from rec order by window_end desc limit 1),
     changes as (select count(*) filter (where changed) as changes, count(*) as recommendations from rec)
select req.requests, run.served || ' / ' || run.max_loras as replayed, round(run.throughput, 1) as throughput,
       round(run.starvation_ratio, 3) as starvation, run.starved,
       win.starved_windows || ' of ' || win.windows as starved_windows,
       last.recommended, last.predicted as predicted_throughput, changes.changes as recommendation_changes,
       changes.recommendations
from req, run, win, changes left join last on true
"""


def _python(*args: str) -> list[str]:
    return [sys.executable, "-m", "adaptwin", *args]


class _Children:
    """The processes the demo started; all stopped (SIGINT, then SIGTERM, then SIGKILL) when the demo ends."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(argv, **kw)
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], what: str) -> str:
        """Run a child to its end; its stdout (the ``--json`` line is last); stderr goes to the terminal."""
        proc = self.start(argv, stdout=subprocess.PIPE, text=True)
        out, _ = proc.communicate()
        if proc.returncode:
            raise UserError(f"the {what} failed (exit status {proc.returncode}); see its log above")
        return out

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGINT, 10), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            alive = [p for p in self.procs if p.poll() is None]
            for p in alive:
                p.send_signal(sig)
            for p in alive:
                try:
                    p.wait(wait_s)
                except subprocess.TimeoutExpired:
                    pass


def _ensure_broker(bootstrap: str, stack: ExitStack) -> None:
    """Use the broker at ``bootstrap``; when none answers there and it is a loopback address, start one on that
    port (kafka.sh, data under .cache/kafka/) and stop it when the demo ends."""
    from adaptwin.broker import LocalBroker
    from adaptwin.kafka import wait_for_broker

    try:
        wait_for_broker(bootstrap, 3)
        return
    except UserError:
        host, _, port = bootstrap.rpartition(":")
        if host not in ("127.0.0.1", "localhost") or not port.isdigit():
            raise
    print(f"broker  none on {bootstrap}: starting a local one", file=sys.stderr, flush=True)
    broker = LocalBroker(port=int(port)).start()
    stack.callback(broker.stop)


def _wait_for_dashboard(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"the dashboard exited with status {proc.returncode}; see its log above")
        try:
            if httpx.get(f"{url}/_stcore/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise UserError(f"the dashboard did not answer on {url} within {timeout_s:g} s")


def run(config: DemoConfig) -> str:
    """Run the demo; returns the run id. Progress goes to stderr, the summary to stdout. With ``dashboard`` it
    blocks, serving the dashboard, until interrupted."""
    children = _Children()
    with ExitStack() as stack:
        _ensure_broker(config.bootstrap, stack)
        stack.callback(children.stop)  # registered after the broker: runs first, consumers stop before it
        run_id = _pipeline(config, children)
        if config.dashboard:
            _serve_dashboard(config, children)
    return run_id


def _pipeline(config: DemoConfig, children: _Children) -> str:
    from adaptwin.ingest import catalog, producer, source
    from adaptwin.ingest.sink import LakeSink, SinkConfig
    from adaptwin.kafka import ensure_topics

    run_id = f"demo-{time.strftime('%Y%m%dT%H%M%S')}"
    ensure_topics(config.bootstrap)
    report = producer.produce(source.IngestConfig(
        trace=config.trace, adapters=config.adapters, popularity=config.popularity, ranks=config.ranks,
        seed=config.seed, run_id=run_id, max_rows=config.limit), config.bootstrap)
    print(f"ingest  {report.accepted:,} requests of {config.trace} → Kafka in {report.wall_s:.1f} s "
          f"({report.requests_per_s:,.0f} req/s), {report.dead_lettered} dead-lettered", flush=True)

    t0 = time.perf_counter()
    summary = json.loads(children.run(_python(
        "replay", "--run-id-in", run_id, "--run-id", f"{run_id}-twin", "--served", str(config.served),
        "--max-loras", str(config.max_loras), "--bootstrap", config.bootstrap, "--json", "--no-progress"),
        "replay").strip().splitlines()[-1])
    print(f"replay  twin, served {config.served}, max_loras {config.max_loras}: "
          f"{summary.get('total_throughput', 0):,.0f} tok/s, starved={summary.get('starved')} "
          f"in {time.perf_counter() - t0:.1f} s", flush=True)

    t0 = time.perf_counter()
    learned = json.loads(children.run(_python(
        "learn", "--run-id-in", f"{run_id}-twin", "--bootstrap", config.bootstrap, "--until-run-end",
        "--ranks", ",".join(map(str, config.ranks)),
        "--warm-start", "twin", "--twin-budget", "20", "--no-progress", "--json",
        "--checkpoint", str(Path(os.environ.get("ADAPTWIN_CACHE", ".cache")) / "demo" / run_id)),
        "learner").strip().splitlines()[-1])
    print(f"learn   {learned.get('windows', 0)} windows → {learned.get('recommendations', 0)} recommendations "
          f"({learned.get('model')}) in {time.perf_counter() - t0:.1f} s", flush=True)

    t0 = time.perf_counter()
    stats = LakeSink(SinkConfig(config.bootstrap, config.lake, idle_exit_s=3.0)).run()
    print(f"sink    {stats.rows:,} rows → {config.lake} in {stats.files} Parquet files "
          f"({time.perf_counter() - t0:.1f} s incl. 3 s idle wait)", flush=True)

    for title, sql in SUMMARY_SQL.items():
        print(f"\n{title}\n" + render_table(catalog.query(config.lake, sql.format(run=run_id)), 20))
    print("\nresult\n" + render_table(catalog.query(config.lake, RESULT_SQL.format(run=run_id)), 5))
    print(f"\nquery the lake yourself:  adaptwin query \"select * from requests where run_id = '{run_id}' limit 5\""
          f" --lake {config.lake}", flush=True)
    return run_id


def _serve_dashboard(config: DemoConfig, children: _Children) -> None:
    url = f"http://127.0.0.1:{config.port}"
    proc = children.start(_python("dashboard", "--lake", str(config.lake), "--port", str(config.port),
                                  "--bootstrap", config.bootstrap), stdout=subprocess.DEVNULL)
    _wait_for_dashboard(url, proc)
    print(f"dashboard  {url}   (Ctrl-C stops it, and everything the demo started)", flush=True)
    proc.wait()
    if proc.returncode:
        raise UserError(f"the dashboard exited with status {proc.returncode}")
