"""Telemetry records (``schemas.TELEMETRY`` per request, ``schemas.WINDOW`` per window and per run) and where
they go: Kafka, transactionally, or memory (tests, ``--dry-run``).

Exactly-once (docs/replay.md): the twin's state cannot be checkpointed, but a replay is deterministic, so a
killed replay restarts from the beginning of its input with a fresh twin and re-creates the very same records.
The :class:`KafkaEmitter` sends records inside Kafka transactions (``transactional_id`` =
``adaptwin-replay-<run id>``); each transaction also commits, under the replay's group id, the request offsets
consumed so far with the replay's progress in the offset metadata (the last tick whose output is in the
transaction, and how many records of each kind were sent). A restarted replay first fences its predecessor
(``init_transactions`` aborts its open transaction), reads that progress back, re-runs the ticks up to it
without sending anything, checks that it re-created the same number of records, and carries on. Readers that
use ``isolation_level="read_committed"`` see every record exactly once.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from kafka import errors as kerrors

from adaptwin import schemas
from adaptwin.cliutil import UserError
from adaptwin.config import TOPICS
from adaptwin.kafka import committed_offset, exit_if_stalled

log = logging.getLogger(__name__)

V = schemas.SCHEMA_VERSION
MAX_RECORDS_PER_MESSAGE = 1000  # NDJSON lines per Kafka message
_META_KEY = "adaptwin-replay"


# ------------------------------------------------------------------------------------------------------------
# records
def telemetry_records(run_id: str, backend: str, served: int, max_loras: int, request_id: list, adapter_id: list,
                      ts: list, prompt: list, output: list, ttft: list, itl: list, e2e: list, finished: list,
                      preempted: list, error: list) -> list[dict]:
    """TELEMETRY records from columns (plain Python lists, e.g. ``ndarray.tolist()``), built in one pass."""
    return [
        {"v": V, "request_id": r, "run_id": run_id, "backend": backend, "served": served, "max_loras": max_loras,
         "adapter_id": a, "ts": t, "prompt_tokens": p, "output_tokens": o, "ttft_ms": f, "itl_ms": i, "e2e_ms": e,
         "finished": d, "preempted": pr, "error": er}
        for r, a, t, p, o, f, i, e, d, pr, er in zip(request_id, adapter_id, ts, prompt, output, ttft, itl, e2e,
                                                     finished, preempted, error)]


def dead_letter(run_id: str, source: str, line: int | None, reason: str, payload: dict | str) -> dict:
    text = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"), default=str)
    return {"v": V, "run_id": run_id, "stage": "replay", "source": source, "line": line, "reason": reason,
            "payload": text[:65536]}


# ------------------------------------------------------------------------------------------------------------
# progress kept with the committed offsets
@dataclass
class Checkpoint:
    tick: int = -1  # the last tick whose records are committed (-1: none)
    telemetry: int = 0  # records sent up to and including that tick
    windows: int = 0
    dead: int = 0
    done: bool = False
    summary: dict | None = None  # the final --json summary, once done
    start: dict = field(default_factory=dict)  # partition -> first offset of the run (where a restart reads from)

    def to_metadata(self) -> str:
        d = {"k": _META_KEY, "tick": self.tick, "t": self.telemetry, "w": self.windows, "d": self.dead,
             "done": int(self.done), "start": self.start}
        if self.summary is not None:
            d["summary"] = self.summary
        text = json.dumps(d, separators=(",", ":"))
        if len(text) > 4000:  # the broker's offset.metadata.max.bytes defaults to 4096
            d.pop("summary", None)
            text = json.dumps(d, separators=(",", ":"))
        return text

    @classmethod
    def from_metadata(cls, text: str | None) -> "Checkpoint | None":
        if not text:
            return None
        try:
            d = json.loads(text)
        except ValueError:
            return None
        if not isinstance(d, dict) or d.get("k") != _META_KEY:
            return None
        return cls(tick=int(d["tick"]), telemetry=int(d["t"]), windows=int(d["w"]), dead=int(d["d"]),
                   done=bool(d.get("done")), summary=d.get("summary"),
                   start={int(p): int(o) for p, o in (d.get("start") or {}).items()})


# ------------------------------------------------------------------------------------------------------------
# emitters
class MemoryEmitter:
    """Keeps everything in lists (tests, ``--dry-run``); ``checkpoint`` only records the last progress."""

    def __init__(self) -> None:
        self.telemetry: list[dict] = []
        self.windows: list[dict] = []
        self.dead: list[dict] = []
        self.checkpoints: list[Checkpoint] = []

    def resume(self) -> Checkpoint | None:
        return None

    def send(self, telemetry: list[dict], windows: list[dict], dead: list[dict]) -> None:
        self.telemetry += telemetry
        self.windows += windows
        self.dead += dead

    def commit(self, checkpoint: Checkpoint, offsets: dict) -> None:
        self.checkpoints.append(checkpoint)

    def close(self) -> None:
        pass


class KafkaEmitter:
    """Telemetry, windows and dead letters to Kafka inside transactions that also commit the consumed offsets.

    ``group_id`` names the offsets (and carries the checkpoint); ``checkpoint_tp`` is the partition whose
    offset metadata holds it (a file replay, which consumes nothing, commits offset 0 there).
    """

    def __init__(self, bootstrap: str, run_id: str, group_id: str, checkpoint_tp, *,
                 transaction_timeout_ms: int = 60_000):
        from adaptwin.kafka import make_consumer, make_producer

        self.run_id = run_id
        self.group_id = group_id
        self.checkpoint_tp = checkpoint_tp
        self._producer = make_producer(bootstrap, transactional_id=f"adaptwin-replay-{run_id}",
                                       transaction_timeout_ms=transaction_timeout_ms)
        # fences an older replay of this run id and aborts its open transaction: from here on it can send nothing
        self._producer.init_transactions()
        self._bootstrap = bootstrap
        self._make_consumer = make_consumer
        self._in_txn = False
        self._failures: list[BaseException] = []
        self.messages = 0
        self.bytes = 0

    def resume(self) -> Checkpoint | None:
        consumer = self._make_consumer(self._bootstrap, self.group_id)
        try:
            committed = committed_offset(consumer, self.checkpoint_tp, metadata=True)
        finally:
            consumer.close(autocommit=False)
        return Checkpoint.from_metadata(committed.metadata) if committed is not None else None

    def _begin(self) -> None:
        if not self._in_txn:
            self._producer.begin_transaction()
            self._in_txn = True

    def _send(self, topic: str, key: bytes, records: list[dict]) -> None:
        for i in range(0, len(records), MAX_RECORDS_PER_MESSAGE):
            value = schemas.encode(records[i:i + MAX_RECORDS_PER_MESSAGE])
            self._producer.send(topic, key=key, value=value).add_errback(self._failures.append)
            self.messages += 1
            self.bytes += len(value)

    def send(self, telemetry: list[dict], windows: list[dict], dead: list[dict]) -> None:
        if not (telemetry or windows or dead):
            return
        self._begin()
        key = self.run_id.encode()
        if telemetry:
            self._send(TOPICS.telemetry, key, telemetry)
        if windows:
            self._send(TOPICS.windows, key, windows)
        if dead:
            self._send(TOPICS.deadletter, key, dead)

    def commit(self, checkpoint: Checkpoint, offsets: dict) -> None:
        """Commit the open transaction with ``offsets`` ({TopicPartition: next offset}) and the checkpoint."""
        from kafka.structs import OffsetAndMetadata

        self._begin()
        meta = checkpoint.to_metadata()
        offsets = dict(offsets) or {self.checkpoint_tp: 0}
        offsets.setdefault(self.checkpoint_tp, 0)
        payload = {tp: OffsetAndMetadata(int(off), meta if tp == self.checkpoint_tp else "", -1)
                   for tp, off in offsets.items()}
        try:
            with exit_if_stalled(f"replay {self.run_id}: committing a transaction", self._bootstrap):
                self._producer.send_offsets_to_transaction(payload, self.group_id)
                self._producer.commit_transaction()
        except (kerrors.ProducerFencedError, kerrors.InvalidProducerEpochError) as err:
            self._in_txn = False
            raise UserError(f"another replay with run id {self.run_id!r} started and took over ({type(err).__name__}); "
                            "this one stops without sending more") from None
        self._in_txn = False
        if self._failures:
            raise RuntimeError(f"the broker refused {len(self._failures)} telemetry message(s): {self._failures[0]!r}")

    def close(self) -> None:
        if self._producer is None:
            return
        try:
            if self._in_txn:
                with exit_if_stalled(f"replay {self.run_id}: aborting a transaction", self._bootstrap):
                    self._producer.abort_transaction()
        except kerrors.KafkaError as err:  # fenced or broker gone: the broker aborts it at the timeout anyway
            log.warning("could not abort the open transaction of replay %s: %s", self.run_id, err)
        finally:
            self._producer.close()
            self._producer = None


def summary_for_json(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without values JSON cannot hold (NaN)."""
    return {k: (None if isinstance(v, float) and v != v else v) for k, v in summary.items()}
