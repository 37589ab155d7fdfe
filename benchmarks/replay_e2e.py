"""End to end through Kafka: ingest → replay (twin backend) → telemetry and windows in the lake.

    python -m benchmarks.replay_e2e [--bootstrap HOST:PORT] [--trace azure-conv] [--served 64 --max-loras 16]
                                    [--repeat 1] [--pipelined]

Target (issue 5): the Azure conversation trace (1 h, 19,366 requests) in ≤ 15 s, measured from the start of
the ingest to the moment the last telemetry/windows file is committed in the lake.

Stages run in this process, one after the other (``--pipelined``: the sink runs as its own process from the
start, as it would in production, and the sink figure is what is left after the replay returns):
1. ingest: ``adaptwin ingest`` (read, validate, produce to adaptwin.requests);
2. replay: ``adaptwin replay --run-id-in RUN`` with the twin (Kafka merge, twin, transactional telemetry);
3. sink: the lake sink (read_committed, as docs/replay.md asks) over adaptwin.telemetry + adaptwin.windows until
   every record of the replay is in Parquet.
The twin alone on the same trace (``simulate``) is printed for reference. Without --bootstrap a broker is
started on free ports and stopped after. Prints the machine's load (``uptime``) first.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import tempfile
import time
import uuid
from pathlib import Path

from adaptwin.cli import main as adaptwin
from adaptwin.config import TOPICS
from adaptwin.ingest import catalog
from adaptwin.kafka import ensure_topics


def _json_of(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = adaptwin(argv)
    if rc:
        raise SystemExit(f"adaptwin {' '.join(argv[:2])} failed with status {rc}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def _sink(bootstrap: str, lake: Path, group: str, idle_exit_s: float):
    import adaptwin.ingest.sink as sink_module

    return sink_module.LakeSink(sink_module.SinkConfig(bootstrap, lake, topics=(TOPICS.telemetry, TOPICS.windows),
                                                       group_id=group, idle_exit_s=idle_exit_s, max_age_s=0.3))


def _sink_process(bootstrap: str, lake: Path, group: str):
    """The lake sink as its own process (``adaptwin sink``), running alongside ingest and replay, read_committed."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "adaptwin", "sink", "--bootstrap", bootstrap, "--lake", str(lake),
                             "--topics", f"{TOPICS.telemetry},{TOPICS.windows}", "--group", group,
                             "--idle-exit", "8", "--max-age", "0.3"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_once(bootstrap: str, trace: str, served: int, max_loras: int, pipelined: bool) -> dict:
    run_in = f"e2e-{uuid.uuid4().hex[:6]}"
    run_id = f"{run_in}-replay"
    with tempfile.TemporaryDirectory() as tmp:
        lake = Path(tmp)
        proc = _sink_process(bootstrap, lake, f"sink-{run_id}") if pipelined else None
        if proc is not None:
            time.sleep(2.0)  # let the sink start (interpreter, Kafka connection) before the clock starts
        t0, w0 = time.monotonic(), time.time()
        ing = _json_of(["ingest", "--trace", trace, "--adapters", str(served), "--run-id", run_in,
                        "--bootstrap", bootstrap, "--json"])
        t1 = time.monotonic()
        rep = _json_of(["replay", "--run-id-in", run_in, "--run-id", run_id, "--served", str(served),
                        "--max-loras", str(max_loras), "--bootstrap", bootstrap, "--json", "--no-progress"])
        t2 = time.monotonic()
        if proc is None:
            sink = _sink(bootstrap, lake, f"sink-{run_id}", idle_exit_s=1.0)
            sink.run()
            done = sink.stats.last_commit_at - t0  # the last lake file committed (not the idle wait after it)
        else:
            proc.wait(timeout=120)
            done = max(f.stat().st_mtime for f in lake.rglob("*.parquet")) - w0
        n = catalog.query(lake, f"select count(*) n from telemetry where run_id = '{run_id}'").to_pylist()[0]["n"]
        w = catalog.query(lake, f"select count(*) n from windows where run_id = '{run_id}'").to_pylist()[0]["n"]
        assert n == rep["telemetry"] == ing["accepted"], (n, rep["telemetry"], ing["accepted"])
        assert w == rep["windows"]
    return {"requests": ing["accepted"], "ingest_s": t1 - t0, "replay_s": t2 - t1, "replay_wall_s": rep["wall_s"],
            "sink_s": done - (t2 - t0), "total_s": done, "telemetry": n, "windows": w,
            "total_throughput": rep["total_throughput"], "starved": rep["starved"]}


def twin_only(trace: str, served: int, max_loras: int) -> float:
    from adaptwin.twin import ServerConfig, simulate
    from adaptwin.twin.trace import load_trace

    arrivals, ranks, served = load_trace(trace, served=served)
    t = time.monotonic()
    simulate(ServerConfig(model="llama-3.1-8b-instruct", served=served, max_loras=max_loras,
                          adapter_ranks=tuple(ranks)), arrivals, 3600.0)
    return time.monotonic() - t


def run(bootstrap: str, trace: str, served: int, max_loras: int, repeat: int, pipelined: bool) -> list[dict]:
    ensure_topics(bootstrap)
    print(f"twin alone (simulate, no Kafka): {twin_only(trace, served, max_loras):.2f} s")
    out = []
    for i in range(repeat):
        r = run_once(bootstrap, trace, served, max_loras, pipelined)
        out.append(r)
        print(f"run {i + 1}: {r['requests']:,} requests: ingest {r['ingest_s']:.2f} s, replay {r['replay_s']:.2f} s "
              f"(engine {r['replay_wall_s']:.2f} s), sink {r['sink_s']:.2f} s -> total {r['total_s']:.2f} s "
              f"(target <= 15 s); lake: {r['telemetry']:,} telemetry rows, {r['windows']} window rows")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bootstrap", default=None)
    ap.add_argument("--trace", default="azure-conv")
    ap.add_argument("--served", type=int, default=64)
    ap.add_argument("--max-loras", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--pipelined", action="store_true", help="run the sink concurrently with ingest and replay")
    args = ap.parse_args()
    print("uptime:", os.popen("uptime").read().strip())
    if args.bootstrap:
        run(args.bootstrap, args.trace, args.served, args.max_loras, args.repeat, args.pipelined)
        return
    from adaptwin.broker import LocalBroker, free_port

    broker = LocalBroker(port=free_port(), controller_port=free_port(),
                         data_dir=Path(tempfile.mkdtemp(prefix="adaptwin-bench-kafka-")))
    broker.start()
    try:
        run(broker.bootstrap, args.trace, args.served, args.max_loras, args.repeat, args.pipelined)
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
