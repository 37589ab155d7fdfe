"""The Kafka side of ``adaptwin sweep``: tasks out, ``adaptwin twin worker`` processes simulate them, results back.

* :func:`publish_tasks` sends sweep tasks (one JSON record per message, keyed by task id) to ``adaptwin.sweep.tasks``
  (4 partitions: more workers in one consumer group share them).
* :class:`SweepWorker` (``adaptwin twin worker``) consumes tasks in a consumer group and, per task, sends the
  result row to ``adaptwin.sweep.results`` and commits the task's offset **in one Kafka transaction**
  (``send_offsets_to_transaction``), so a result is visible to ``read_committed`` readers if and only if its task is
  marked consumed. A worker killed mid-task leaves an open transaction that is aborted — at once when the worker
  restarts with the same ``--worker-id`` (``init_transactions`` fences it), else at the transaction timeout — and
  the task is consumed again by whoever holds its partition then. A malformed task goes to ``adaptwin.deadletter``
  with the reason, in the same transaction as its offset.
* :func:`collect_results` reads the results topic (``read_committed``, from the beginning, no consumer group: a
  sweep may be collected by several runs) and keeps the rows of the wanted task ids not yet in the dataset; the
  dataset holds one row per task id, so even a result delivered twice (a rebalance while a task was in flight)
  lands once.

kafka-python 3.0.12 group joins can stall under load (ingest/sink.py self-assigns for that reason); workers need a
group to share partitions, so they keep the project's 5-s metadata refresh (adaptwin.kafka.CONSUMER_DEFAULTS), a
short session timeout, and poll with a bounded wait so that a stalled join shows in the log instead of hanging.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from kafka import errors as kerrors

from adaptwin import schemas
from adaptwin.config import TOPICS
from adaptwin.kafka import exit_if_stalled

__all__ = ["WorkerConfig", "SweepWorker", "publish_tasks", "collect_results", "DEFAULT_GROUP"]

log = logging.getLogger("adaptwin.replay.worker")

DEFAULT_GROUP = "adaptwin-sweep-workers"
V = schemas.SCHEMA_VERSION


@dataclass(frozen=True)
class WorkerConfig:
    bootstrap: str
    group: str = DEFAULT_GROUP
    worker_id: str = ""
    """Names the worker's transactional id: restart a killed worker with the same id to abort its open transaction
    at once (default: host name and process id, i.e. a new id per process)."""
    tasks_topic: str = TOPICS.sweep_tasks
    results_topic: str = TOPICS.sweep_results
    idle_exit_s: float | None = None
    """Stop after this many seconds without a task (None: run until SIGTERM/SIGINT)."""
    max_tasks: int | None = None
    transaction_timeout_ms: int = 60_000
    session_timeout_ms: int = 10_000
    assign: tuple[int, int] | None = None
    """(i, n): take the task partitions p with p mod n == i yourself instead of joining the group's rebalancing (the
    sink's way around stalled group joins); offsets are still committed under ``group``. A killed worker's partitions
    then wait for it to come back."""


class SweepWorker:
    """Consumes sweep tasks, simulates them, produces results exactly once per committed task offset."""

    def __init__(self, cfg: WorkerConfig, run: Callable | None = None):
        from adaptwin.kafka import make_consumer, make_producer

        self.cfg = cfg
        self.worker_id = cfg.worker_id or f"{socket.gethostname()}-{os.getpid()}"
        if run is None:
            from adaptwin.twin.sweep import run_task

            profiles: dict = {}
            run = lambda task: run_task(task, profiles)  # noqa: E731
        self._run = run
        self.done = 0
        self.dead = 0
        self._stop = False
        self.producer = make_producer(cfg.bootstrap, transactional_id=f"adaptwin-sweep-{self.worker_id}",
                                      transaction_timeout_ms=cfg.transaction_timeout_ms, linger_ms=0)
        self.producer.init_transactions()  # fences this worker id's predecessor and aborts its open transaction
        group_opts = dict(max_poll_records=1, isolation_level="read_committed")
        if cfg.assign is None:
            self.consumer = make_consumer(cfg.bootstrap, cfg.group, cfg.tasks_topic,
                                          session_timeout_ms=cfg.session_timeout_ms,
                                          heartbeat_interval_ms=max(1000, cfg.session_timeout_ms // 4),
                                          max_poll_interval_ms=600_000, **group_opts)
        else:
            from adaptwin.kafka import topic_partitions

            i, n = cfg.assign
            mine = [tp for tp in topic_partitions(cfg.bootstrap, [cfg.tasks_topic]) if tp.partition % n == i]
            self.consumer = make_consumer(cfg.bootstrap, cfg.group, **group_opts)
            self.consumer.assign(mine)  # positions come from the group's committed offsets (earliest if none)

    def stop(self, *_args) -> None:
        self._stop = True

    def run(self) -> dict:
        """Process tasks until idle (``idle_exit_s``), ``max_tasks`` or :meth:`stop`; returns counts."""
        last = time.monotonic()
        while not self._stop:
            batches = self.consumer.poll(timeout_ms=500)
            if not batches:
                if self.cfg.idle_exit_s is not None and time.monotonic() - last >= self.cfg.idle_exit_s:
                    break
                continue
            for tp, messages in batches.items():
                for msg in messages:
                    self._handle(tp, msg)
                    last = time.monotonic()
                    if self.cfg.max_tasks is not None and self.done + self.dead >= self.cfg.max_tasks:
                        self._stop = True
                    if self._stop:
                        break
                if self._stop:
                    break
        return {"worker_id": self.worker_id, "tasks": self.done, "dead_letters": self.dead}

    def _handle(self, tp, msg) -> None:
        from kafka.structs import OffsetAndMetadata

        from adaptwin.twin.config import ConfigError
        from adaptwin.twin.sweep import SweepTask

        row, dead = None, None
        try:
            d = json.loads(msg.value)
            if not isinstance(d, dict) or d.get("v") != V:
                raise ConfigError(f"unknown task record version {d.get('v') if isinstance(d, dict) else None!r} "
                                  f"(this worker reads v={V})")
            task = SweepTask.from_dict(d)
        except (ValueError, ConfigError) as err:  # json errors are ValueErrors
            dead = {"v": V, "run_id": f"sweep-worker-{self.worker_id}", "stage": "sweep-worker",
                    "source": f"{tp.topic}/{tp.partition}", "line": msg.offset, "reason": f"bad sweep task: {err}",
                    "payload": bytes(msg.value or b"").decode("utf-8", "backslashreplace")[:65536]}
        else:
            row = self._run(task)
        self.producer.begin_transaction()
        try:
            if row is not None:
                self.producer.send(self.cfg.results_topic, key=row["task_id"].encode(),
                                   value=schemas.encode([{"v": V, **row}]))
            else:
                self.producer.send(TOPICS.deadletter, key=b"sweep", value=schemas.encode([dead]))
            with exit_if_stalled(f"sweep worker {self.worker_id}: committing a transaction", self.cfg.bootstrap):
                self.producer.send_offsets_to_transaction({tp: OffsetAndMetadata(msg.offset + 1, "", -1)},
                                                          self.cfg.group)
                self.producer.commit_transaction()
        except kerrors.KafkaError:
            try:
                with exit_if_stalled(f"sweep worker {self.worker_id}: aborting a transaction", self.cfg.bootstrap):
                    self.producer.abort_transaction()
            except kerrors.KafkaError:
                pass
            raise
        if row is not None:
            self.done += 1
            log.info("task %s (%s served %d max_loras %d) done%s", row["task_id"], row["model"],
                     row["served_adapters"], row["max_loras"], f": {row['error']}" if row["error"] else "")
        else:
            self.dead += 1
            log.warning("dead letter: %s", dead["reason"])

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        finally:
            self.producer.close()


def run_worker(cfg: WorkerConfig) -> dict:
    worker = SweepWorker(cfg)
    signal.signal(signal.SIGTERM, worker.stop)
    try:
        return worker.run()
    except KeyboardInterrupt:
        return {"worker_id": worker.worker_id, "tasks": worker.done, "dead_letters": worker.dead}
    finally:
        worker.close()


def publish_tasks(bootstrap: str, tasks: Iterable, topic: str = TOPICS.sweep_tasks) -> int:
    """Send ``tasks`` (SweepTask) keyed by task id; returns how many. acks=all + idempotence: none lost."""
    from adaptwin.kafka import make_producer

    producer = make_producer(bootstrap)
    n = 0
    failures: list = []
    try:
        for t in tasks:
            d = t.to_dict()
            producer.send(topic, key=d["task_id"].encode(), value=schemas.encode([{"v": V, **d}])
                          ).add_errback(failures.append)
            n += 1
        producer.flush()
    finally:
        producer.close()
    if failures:
        raise RuntimeError(f"the broker refused {len(failures)} sweep task(s): {failures[0]!r}")
    return n


def collect_results(bootstrap: str, wanted: set[str], on_rows: Callable[[list[dict]], None],
                    topic: str = TOPICS.sweep_results, idle_timeout_s: float = 120.0,
                    should_stop: Callable[[], bool] = lambda: False) -> int:
    """Read ``topic`` (read_committed, all partitions, from the start) until every id in ``wanted`` has a row;
    calls ``on_rows`` with each poll's new rows (ids removed from ``wanted`` as they arrive). Returns rows
    collected. Gives up (UserError) after ``idle_timeout_s`` without a new result."""
    from adaptwin.cliutil import UserError
    from adaptwin.kafka import make_consumer, topic_partitions

    consumer = make_consumer(bootstrap, None, isolation_level="read_committed")
    try:
        consumer.assign(topic_partitions(bootstrap, [topic]))
        consumer.seek_to_beginning()
        got = 0
        last = time.monotonic()
        while wanted and not should_stop():
            batches = consumer.poll(timeout_ms=500)
            rows = []
            for messages in batches.values():
                for msg in messages:
                    for line in bytes(msg.value or b"").splitlines():
                        try:
                            rec = json.loads(line)
                        except ValueError:
                            log.warning("skipping an unreadable result at %s offset %d", topic, msg.offset)
                            continue
                        tid = rec.get("task_id") if isinstance(rec, dict) else None
                        if tid in wanted:
                            wanted.discard(tid)
                            rec.pop("v", None)
                            rows.append(rec)
            if rows:
                on_rows(rows)
                got += len(rows)
                last = time.monotonic()
            elif time.monotonic() - last > idle_timeout_s:
                raise UserError(f"no sweep result for {idle_timeout_s:g} s with {len(wanted)} task(s) left: is a "
                                f"worker running? start one with `adaptwin twin worker --bootstrap {bootstrap}`")
        return got
    finally:
        consumer.close(autocommit=False)
