"""Ingest and sink throughput against a real local broker (issue: Foundation).

    python -m benchmarks.ingest_sink [--loops 10] [--bootstrap HOST:PORT]

1. ingest: the Azure conversation trace looped N times → read, validate, batch, produce (acks=all, zstd).
   Target ≥ 50,000 requests/s.
2. ceiling: kafka-python alone sending the very same message bytes (already encoded, same producer
   settings): the most any ingest could reach here; the ratio ingest/ceiling is reported.
3. sink: a fresh consumer group reads those requests into Parquet. Target ≥ 100,000 rows/s.
Without --bootstrap a broker is started on free ports for the run and stopped after.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from pathlib import Path

from adaptwin.config import TOPICS
from adaptwin.ingest import producer as ingest_producer
from adaptwin.ingest import source
from adaptwin.ingest.sink import LakeSink, SinkConfig
from adaptwin.kafka import ensure_topics, make_producer


def _messages(config: source.IngestConfig, batch_size: int) -> list[tuple[bytes, bytes]]:
    """The (key, value) pairs the ingest sends for ``config``."""
    return [m for piece in ingest_producer.encoded_slices(config, batch_size, None) for m in piece.messages]


def run(bootstrap: str, loops: int, batch_size: int = 20_000) -> dict:
    ensure_topics(bootstrap)
    run_id = f"bench-{uuid.uuid4().hex[:6]}"
    config = source.IngestConfig(trace="azure-conv", adapters=64, run_id=run_id, loop=loops)
    t0 = time.perf_counter()
    report = ingest_producer.produce(config, bootstrap, batch_size=batch_size, progress=False)
    ingest_s = time.perf_counter() - t0  # the whole call: worker start, reading, validating, sending, acks
    ingest_rps = report.accepted / ingest_s
    print(f"ingest : {report.accepted:,} requests, {report.messages:,} messages, {report.bytes / 1e6:.1f} MB "
          f"in {ingest_s:.2f} s = {ingest_rps:,.0f} req/s (target >= 50,000)")

    messages = _messages(source.IngestConfig(trace="azure-conv", adapters=64, run_id=run_id + "-raw", loop=loops), batch_size)
    raw = make_producer(bootstrap)
    t0 = time.perf_counter()
    for key, value in messages:
        raw.send(TOPICS.requests, key=key, value=value)
    raw.flush()
    raw_s = time.perf_counter() - t0
    raw.close()
    ceiling_rps = report.accepted / raw_s
    print(f"ceiling: kafka-python alone, same {len(messages):,} messages: {raw_s:.2f} s = {ceiling_rps:,.0f} req/s; "
          f"ingest/ceiling = {ingest_rps / ceiling_rps:.2f}")

    with tempfile.TemporaryDirectory() as lake:
        sink = LakeSink(SinkConfig(bootstrap, Path(lake), topics=(TOPICS.requests,),
                                   group_id=f"bench-sink-{run_id}", idle_exit_s=2.0))
        stats = sink.run()
        busy = stats.last_commit_at - stats.first_message_at
        sink_rps = stats.rows / busy
        print(f"sink   : {stats.rows:,} rows ({stats.messages:,} messages) -> {stats.files} Parquet files "
              f"in {busy:.2f} s = {sink_rps:,.0f} rows/s (target >= 100,000)")
    return {"ingest_rps": ingest_rps, "ceiling_rps": ceiling_rps, "sink_rps": sink_rps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loops", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=20_000)
    ap.add_argument("--bootstrap", default=None)
    args = ap.parse_args()
    if args.bootstrap:
        run(args.bootstrap, args.loops, args.batch_size)
        return
    from adaptwin.broker import LocalBroker, free_port

    broker = LocalBroker(port=free_port(), controller_port=free_port(),
                         data_dir=Path(tempfile.mkdtemp(prefix="adaptwin-bench-kafka-")))
    broker.start()
    try:
        run(broker.bootstrap, args.loops, args.batch_size)
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
