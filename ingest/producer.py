"""Kafka request producer: validated rows to ``adaptwin.requests``, refused rows to ``adaptwin.deadletter``.

Requests are keyed by adapter id so that each adapter's requests stay in order within one partition; a
message carries all requests of one adapter from one input batch (NDJSON, see ``adaptwin.schemas``).
The producer uses acks=all with unbounded retries inside a long delivery timeout, so a broker that is
down at start or restarts mid-run is waited for; ``produce`` fails loudly, with the number of
unconfirmed messages, rather than report success for a row the broker never acknowledged.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Protocol

from adaptwin import schemas
from adaptwin.cliutil import UserError
from adaptwin.config import TOPICS
from adaptwin.kafka import make_producer, wait_for_broker

log = logging.getLogger(__name__)


class Batch(Protocol):
    requests: list[dict]  # REQUEST records
    dead: list[dict]  # DEADLETTER records


@dataclass
class IngestReport:
    run_id: str
    accepted: int = 0
    dead_lettered: int = 0
    dead_by_reason: Counter = field(default_factory=Counter)
    messages: int = 0
    bytes: int = 0
    wall_s: float = 0.0

    @property
    def requests_per_s(self) -> float:
        return self.accepted / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict:
        return {"run_id": self.run_id, "accepted": self.accepted, "dead_lettered": self.dead_lettered,
                "dead_by_reason": dict(self.dead_by_reason), "messages": self.messages, "bytes": self.bytes,
                "wall_s": round(self.wall_s, 3), "requests_per_s": round(self.requests_per_s, 1)}


class _Pacer:
    """Scaled wall-clock pacing: a request with trace time ``ts`` leaves at ``start + ts / speedup``."""

    def __init__(self, speedup: float):
        self.speedup = speedup
        self.start: float | None = None
        self.ts0 = 0.0

    def wait_for(self, ts: float) -> None:
        if self.start is None:
            self.start, self.ts0 = time.monotonic(), ts
        delay = self.start + (ts - self.ts0) / self.speedup - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _slices(requests: list[dict], pace_s: float) -> Iterable[list[dict]]:
    """Cut a batch into runs of requests whose trace times lie within ``pace_s`` of the run's first."""
    run: list[dict] = []
    for r in requests:
        if run and r["ts"] - run[0]["ts"] > pace_s:
            yield run
            run = []
        run.append(r)
    if run:
        yield run


def produce(batches: Iterable[Batch], bootstrap: str, run_id: str, *, speedup: float | None = None,
            wait_s: float = 120.0, progress: bool = True) -> IngestReport:
    """Send every batch; return the counts once the broker has acknowledged everything."""
    from tqdm import tqdm

    wait_for_broker(bootstrap, wait_s)
    producer = make_producer(bootstrap)
    report = IngestReport(run_id)
    failures: list[BaseException] = []
    pacer = _Pacer(speedup) if speedup else None
    bar = tqdm(desc=f"ingest {run_id}", unit=" req", disable=not progress, mininterval=0.5, smoothing=0.1)

    def send(topic: str, key: str, records: list[dict]) -> None:
        value = schemas.encode(records)
        producer.send(topic, key=key.encode(), value=value).add_errback(failures.append)
        report.messages += 1
        report.bytes += len(value)

    start = time.perf_counter()
    try:
        for batch in batches:
            # 0.02 s of trace time per slice keeps pacing error well below any replay window.
            for part in _slices(batch.requests, 0.02 * speedup) if pacer else [batch.requests]:
                if pacer and part:
                    pacer.wait_for(part[0]["ts"])
                by_adapter: dict[str, list[dict]] = defaultdict(list)
                for r in part:
                    by_adapter[r["adapter_id"]].append(r)
                for adapter, records in by_adapter.items():
                    send(TOPICS.requests, adapter, records)
                report.accepted += len(part)
                bar.update(len(part))
            for dead in batch.dead:
                dead.setdefault("run_id", run_id)
                send(TOPICS.deadletter, run_id, [dead])
                report.dead_by_reason[dead["reason"].split(":")[0]] += 1
            report.dead_lettered += len(batch.dead)
            if failures:
                break
        producer.flush()
    finally:
        bar.close()
        producer.close()
    report.wall_s = time.perf_counter() - start
    if failures:
        raise UserError(f"the broker did not acknowledge {len(failures)} message(s) ({failures[0]!r}); "
                        f"the rows before them were stored, re-run the ingest with a new --run-id to resend")
    return report
