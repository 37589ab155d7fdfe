"""Kafka → Parquet lake sink (``adaptwin sink``): exactly-once by construction.

Per Kafka partition the sink buffers messages, then publishes them as Parquet files (one per run id)
named after the batch's offset range, and only after the rename commits the offsets. At start it
deletes files at or past the committed offset (written, but not committed before a crash), so whatever
is re-delivered replaces them instead of duplicating rows. Killed with SIGKILL at any moment and
restarted, the lake ends with exactly the produced rows.

The sink assigns itself every partition of its topics rather than joining a consumer group: a restart
resumes at once, with no group rebalance to wait for (kafka-python 3.0's group join can stall for
minutes after a broker restart or under load). Offsets are still committed under ``group_id``, so
`consumer_lag` sees the sink like any group. One sink per (lake, group) runs at a time; a lock file in
the lake refuses a second one.

Records that do not match their topic's schema go to the dead-letter topic with the reason; the
dead-letter producer is flushed before the offsets that carried them are committed.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from kafka import TopicPartition

from adaptwin import schemas
from adaptwin.config import TOPICS
from adaptwin.cliutil import UserError
from adaptwin.durable import fsync_dir, lock_exclusive, write_bytes_atomic
from adaptwin.kafka import (cluster_id, commit_offsets, committed_offset, make_consumer, make_producer,
                            topic_partitions)
from adaptwin.ingest import lake

log = logging.getLogger(__name__)

LAKE_OWNER = "_sink.json"  # the (Kafka cluster, sink group) whose offsets name the lake's files


@dataclass(frozen=True)
class SinkConfig:
    bootstrap: str
    lake: Path
    topics: tuple[str, ...] = tuple(topic for topic, _ in lake.TABLES.values())
    group_id: str = "adaptwin-sink"
    max_rows: int = 250_000  # publish a partition's buffer once it holds this many messages' rows ...
    max_age_s: float = 2.0  # ... or once its oldest message waited this long
    idle_exit_s: float | None = None  # stop after this long without new messages (tests, batch jobs)


@dataclass
class _Buffer:
    values: list[bytes] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    rows: int = 0
    since: float = 0.0


@dataclass
class SinkStats:
    messages: int = 0
    rows: int = 0
    files: int = 0
    dead_lettered: int = 0
    removed_uncommitted: int = 0
    first_message_at: float | None = None  # time.monotonic() of the first message polled
    last_commit_at: float | None = None  # ... and of the last commit (their difference: busy time)


class LakeSink:
    def __init__(self, config: SinkConfig):
        self.config = config
        self.stats = SinkStats()
        self._buffers: dict[TopicPartition, _Buffer] = {}
        self._stopping = False
        self._producer = None  # created on the first dead letter
        self._lock = _lock_lake(config.lake, config.group_id)
        try:
            _bind_lake(config.lake, config.bootstrap, config.group_id)
            partitions = topic_partitions(config.bootstrap, config.topics)
            # read_committed: a replay writes telemetry in transactions; an aborted one (a killed replay
            # that is re-run) must not reach the lake.
            self._consumer = make_consumer(config.bootstrap, config.group_id, max_partition_fetch_bytes=8 << 20,
                                           isolation_level="read_committed")
            self._consumer.assign(partitions)
            self._resume(partitions)
        except BaseException:
            os.close(self._lock)
            raise

    # -- lifecycle -------------------------------------------------------------------------------
    def stop(self, *_: object) -> None:
        """Finish the current batch, publish what is buffered, commit, and return from ``run``."""
        self._stopping = True

    def run(self) -> SinkStats:
        signal.signal(signal.SIGTERM, self.stop)
        last_message = time.monotonic()
        try:
            while not self._stopping:
                polled = self._consumer.poll(timeout_ms=200, max_records=20_000)
                now = time.monotonic()
                for tp, records in polled.items():
                    buf = self._buffers.setdefault(tp, _Buffer())
                    if not buf.values:
                        buf.since = now
                    for rec in records:
                        buf.values.append(rec.value)
                        buf.offsets.append(rec.offset)
                        buf.rows += rec.value.count(b"\n") + 1
                    self.stats.messages += len(records)
                    last_message = now
                    if self.stats.first_message_at is None:
                        self.stats.first_message_at = now
                for tp, buf in list(self._buffers.items()):
                    if buf.values and (buf.rows >= self.config.max_rows or now - buf.since >= self.config.max_age_s):
                        self._publish(tp)
                idle = self.config.idle_exit_s
                if idle is not None and not polled and now - last_message >= idle and not self._pending():
                    break
            for tp in list(self._buffers):
                self._publish(tp)
        finally:
            self._consumer.close(autocommit=False)
            if self._producer is not None:
                self._producer.close()
            os.close(self._lock)
        return self.stats

    def _pending(self) -> bool:
        return any(buf.values for buf in self._buffers.values())

    # -- publishing ------------------------------------------------------------------------------
    def _publish(self, tp: TopicPartition) -> None:
        buf = self._buffers.get(tp)
        if not buf or not buf.values:
            return
        table_name = lake.TABLE_OF_TOPIC[tp.topic]
        schema = lake.TABLES[table_name][1]
        table, bad = schemas.decode_many(buf.values, schema)
        if bad:
            dead = [_dead_letter(tp, buf.offsets[i], reason, raw) for i, reason, raw in bad]
            if tp.topic == TOPICS.deadletter:  # never loop: keep the unreadable dead letter as a row
                table = pa.concat_tables([table, schemas.to_table(dead, schemas.DEADLETTER)])
            else:
                self._send_dead(dead)
        first, last = buf.offsets[0], buf.offsets[-1]
        today = dt.datetime.now(dt.timezone.utc).date()
        for run_id in pc.unique(table["run_id"]).to_pylist() if table.num_rows else []:
            part = table.filter(pc.equal(table["run_id"], run_id))
            lake.write_atomic(part, lake.file_path(self.config.lake, table_name, run_id, today,
                                                   tp.partition, first, last))
            self.stats.files += 1
        commit_offsets(self._consumer, {tp: last})
        self.stats.last_commit_at = time.monotonic()
        self.stats.rows += table.num_rows
        self._buffers[tp] = _Buffer()

    def _send_dead(self, dead: list[dict]) -> None:
        if self._producer is None:
            self._producer = make_producer(self.config.bootstrap)
        for rec in dead:
            self._producer.send(TOPICS.deadletter, key=b"sink", value=schemas.encode([rec]))
        self._producer.flush()  # durable before the offsets that carried them are committed
        self.stats.dead_lettered += len(dead)

    # -- start-up ---------------------------------------------------------------------------------
    def _resume(self, partitions: list[TopicPartition]) -> None:
        """Drop lake files past each partition's committed offset, then read on from that offset."""
        for tp in partitions:
            committed = committed_offset(self._consumer, tp)
            removed = lake.drop_uncommitted(self.config.lake, lake.TABLE_OF_TOPIC[tp.topic], tp.partition,
                                            committed or 0)
            if removed:
                log.warning("removed %d lake file(s) of %s[%d] written past committed offset %d; "
                            "they will be rewritten", len(removed), tp.topic, tp.partition, committed or 0)
            self.stats.removed_uncommitted += len(removed)
            if committed is None:
                self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, committed)


def _lock_lake(root: Path, group_id: str) -> int:
    """An exclusive lock on ``<lake>/.sink.lock`` for the sink's lifetime (released on any exit)."""
    root.mkdir(parents=True, exist_ok=True)
    return lock_exclusive(root / ".sink.lock", f"another `adaptwin sink` is already writing {root} (this one: group "
                                               f"{group_id!r}); stop it first (two would write the same offsets twice)")


def _bind_lake(root: Path, bootstrap: str, group_id: str) -> None:
    """Tie the lake to one (Kafka cluster, sink group), or refuse the sink.

    Lake files are named after offsets of one cluster as one group committed them. A sink of another group, or of
    a re-created broker whose offsets start again at 0, would take those files for uncommitted leftovers and delete
    them, or write the same offsets a second time. The first sink binds the lake (``_sink.json``); others are refused.
    """
    cluster = cluster_id(bootstrap)
    wanted = {"cluster_id": cluster, "group_id": group_id}
    path = root / LAKE_OWNER
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        write_bytes_atomic(path, (json.dumps(wanted) + "\n").encode())
        fsync_dir(root)
        return
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path} ({err}); it says which Kafka cluster and sink group own this lake") from None
    if owner != wanted:
        raise UserError(
            f"the lake {root} is written from Kafka cluster {owner.get('cluster_id')} by sink group "
            f"{owner.get('group_id')!r}, this sink is group {group_id!r} on cluster {cluster} ({bootstrap}): its "
            "offsets do not describe the lake's files, so it would delete or duplicate rows. Use another --lake, "
            "or the owner's --group and broker")


def _dead_letter(tp: TopicPartition, offset: int, reason: str, raw: bytes) -> dict:
    return {"v": schemas.SCHEMA_VERSION, "run_id": "sink", "stage": "sink", "source": tp.topic, "line": offset,
            "reason": reason, "payload": raw.decode("utf-8", "backslashreplace")[:65536]}
