"""The one entry point the CLI and the Kafka producer use: an ingest config in, batches of records out.

>>> config = IngestConfig(trace="azure-code", run_id="doc", adapters=4, max_rows=3)
>>> [r["request_id"] for b in iter_batches(config, batch_size=2) for r in b.requests]
['doc-0', 'doc-1', 'doc-2']
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from adaptwin.cliutil import UserError
from adaptwin.ingest.popularity import AdapterAssigner, AdapterSet, Popularity
from adaptwin.ingest.readers.base import ArrivalChunk, RawRow, ReaderOptions, parse_columns
from adaptwin.ingest.readers.detect import open_reader
from adaptwin.ingest.readers.shipped import SHIPPED, shipped_path
from adaptwin.ingest.synthetic import SyntheticSpec, generate, length_source
from adaptwin.ingest.validate import Limits, RowValidator
from adaptwin.schemas import SCHEMA_VERSION

DEFAULT_ADAPTERS = 32


@dataclass(frozen=True)
class IngestConfig:
    """What to ingest and how. Exactly one of ``trace`` and ``synthetic``."""

    trace: str | None = None  # a path, or a shipped trace name (azure-conv, mooncake-conversation, servegen-m-small …)
    synthetic: str | None = None  # a synthetic spec (see synthetic.py)
    format: str | None = None  # azure | mooncake | servegen | parquet | csv; None: detect
    columns: str | None = None  # csv/parquet/jsonl mapping "ts=arrival_s,prompt_tokens=in,output_tokens=out,…"
    adapters: int | None = None  # adapters lora-0…lora-(N-1) for traces without ids (default 32; ServeGen: clients)
    adapter_set: tuple[str, ...] | None = None  # when given, rows naming another adapter are dead-lettered
    popularity: str = "zipf:1.1"  # zipf:S | uniform | servegen[:NAME], for traces without adapter ids
    ranks: tuple[int, ...] = (8,)  # adapter k has ranks[k mod len]
    seed: int = 0
    run_id: str = "ingest"
    limits: Limits = field(default_factory=Limits)
    max_rows: int | None = None  # stop after this many requests
    loop: int = 1  # read the trace this many times, ts shifted and request ids unique (benchmarks)
    start_s: float = 0.0  # keep requests with start_s <= ts < start_s + duration_s, ts rebased to start_s
    duration_s: float | None = None
    rate_scale: float = 1.0  # ServeGen: scale every client's rate
    lengths: str = "azure-conv"  # ServeGen: shipped trace to draw token lengths from

    def __post_init__(self) -> None:
        if (self.trace is None) == (self.synthetic is None):
            raise UserError("give exactly one of a trace (--trace FILE) and a synthetic spec (--synthetic SPEC)")
        if self.loop < 1 or (self.max_rows is not None and self.max_rows < 0):
            raise UserError(f"loop must be >= 1 and max_rows >= 0, got loop={self.loop}, max_rows={self.max_rows}")
        if self.adapters is not None and self.adapters < 1:
            raise UserError(f"--adapters must be >= 1, got {self.adapters}")
        if not self.ranks or min(self.ranks) < 1:
            raise UserError(f"ranks must be positive integers, got {list(self.ranks)}")
        if self.start_s < 0 or (self.duration_s is not None and not self.duration_s > 0) or not self.rate_scale > 0:
            raise UserError("start_s must be >= 0, duration_s and rate_scale > 0")


@dataclass
class IngestStats:
    """Counts of one ingest, updated while batches are produced."""

    rows_read: int = 0  # rows (lines, Parquet rows, generated arrivals, ServeGen windows that failed)
    accepted: int = 0  # REQUEST records produced
    dead: Counter = field(default_factory=Counter)  # dead-lettered rows by reason
    skipped: int = 0  # valid rows outside [start_s, start_s + duration_s)
    passes: int = 0  # passes over the trace started (loop)

    @property
    def dead_total(self) -> int:
        return sum(self.dead.values())


@dataclass
class Batch:
    """Records for one producer round: requests for adaptwin.requests, dead letters for adaptwin.deadletter."""

    requests: list[dict] = field(default_factory=list)
    dead: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests) + len(self.dead)


def resolve_trace(trace: str) -> Path:
    """A trace path, or the shipped trace of that name."""
    path = Path(trace)
    if path.exists():
        return path
    if trace in SHIPPED:
        return shipped_path(trace)
    raise UserError(f"{trace}: no such file or directory (shipped traces: {', '.join(SHIPPED)})")


def iter_batches(config: IngestConfig, batch_size: int = 1000, stats: IngestStats | None = None) -> Iterator[Batch]:
    """Batches of at most ``batch_size`` requests (and at most ``batch_size`` dead letters), in trace order.
    ``stats``, when given, is kept up to date as batches are produced."""
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    stats = stats if stats is not None else IngestStats()
    if config.synthetic is not None:
        yield from _synthetic_batches(config, batch_size, stats)
    else:
        yield from _trace_batches(config, batch_size, stats)


def _rows_left(config: IngestConfig, stats: IngestStats) -> float:
    return math.inf if config.max_rows is None else config.max_rows - stats.accepted


def _reader_options(config: IngestConfig) -> ReaderOptions:
    return ReaderOptions(columns=parse_columns(config.columns), max_line_bytes=config.limits.max_line_bytes,
                         seed=config.seed, adapters=config.adapters, lengths=config.lengths,
                         start_s=config.start_s, duration_s=config.duration_s, rate_scale=config.rate_scale)


def _trace_batches(config: IngestConfig, batch_size: int, stats: IngestStats) -> Iterator[Batch]:
    path = resolve_trace(config.trace)
    reader = open_reader(path, config.format, _reader_options(config))
    generated = reader.adapter_names is not None  # ServeGen: arrivals come as chunks, already sliced
    assigner = _assigner(config, reader.adapter_names)
    adapter_set = frozenset(config.adapter_set) if config.adapter_set is not None else None
    batch = Batch()
    offset = 0.0
    for _ in range(config.loop):
        if _rows_left(config, stats) <= 0:
            break
        stats.passes += 1
        validator = RowValidator(run_id=config.run_id, file=str(path), ts_unit=reader.ts_unit, limits=config.limits,
                                 assigner=assigner, has_adapters=reader.has_adapters, adapter_set=adapter_set,
                                 first_request=stats.accepted, ts_offset=offset,
                                 start_s=0.0 if generated else config.start_s,
                                 duration_s=None if generated else config.duration_s)
        first_of_pass, last_ts = stats.accepted, 0.0
        check, requests, dead = validator.check, batch.requests, batch.dead
        left = _rows_left(config, stats)
        for item in reader.rows():
            if type(item) is RawRow:
                stats.rows_read += 1
                reason = check(item, requests, dead)
                if reason is not None:
                    stats.dead[reason] += 1
                    if len(dead) < batch_size:
                        continue
                elif validator.next_request > stats.accepted:  # accepted (not skipped by the slice)
                    stats.accepted += 1
                    left -= 1
                    if len(requests) < batch_size and left > 0:
                        continue
                else:
                    continue
            else:
                for records in _chunk_records(item, assigner.adapters, config, stats, offset, batch_size,
                                              batch_size - len(batch.requests)):
                    batch.requests.extend(records)
                    if len(batch.requests) >= batch_size:
                        yield batch
                        batch = Batch()
                if len(item.ts):
                    last_ts = float(item.ts[-1])
                requests, dead = batch.requests, batch.dead
                validator.next_request = stats.accepted
                left = _rows_left(config, stats)
            if len(batch.requests) >= batch_size or len(batch.dead) >= batch_size:
                yield batch
                batch = Batch()
                requests, dead = batch.requests, batch.dead
            if left <= 0:
                break
        stats.skipped += validator.skipped
        if validator.latest_ts > -math.inf and not generated:
            last_ts = validator.latest_ts - config.start_s
        offset += _loop_period(config.duration_s if generated else None, last_ts, stats.accepted - first_of_pass)
    if len(batch):
        yield batch


def _loop_period(span: float | None, last_ts: float, n: int) -> float:
    """How far the next pass is shifted: the span, or the last ts plus one mean gap."""
    if span is not None:
        return span
    return last_ts + (last_ts / (n - 1) if n > 1 and last_ts > 0 else 1.0)


def _synthetic_batches(config: IngestConfig, batch_size: int, stats: IngestStats) -> Iterator[Batch]:
    spec = SyntheticSpec.parse(config.synthetic)
    workload = generate(spec, length_source(spec), seed=config.seed)
    label = f"synthetic:{spec.kind}:"
    chunk = ArrivalChunk(ts=workload.ts, adapter=workload.adapter, prompt_tokens=workload.prompt_tokens,
                         output_tokens=workload.output_tokens, source=[])
    batch = Batch()
    for loop in range(config.loop):
        if _rows_left(config, stats) <= 0:
            break
        stats.passes += 1
        for records in _chunk_records(chunk, workload.adapters, config, stats, loop * spec.duration, batch_size,
                                      batch_size - len(batch.requests), label=label):
            batch.requests.extend(records)
            if len(batch.requests) >= batch_size:
                yield batch
                batch = Batch()
    if len(batch):
        yield batch


def _assigner(config: IngestConfig, names: list[str] | None) -> AdapterAssigner:
    """Adapter drawing for traces without ids; for ServeGen only the adapter set (its clients are the ids)."""
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0xADA]))
    if names is not None:
        adapters = AdapterSet(tuple(names), tuple(config.ranks[k % len(config.ranks)] for k in range(len(names))))
        return AdapterAssigner(adapters, np.full(len(names), 1.0 / len(names)), rng, config.ranks)
    n = config.adapters or DEFAULT_ADAPTERS
    return AdapterAssigner(AdapterSet.round_robin(n, config.ranks), Popularity.parse(config.popularity).weights(n),
                           rng, config.ranks)


def _chunk_records(chunk: ArrivalChunk, adapters: AdapterSet, config: IngestConfig, stats: IngestStats,
                   offset: float, batch_size: int, room: int, label: str | None = None) -> Iterator[list[dict]]:
    """REQUEST records of generated arrivals, counted in ``stats``: first ``room`` (what the current batch
    can still take), then slices of ``batch_size`` (the caller starts a new batch after each).
    ``label``: sources "<label><i>" (1-based) instead of the chunk's own."""
    total = int(min(len(chunk.ts), _rows_left(config, stats)))
    names, ranks, run_id = adapters.names, adapters.ranks, config.run_id
    start = 0
    while start < total:
        stop = min(total, start + max(1, room))
        room = batch_size
        n = stats.accepted
        sources = ([f"{label}{i + 1}" for i in range(start, stop)] if label is not None
                   else chunk.source[start:stop])
        records = [
            {"v": SCHEMA_VERSION, "request_id": f"{run_id}-{n + i}", "run_id": run_id, "ts": t,
             "adapter_id": names[a], "adapter_rank": ranks[a], "prompt_tokens": p, "output_tokens": o, "source": s}
            for i, (t, a, p, o, s) in enumerate(zip((chunk.ts[start:stop] + offset).tolist(),
                                                    chunk.adapter[start:stop].tolist(),
                                                    chunk.prompt_tokens[start:stop].tolist(),
                                                    chunk.output_tokens[start:stop].tolist(), sources))]
        stats.rows_read += len(records)
        stats.accepted += len(records)
        start = stop
        yield records
