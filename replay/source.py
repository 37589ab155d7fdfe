"""Where a replay's requests come from: ``adaptwin.requests`` (one ingest run id) or a trace file.

Both sources fill one :class:`MergeBuffer` and say how far it is complete (:meth:`RequestSource.watermark`):
every request with ``ts < watermark`` has arrived in the buffer. The replay takes requests out in trace-time
order (``take(until)``) only below the watermark, so the twin gets time-ordered arrivals although Kafka
delivers them in per-adapter (per-partition) order.

Kafka: the topic has several partitions keyed by adapter; each partition is (nearly) time-ordered on its own.
The watermark is the minimum over partitions still being read of the latest ts seen there, minus a lateness
allowance. A partition that has reached the end offset it had when the replay started is finished (batch mode);
with ``follow`` a partition that is caught up is assumed to be as far as the fastest partition (the producer
interleaves adapters in trace order), and the replay ends after ``idle_exit_s`` without new records.
Partitions far ahead of the watermark are paused while the buffer holds ``max_buffer`` requests.
The consumer assigns itself the partitions (no group join, see ``ingest/sink.py``); offsets are committed by
the replay's transaction, under its group id.

File: the same readers as ``adaptwin ingest`` (``adaptwin.ingest.source.iter_batches``), one batch per poll;
rows the readers refuse come back as dead letters.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adaptwin import schemas
from adaptwin.cliutil import UserError
from adaptwin.config import TOPICS

log = logging.getLogger(__name__)

INF = math.inf


@dataclass
class RequestColumns:
    """Requests as a struct of arrays (one row per request)."""

    ts: np.ndarray  # float64, trace time of arrival
    request_id: np.ndarray  # object (str)
    adapter_id: np.ndarray  # object (str)
    adapter_rank: np.ndarray  # int64
    prompt: np.ndarray  # int64
    output: np.ndarray  # int64
    part: np.ndarray  # int64: source partition (0 for files)
    seq: np.ndarray  # int64: index of the request within its partition (ties in ts are broken by part, seq)
    msg_offset: np.ndarray  # int64: Kafka offset of the message that carried it (-1 for files)

    def __len__(self) -> int:
        return int(self.ts.size)

    @classmethod
    def empty(cls) -> "RequestColumns":
        f, i, o = np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object)
        return cls(f, o, o.copy(), i, i.copy(), i.copy(), i.copy(), i.copy(), i.copy())

    def select(self, index) -> "RequestColumns":
        return RequestColumns(*(getattr(self, f.name)[index] for f in fields(self)))

    @classmethod
    def concat(cls, parts: list["RequestColumns"]) -> "RequestColumns":
        parts = [p for p in parts if len(p)]
        if not parts:
            return cls.empty()
        if len(parts) == 1:
            return parts[0]
        return cls(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)))

    @classmethod
    def from_table(cls, table: pa.Table, part: int, seq0: int, msg_offset: np.ndarray) -> "RequestColumns":
        n = table.num_rows
        return cls(ts=table["ts"].to_numpy().astype(np.float64, copy=False),
                   request_id=table["request_id"].to_numpy(zero_copy_only=False).astype(object),
                   adapter_id=table["adapter_id"].to_numpy(zero_copy_only=False).astype(object),
                   adapter_rank=table["adapter_rank"].to_numpy().astype(np.int64),
                   prompt=table["prompt_tokens"].to_numpy().astype(np.int64),
                   output=table["output_tokens"].to_numpy().astype(np.int64),
                   part=np.full(n, part, dtype=np.int64), seq=np.arange(seq0, seq0 + n, dtype=np.int64),
                   msg_offset=msg_offset.astype(np.int64))


class MergeBuffer:
    """Requests received but not yet taken, kept sorted by (ts, part, seq)."""

    def __init__(self) -> None:
        self._cols = RequestColumns.empty()
        self._pending: list[RequestColumns] = []

    def __len__(self) -> int:
        return len(self._cols) + sum(len(p) for p in self._pending)

    def add(self, cols: RequestColumns) -> None:
        if len(cols):
            self._pending.append(cols)

    def _sorted(self) -> RequestColumns:
        if self._pending:
            c = RequestColumns.concat([self._cols, *self._pending])
            self._pending = []
            order = np.lexsort((c.seq, c.part, c.ts))
            self._cols = c.select(order)
        return self._cols

    def take(self, until: float) -> RequestColumns:
        """Remove and return every request with ``ts < until``, in (ts, part, seq) order."""
        c = self._sorted()
        k = int(np.searchsorted(c.ts, until, side="left"))
        if k == 0:
            return RequestColumns.empty()
        out, self._cols = c.select(slice(0, k)), c.select(slice(k, None))
        return out

    def peek_below(self, until: float) -> RequestColumns:
        """The requests with ``ts < until`` without removing them."""
        c = self._sorted()
        return c.select(slice(0, int(np.searchsorted(c.ts, until, side="left"))))

    def min_offsets(self) -> dict[int, int]:
        """Per partition, the smallest message offset still buffered."""
        c = RequestColumns.concat([self._cols, *self._pending])
        out: dict[int, int] = {}
        if len(c):
            for p in np.unique(c.part).tolist():
                out[int(p)] = int(c.msg_offset[c.part == p].min())
        return out


@dataclass
class SourceStats:
    records: int = 0  # requests of the selected run received
    other_runs: int = 0  # requests of other run ids skipped
    bad_records: int = 0  # records that did not decode (the lake sink dead-letters them, stage "sink")
    messages: int = 0
    max_buffered: int = 0
    paused_polls: int = 0  # polls made while partitions ahead of the watermark were paused


class RequestSource:
    """Common part: the merge buffer and what the replay reads from a source."""

    def __init__(self, lateness_s: float = 2.0, max_buffer: int = 100_000):
        if lateness_s < 0:
            raise UserError(f"--lateness must be >= 0, got {lateness_s}")
        self.buffer = MergeBuffer()
        self.lateness_s = lateness_s
        self.max_buffer = max(1, int(max_buffer))
        self.stats = SourceStats()
        self.dead: list[dict] = []  # dead letters found while reading (files only), emitted by the replay
        self.last_ts = -INF  # largest ts seen

    # to implement
    def poll(self, timeout_s: float = 0.1) -> None: ...
    def watermark(self) -> float: ...
    def ended(self) -> bool: ...  # nothing more will come (the buffer may still hold requests)
    def offsets(self) -> dict:  # what to commit: {TopicPartition: next offset to read}
        return {}
    def checkpoint_info(self) -> dict:
        return {}
    def close(self) -> None: ...

    def take(self, until: float) -> RequestColumns:
        return self.buffer.take(until)

    def _add(self, cols: RequestColumns) -> None:
        self.buffer.add(cols)
        self.stats.records += len(cols)
        if len(cols):
            self.last_ts = max(self.last_ts, float(cols.ts.max()))
        self.stats.max_buffered = max(self.stats.max_buffered, len(self.buffer))


# ------------------------------------------------------------------------------------------------------------
class FileSource(RequestSource):
    """A trace file read with ingest's readers (``iter_batches``); one batch per poll."""

    def __init__(self, config, lateness_s: float = 2.0, max_buffer: int = 100_000, batch_size: int = 5000):
        from adaptwin.ingest.source import iter_batches

        super().__init__(lateness_s, max_buffer)
        self._batches: Iterator = iter_batches(config, batch_size=batch_size)
        self._seq = 0
        self._ended = False

    def poll(self, timeout_s: float = 0.1) -> None:
        if self._ended:
            return
        if len(self.buffer) >= self.max_buffer and self.watermark() > -INF:
            return  # the replay must take what it has first
        try:
            batch = next(self._batches)
        except StopIteration:
            self._ended = True
            return
        self.dead.extend(batch.dead)
        if batch.requests:
            table = schemas.to_table(batch.requests, schemas.REQUEST)
            n = table.num_rows
            self._add(RequestColumns.from_table(table, 0, self._seq, np.full(n, -1)))
            self._seq += n
        self.stats.messages += 1

    def watermark(self) -> float:
        return INF if self._ended else self.last_ts - self.lateness_s

    def ended(self) -> bool:
        return self._ended


# ------------------------------------------------------------------------------------------------------------
class KafkaSource(RequestSource):
    """Requests of one ingest run id from ``adaptwin.requests`` (every partition, self-assigned)."""

    def __init__(self, bootstrap: str, run_id_in: str, group_id: str, *, topic: str = TOPICS.requests,
                 lateness_s: float = 2.0, max_buffer: int = 100_000, follow: bool = False, idle_exit_s: float = 5.0,
                 start_offsets: dict[int, int] | None = None, max_poll_records: int = 5000):
        from adaptwin.kafka import make_consumer, topic_partitions

        super().__init__(lateness_s, max_buffer)
        self.run_id_in = run_id_in
        self.topic = topic
        self.follow = follow
        self.idle_exit_s = idle_exit_s
        self.partitions = topic_partitions(bootstrap, [topic])
        self._consumer = make_consumer(bootstrap, group_id, max_partition_fetch_bytes=8 << 20)
        self._consumer.assign(self.partitions)
        start_offsets = start_offsets or {}
        for tp in self.partitions:
            if tp.partition in start_offsets:
                self._consumer.seek(tp, int(start_offsets[tp.partition]))
            else:
                self._consumer.seek_to_beginning(tp)
        self._end = self._consumer.end_offsets(self.partitions)  # batch mode: the run is what is there now
        self._latest = {tp.partition: -INF for tp in self.partitions}  # latest ts of the run seen per partition
        self._done = {tp.partition: False for tp in self.partitions}
        self._seq = Counter()
        self.first_offsets: dict[int, int] = {}  # first message offset of the run per partition (restart point)
        self._paused: set = set()
        self._max_poll_records = max_poll_records
        self._last_record_at = time.monotonic()
        self._ended = False
        self._refresh_done()

    # -- reading ---------------------------------------------------------------------------------------------
    def poll(self, timeout_s: float = 0.1) -> None:
        if self._ended:
            return
        self._flow_control()
        polled = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=self._max_poll_records)
        for tp, records in polled.items():
            self.stats.messages += len(records)
            self._ingest(tp.partition, records)
        if polled:
            self._last_record_at = time.monotonic()
        self._refresh_done()
        if self.follow:
            caught_up = all(self._caught_up(tp) for tp in self.partitions)
            if caught_up and time.monotonic() - self._last_record_at >= self.idle_exit_s:
                self._ended = True
        elif all(self._done.values()):
            self._ended = True

    def _ingest(self, part: int, records) -> None:
        values = [r.value for r in records]
        offsets = np.array([r.offset for r in records], dtype=np.int64)
        table, bad = schemas.decode_many(values, schemas.REQUEST)
        if bad:  # rare: find each record's message the slow way
            self.stats.bad_records += len(bad)
            log.warning("%d undecodable record(s) in %s[%d] (first: %s); skipped here, the lake sink "
                        "dead-letters them", len(bad), self.topic, part, bad[0][1])
            tables, msg = [], []
            for value, off in zip(values, offsets.tolist()):
                t, _ = schemas.decode_many([value], schemas.REQUEST)
                tables.append(t)
                msg.append(np.full(t.num_rows, off))
            table = pa.concat_tables(tables) if tables else schemas.to_table([], schemas.REQUEST)
            msg_off = np.concatenate(msg) if msg else np.zeros(0, dtype=np.int64)
        else:
            counts = [v.count(b"\n") + 1 if v.strip() else 0 for v in values]
            msg_off = np.repeat(offsets, counts)
            if msg_off.size != table.num_rows:  # blank lines: fall back to per-message counts
                msg_off = np.concatenate([np.full(schemas.decode_many([v], schemas.REQUEST)[0].num_rows, o)
                                          for v, o in zip(values, offsets.tolist())])
        if table.num_rows == 0:
            return
        mask = pc.equal(table["run_id"], self.run_id_in)
        keep = mask.to_numpy(zero_copy_only=False)
        n_keep = int(keep.sum())
        self.stats.other_runs += table.num_rows - n_keep
        if n_keep == 0:
            return
        if n_keep < table.num_rows:
            table, msg_off = table.filter(mask), msg_off[keep]
        cols = RequestColumns.from_table(table, part, self._seq[part], msg_off)
        self._seq[part] += n_keep
        self.first_offsets.setdefault(part, int(msg_off[0]))
        self._latest[part] = max(self._latest[part], float(cols.ts.max()))
        self._add(cols)

    def _caught_up(self, tp) -> bool:
        hw = self._consumer.highwater(tp)
        return hw is not None and self._consumer.position(tp) >= hw

    def _refresh_done(self) -> None:
        if self.follow:
            return
        for tp in self.partitions:
            if not self._done[tp.partition] and self._consumer.position(tp) >= self._end[tp]:
                self._done[tp.partition] = True

    def _flow_control(self) -> None:
        """Pause partitions ahead of the watermark while the buffer is full; resume when it has drained."""
        n = len(self.buffer)
        if n >= self.max_buffer:
            wm = self.watermark()
            ahead = [tp for tp in self.partitions
                     if not self._done[tp.partition] and self._latest[tp.partition] - self.lateness_s > wm
                     and tp not in self._paused]
            if ahead:
                self._consumer.pause(*ahead)
                self._paused.update(ahead)
                log.info("merge buffer holds %d requests (--max-backlog %d): paused %d partition(s) ahead of "
                         "the watermark %.1f s", n, self.max_buffer, len(ahead), wm)
            self.stats.paused_polls += 1
        elif self._paused and n < self.max_buffer // 2:
            self._consumer.resume(*self._paused)
            self._paused.clear()

    # -- what the replay asks --------------------------------------------------------------------------------
    def watermark(self) -> float:
        if self._ended:
            return INF
        top = max(self._latest.values())
        marks = []
        for tp in self.partitions:
            p = tp.partition
            if self._done[p]:
                continue
            latest = self._latest[p]
            if self.follow and self._caught_up(tp):
                latest = max(latest, top)
            marks.append(latest - self.lateness_s)
        return min(marks) if marks else INF

    def ended(self) -> bool:
        return self._ended

    def offsets(self) -> dict:
        """{TopicPartition: offset} of the first message not wholly taken by the replay, per partition."""
        held = self.buffer.min_offsets()
        out = {}
        for tp in self.partitions:
            out[tp] = held.get(tp.partition, self._consumer.position(tp))
        return out

    def checkpoint_info(self) -> dict:
        return {"start": {str(p): o for p, o in sorted(self.first_offsets.items())}}

    def close(self) -> None:
        self._consumer.close(autocommit=False)


# ------------------------------------------------------------------------------------------------------------
class RecordSource(RequestSource):
    """REQUEST records already in memory (tests, benchmarks, callers that hold a workload), given as batches
    that arrive one per poll, like messages of one partition each: ``batches=[(partition, [record, ...]), ...]``."""

    def __init__(self, batches, lateness_s: float = 2.0, max_buffer: int = 100_000):
        super().__init__(lateness_s, max_buffer)
        self._batches = list(batches)
        self._i = 0
        self._seq = Counter()
        self._latest: dict[int, float] = {p: -INF for p, _ in self._batches}

    def poll(self, timeout_s: float = 0.1) -> None:
        if self._i >= len(self._batches):
            return
        part, records = self._batches[self._i]
        self._i += 1
        if records:
            table = schemas.to_table(records, schemas.REQUEST)
            n = table.num_rows
            cols = RequestColumns.from_table(table, part, self._seq[part], np.full(n, -1))
            self._seq[part] += n
            self._latest[part] = max(self._latest[part], float(cols.ts.max()))
            self._add(cols)

    def watermark(self) -> float:
        if self.ended():
            return INF
        left = {p for p, _ in self._batches[self._i:]}
        return min(self._latest[p] for p in left) - self.lateness_s

    def ended(self) -> bool:
        return self._i >= len(self._batches)
