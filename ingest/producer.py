"""Kafka request producer: validated rows to ``adaptwin.requests``, refused rows to ``adaptwin.deadletter``.

Requests are keyed by adapter id so that each adapter's requests stay in order within one partition; a
message carries all requests of one adapter from one slice of the trace (NDJSON, see
``adaptwin.schemas``). Reading, validating and encoding run in a child process while this process only
sends, so ingest uses both cores (kafka-python's send path alone needs most of one).

The producer uses acks=all, idempotence and retries inside a long delivery timeout, so a broker that is
down at start or restarts mid-run is waited for; ``produce`` fails loudly, with the number of
unconfirmed messages, rather than report success for a row the broker never acknowledged.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterator

from adaptwin import schemas
from adaptwin.cliutil import UserError
from adaptwin.config import TOPICS
from adaptwin.ingest.source import IngestConfig, iter_batches
from adaptwin.kafka import make_producer, wait_for_broker

log = logging.getLogger(__name__)

PACE_SLICE_S = 0.02  # trace seconds per paced slice: pacing error far below any replay window
MAX_RECORDS_PER_MESSAGE = 2000  # ≈ 450 KB of requests, well under the broker's 1 MiB message limit


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


@dataclass
class Slice:
    """Encoded messages for a run of requests that may leave together."""

    first_ts: float
    requests: int
    messages: list[tuple[bytes, bytes]]  # (key, value) for adaptwin.requests
    dead: list[tuple[str, bytes]]  # (reason code, value) for adaptwin.deadletter


def encoded_slices(config: IngestConfig, batch_size: int, slice_s: float | None) -> Iterator[Slice]:
    """The trace as encoded messages; ``slice_s`` cuts batches into runs of that much trace time."""
    for batch in iter_batches(config, batch_size=batch_size):
        requests = batch.requests
        runs: list[list[dict]] = []
        if slice_s is None:
            runs = [requests] if requests else []
        else:
            for r in requests:
                if not runs or r["ts"] - runs[-1][0]["ts"] > slice_s:
                    runs.append([])
                runs[-1].append(r)
        dead = [(d["reason"].split(":")[0], schemas.encode([d])) for d in batch.dead]
        for i, run in enumerate(runs):
            by_adapter: dict[str, list[dict]] = defaultdict(list)
            for r in run:
                by_adapter[r["adapter_id"]].append(r)
            messages = [(adapter.encode(), schemas.encode_requests(recs[i:i + MAX_RECORDS_PER_MESSAGE]))
                        for adapter, recs in by_adapter.items()
                        for i in range(0, len(recs), MAX_RECORDS_PER_MESSAGE)]
            yield Slice(run[0]["ts"], len(run), messages, dead if i == len(runs) - 1 else [])
        if not runs and dead:
            yield Slice(0.0, 0, [], dead)


def _worker(config: IngestConfig, batch_size: int, slice_s: float | None, out: mp.Queue) -> None:
    try:
        for item in encoded_slices(config, batch_size, slice_s):
            out.put(item)
        out.put(None)
    except UserError as err:  # sent as text: not every exception class pickles
        out.put(("user", str(err)))
    except BaseException as err:  # noqa: BLE001 — reported in the parent with its type
        out.put(("crash", f"ingest worker failed: {type(err).__name__}: {err}"))


def _from_worker(config: IngestConfig, batch_size: int, slice_s: float | None) -> Iterator[Slice]:
    ctx = mp.get_context("spawn")  # no fork of a process that may already hold Kafka threads
    out: mp.Queue = ctx.Queue(maxsize=64)  # back-pressure: the reader runs at most 64 slices ahead
    proc = ctx.Process(target=_worker, args=(config, batch_size, slice_s, out), daemon=True)
    proc.start()
    try:
        while True:
            try:
                item = out.get(timeout=1.0)
            except queue.Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"ingest worker died (exit code {proc.exitcode})") from None
                continue
            if item is None:
                return
            if isinstance(item, tuple):
                kind, message = item
                raise UserError(message) if kind == "user" else RuntimeError(message)
            yield item
    finally:
        proc.kill() if proc.is_alive() else None
        proc.join()


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


def produce(config: IngestConfig, bootstrap: str, *, batch_size: int = 20_000, speedup: float | None = None,
            wait_s: float = 120.0, progress: bool = True, worker: bool = True) -> IngestReport:
    """Ingest ``config`` into Kafka; return the counts once the broker has acknowledged everything.

    A source that is not a trace fails (UserError) before anything is sent.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    slice_s = PACE_SLICE_S * speedup if speedup else None
    slices = _from_worker(config, batch_size, slice_s) if worker else encoded_slices(config, batch_size, slice_s)
    first = next(slices, None)
    wait_for_broker(bootstrap, wait_s)
    producer = make_producer(bootstrap)
    report = IngestReport(config.run_id)
    failures: list[BaseException] = []
    pacer = _Pacer(speedup) if speedup else None
    bar = tqdm(desc=f"ingest {config.run_id}", unit=" req", disable=not progress, mininterval=0.5, smoothing=0.1)

    def send(topic: str, key: bytes, value: bytes) -> None:
        producer.send(topic, key=key, value=value).add_errback(failures.append)
        report.messages += 1
        report.bytes += len(value)

    pieces = _chain(first, slices) if first is not None else iter(())
    try:
        for piece in pieces:
            if pacer and piece.requests:
                pacer.wait_for(piece.first_ts)
            for key, value in piece.messages:
                send(TOPICS.requests, key, value)
            for reason, value in piece.dead:
                send(TOPICS.deadletter, config.run_id.encode(), value)
                report.dead_by_reason[reason] += 1
            report.accepted += piece.requests
            report.dead_lettered += len(piece.dead)
            bar.update(piece.requests)
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


def _chain(first: Slice, rest: Iterator[Slice]) -> Iterator[Slice]:
    yield first
    yield from rest
