"""``adaptwin learn``: the Kafka side of the streaming learner, exactly once across SIGKILL.

Reads ``adaptwin.windows`` (``read_committed``: replay writes it in transactions), hands each record to a
:class:`~adaptwin.learner.stream.StreamLearner`, and publishes what comes out to ``adaptwin.recommendations`` (and
refused records to ``adaptwin.deadletter``) inside Kafka transactions that also commit the consumed window offsets
under the learner's group (``transactional_id = adaptwin-learner-<group>``; a restarted learner fences its
predecessor and aborts its open transaction). A record is therefore published if and only if its window's offset is
committed.

The model state is checkpointed (atomically, :mod:`~adaptwin.learner.checkpoint`) every ``checkpoint_every`` windows,
right after a commit, with the offsets it has consumed — so a checkpoint is never ahead of the committed offsets. On
restart the learner loads the checkpoint, seeks to its offsets and re-learns the windows between the checkpoint and
the committed offset *without publishing* (their records are already in the topic; the restored models and policy
re-create exactly the same records), then carries on publishing. Nothing is skipped, nothing is learned twice by
the model that is checkpointed next, nothing is published twice. The committed offsets' metadata carries the counters
of the state at that commit, and the catch-up checks that it re-created the same counts.

Like the lake sink, the learner assigns itself the topic's partitions instead of joining a consumer group (a
restarted learner must resume at once, and kafka-python's group join can stall); a lock file in the checkpoint
directory refuses a second learner on the same state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from kafka import errors as kerrors
from kafka.structs import OffsetAndMetadata

from adaptwin import schemas
from adaptwin.cliutil import UserError
from adaptwin.config import TOPICS
from adaptwin.durable import lock_exclusive
from adaptwin.kafka import committed_offset, exit_if_stalled
from adaptwin.learner import checkpoint
from adaptwin.learner.stream import STATE_FORMAT, StreamConfig, StreamLearner, Timings
from adaptwin.learner.workload import WindowError

__all__ = ["LearnerConfig", "run"]

log = logging.getLogger("adaptwin.learner.consumer")
_META_KEY = "adaptwin-learner"


@dataclass(frozen=True)
class LearnerConfig:
    bootstrap: str
    checkpoint_dir: Path
    group: str = "adaptwin-learner"
    """Consumer group of the committed offsets and suffix of the transactional id: one per learner configuration."""
    stream: StreamConfig = field(default_factory=StreamConfig)
    checkpoint_every: int = 10
    max_windows: int | None = None
    """Stop once this many windows have been learned (counted over restarts, like the checkpoint's counters)."""
    idle_exit_s: float | None = None
    """Stop after this long without a new record (None: run until interrupted)."""
    until_run_end: bool = False
    """Stop after the ``scope="run"`` record of ``stream.run_id`` (the replay finished)."""
    warm_start: tuple[str, ...] = ()
    """Sweep files and/or ``twin`` (a starvation-boundary search of the traffic of the first ``workload_windows``
    windows, within ``twin_budget_s``)."""
    warm_rows: int = 2000
    twin_budget_s: float = 60.0
    ask_twin: bool = True
    windows_topic: str = TOPICS.windows
    recommendations_topic: str = TOPICS.recommendations
    deadletter_topic: str = TOPICS.deadletter
    max_poll_records: int = 50
    progress: bool = True
    cluster_id: str | None = None
    """The broker's cluster id, recorded in the checkpoint: its offsets mean nothing to another cluster."""

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1:
            raise UserError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.max_windows is not None and self.max_windows < 1:
            raise UserError(f"--max-windows must be >= 1, got {self.max_windows}")


# ------------------------------------------------------------------------------------------------------------------
def _dead_letter(run_id: str, source: str, offset: int, reason: str, payload: bytes) -> dict:
    return {"v": schemas.SCHEMA_VERSION, "run_id": run_id, "stage": "learner", "source": source, "line": offset,
            "reason": reason[:2000], "payload": payload.decode("utf-8", "backslashreplace")[:65536]}


def _run_id_of(line: bytes) -> str:
    try:
        obj = json.loads(line)
        rid = obj.get("run_id") if isinstance(obj, dict) else None
        return rid if isinstance(rid, str) and rid else "learner"
    except ValueError:
        return "learner"


def _fingerprint(stream: StreamConfig) -> str:
    return hashlib.sha1(json.dumps(stream.fingerprint(), sort_keys=True).encode()).hexdigest()[:10]


def _progress_meta(learner: StreamLearner) -> str:
    return json.dumps({"k": _META_KEY, "f": _fingerprint(learner.config), "w": learner.windows_learned,
                       "s": learner.windows_skipped,
                       "r": learner.recommendations, "d": learner.drifts}, separators=(",", ":"))


def _counts(learner: StreamLearner) -> tuple[int, int, int, int]:
    return learner.windows_learned, learner.windows_skipped, learner.recommendations, learner.drifts


def _new_learner(cfg: LearnerConfig) -> StreamLearner:
    learner = StreamLearner(cfg.stream)
    for source in cfg.warm_start:
        if source == "twin":
            learner.twin_warm_pending = cfg.twin_budget_s
            continue
        from adaptwin.learner.dataset import DatasetError, read_runs
        from adaptwin.learner.online import warm_runs

        try:
            pool = read_runs(source)
        except (DatasetError, OSError) as err:
            raise UserError(f"--warm-start {source}: {err}") from None
        rows = warm_runs(pool, cfg.stream.model, cfg.warm_rows, seed=cfg.stream.seed)
        if not rows:
            raise UserError(f"--warm-start {source} has no rows for model {cfg.stream.model!r}")
        learner.warm(rows, Path(source).name)
    return learner


def _lock_checkpoint(directory: Path) -> int:
    """An exclusive lock file in the checkpoint directory (released by the OS when the process dies)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    return lock_exclusive(path, f"another `adaptwin learn` holds {path}; stop it or use another --checkpoint")


# ------------------------------------------------------------------------------------------------------------------
def run(cfg: LearnerConfig) -> dict:
    """Consume windows until a stop condition; returns the summary (the ``--json`` line)."""
    from adaptwin.kafka import cluster_id, make_consumer, make_producer, topic_partitions, wait_for_broker

    started = time.monotonic()
    lock = _lock_checkpoint(Path(cfg.checkpoint_dir))
    wait_for_broker(cfg.bootstrap, timeout_s=30)
    cfg = replace(cfg, cluster_id=cluster_id(cfg.bootstrap))
    saved = (checkpoint.read_meta(cfg.checkpoint_dir) or {}).get("cluster_id")
    if saved not in (None, cfg.cluster_id):
        os.close(lock)
        raise UserError(f"checkpoint {cfg.checkpoint_dir} holds offsets of Kafka cluster {saved}, the broker at "
                        f"{cfg.bootstrap} is cluster {cfg.cluster_id} (a new broker starts its offsets again at 0): "
                        "use another --checkpoint and --group, or the broker it was made with")
    tps = topic_partitions(cfg.bootstrap, [cfg.windows_topic])
    topic_partitions(cfg.bootstrap, [cfg.recommendations_topic, cfg.deadletter_topic])
    producer = make_producer(cfg.bootstrap, transactional_id=f"adaptwin-learner-{cfg.group}",
                             transaction_timeout_ms=60_000)
    producer.init_transactions()  # fences a previous learner of this group and aborts its open transaction
    consumer = make_consumer(cfg.bootstrap, cfg.group, isolation_level="read_committed",
                             max_poll_records=cfg.max_poll_records)
    stop = {"signal": None}

    def _on_term(signum, _frame):  # finish the current batch, commit, checkpoint, then exit
        stop["signal"] = signum

    old_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        consumer.assign(tps)
        committed = {}
        meta = None
        for tp in tps:
            om = committed_offset(consumer, tp, metadata=True)
            committed[tp] = om.offset if om is not None and om.offset is not None and om.offset >= 0 else None
            if tp == tps[0] and om is not None:
                meta = om.metadata
        owner = _meta_fingerprint(meta)
        if owner is not None and owner != _fingerprint(cfg.stream):
            raise UserError(f"group {cfg.group!r} has committed offsets of a learner with other options (run filter, "
                            "model or candidates); give this one its own --group and --checkpoint")
        state = checkpoint.load(cfg.checkpoint_dir)
        if state is not None:
            learner: StreamLearner = state
            if getattr(learner, "state_format", 1) != STATE_FORMAT:
                raise UserError(f"checkpoint {cfg.checkpoint_dir} was written by an older adaptwin learner (state "
                                f"format {getattr(learner, 'state_format', 1)}, this one reads {STATE_FORMAT}); use "
                                "another --checkpoint (and --group), or move it away to re-learn from the beginning")
            if learner.config.fingerprint() != cfg.stream.fingerprint():
                raise UserError(f"checkpoint {cfg.checkpoint_dir} was made with {learner.config.fingerprint()}, not "
                                f"{cfg.stream.fingerprint()}; use another --checkpoint (and --group)")
            log.info("resuming from checkpoint %s: %d windows learned, offsets %s", cfg.checkpoint_dir,
                     learner.windows_learned, learner.offsets)
        else:
            learner = _new_learner(cfg)
        begin = consumer.beginning_offsets(tps)
        for tp in tps:
            start = learner.offsets.get(tp.partition, begin[tp])
            if start < begin[tp]:
                raise UserError(f"{tp.topic}[{tp.partition}] no longer holds offset {start} (retention removed it); "
                                "the checkpoint cannot be resumed: move it away to start afresh")
            if committed[tp] is not None and start < committed[tp]:
                log.info("%s[%d]: re-learning offsets %d..%d without publishing (already committed)", tp.topic,
                         tp.partition, start, committed[tp] - 1)
            consumer.seek(tp, start)
        return _loop(cfg, learner, consumer, producer, tps, committed, meta, stop, started)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        try:
            producer.close()
        finally:
            consumer.close(autocommit=False)
            os.close(lock)


def _ask_twin(cfg: LearnerConfig):
    if not cfg.ask_twin:
        return None
    from adaptwin.learner.policy import twin_what_if

    return lambda workload, s, m, duration: twin_what_if(workload, s, m, duration, seed=cfg.stream.seed)


def _loop(cfg: LearnerConfig, learner: StreamLearner, consumer, producer, tps, committed: dict, meta: str | None,
          stop: dict, started: float) -> dict:
    from tqdm import tqdm

    timings = Timings()
    ask_twin = _ask_twin(cfg)
    checked = all(c is None or learner.offsets.get(tp.partition, -1) >= c for tp, c in committed.items())
    since_ckpt = 0
    replayed = published = dead_total = 0
    last_record = time.monotonic()
    done = False
    bar = tqdm(desc="learn", unit="win", file=sys.stderr, disable=not cfg.progress, initial=learner.windows_learned)

    def finish_catch_up() -> None:
        nonlocal checked
        if checked:
            return
        checked = True
        want = _expected(meta)
        if want is not None and want != _counts(learner):
            log.warning("catch-up re-created counts %s but the last commit recorded %s: the windows topic changed "
                        "under the checkpoint or the learner is not deterministic", _counts(learner), want)

    while not done:
        if stop["signal"] is not None:
            break
        polled = consumer.poll(timeout_ms=500)
        if not polled:
            if all(committed.get(tp) is None or learner.offsets.get(tp.partition, 0) >= committed[tp] for tp in tps):
                finish_catch_up()
            if cfg.idle_exit_s is not None and time.monotonic() - last_record >= cfg.idle_exit_s:
                break
            continue
        last_record = time.monotonic()
        out_recs: list[dict] = []
        out_dead: list[dict] = []
        offsets: dict = {}
        for tp in tps:
            for msg in polled.get(tp, []):
                live = committed.get(tp) is None or msg.offset >= committed[tp]
                if live:
                    finish_catch_up()
                n_before = learner.windows_learned
                recs, dead = _process_message(learner, msg, ask_twin, timings, cfg.windows_topic)
                learner.offsets[tp.partition] = msg.offset + 1
                offsets[tp] = msg.offset + 1
                since_ckpt += learner.windows_learned - n_before
                bar.update(learner.windows_learned - n_before)
                if live:
                    out_recs += recs
                    out_dead += dead
                else:
                    replayed += learner.windows_learned - n_before
                if (cfg.max_windows is not None and learner.windows_learned >= cfg.max_windows) or \
                        (cfg.until_run_end and _is_run_end(msg.value, cfg.stream.run_id)):
                    done = True
                    break
            if done:
                break
        live_offsets = {tp: off for tp, off in offsets.items() if committed.get(tp) is None or off > committed[tp]}
        if live_offsets:
            _commit(cfg, producer, out_recs, out_dead, live_offsets, tps[0], learner)
            for tp, off in live_offsets.items():
                committed[tp] = off
            published += len(out_recs)
            dead_total += len(out_dead)
        if since_ckpt >= cfg.checkpoint_every and _checkpoint_allowed(learner, committed, tps):
            _save(cfg, learner)
            since_ckpt = 0
    if _checkpoint_allowed(learner, committed, tps):
        _save(cfg, learner)
    bar.close()
    summary = learner.summary()
    summary.update(timings.summary())
    summary.update({"published": published, "dead_letters": dead_total, "relearned_without_publishing": replayed,
                    "offsets": {str(p): o for p, o in sorted(learner.offsets.items())},
                    "wall_s": round(time.monotonic() - started, 3)})
    return summary


def _expected(meta: str | None) -> tuple[int, int, int, int] | None:
    try:
        d = json.loads(meta or "")
    except ValueError:
        return None
    if not isinstance(d, dict) or d.get("k") != _META_KEY:
        return None
    return int(d["w"]), int(d["s"]), int(d["r"]), int(d["d"])


def _meta_fingerprint(meta: str | None) -> str | None:
    try:
        d = json.loads(meta or "")
    except ValueError:
        return None
    return d.get("f") if isinstance(d, dict) and d.get("k") == _META_KEY else None


def _is_run_end(value: bytes, run_id: str | None) -> bool:
    if run_id is None:
        return False
    for line in (value or b"").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and obj.get("scope") == "run" and obj.get("run_id") == run_id:
            return True
    return False


def _process_message(learner: StreamLearner, msg, ask_twin, timings: Timings, topic: str) -> tuple[list, list]:
    """Records to publish and dead letters for one Kafka message (an NDJSON batch of WINDOW records)."""
    recs: list[dict] = []
    dead: list[dict] = []
    source = f"{topic}[{msg.partition}]"
    for line in (msg.value or b"").splitlines():
        if not line.strip():
            continue
        try:
            w = schemas.decode(line, schemas.WINDOW)[0]
            extra = set(w) - set(schemas.WINDOW.names)
            if extra:
                raise schemas.RecordError(f"unknown field(s) {sorted(extra)}")
            recs += learner.process(w, ask_twin, timings)
        except (schemas.RecordError, WindowError) as err:
            log.warning("window record at %s offset %d refused: %s", source, msg.offset, err)
            dead.append(_dead_letter(_run_id_of(line), source, msg.offset, str(err), line))
    return recs, dead


def _commit(cfg: LearnerConfig, producer, recs: list[dict], dead: list[dict], offsets: dict, meta_tp,
            learner: StreamLearner) -> None:
    failures: list = []
    producer.begin_transaction()
    try:
        by_run: dict[str, list[dict]] = {}
        for r in recs:
            by_run.setdefault(r["run_id"], []).append(r)
        for run_id, rows in by_run.items():
            producer.send(cfg.recommendations_topic, key=run_id.encode(),
                          value=schemas.encode(rows)).add_errback(failures.append)
        if dead:
            producer.send(cfg.deadletter_topic, key=b"learner", value=schemas.encode(dead)).add_errback(failures.append)
        meta = _progress_meta(learner)
        with exit_if_stalled(f"learner {cfg.group}: committing a transaction", cfg.bootstrap):
            producer.send_offsets_to_transaction(
                {tp: OffsetAndMetadata(off, meta if tp == meta_tp else "", -1) for tp, off in offsets.items()},
                cfg.group)
            producer.commit_transaction()
    except (kerrors.ProducerFencedError, kerrors.InvalidProducerEpochError) as err:
        raise UserError(f"another learner with group {cfg.group!r} started and took over ({type(err).__name__}); "
                        "this one stops") from None
    if failures:
        raise RuntimeError(f"the broker refused {len(failures)} learner message(s): {failures[0]!r}")


def _checkpoint_allowed(learner: StreamLearner, committed: dict, tps) -> bool:
    """A checkpoint must not be ahead of the committed offsets (its windows' records would never be published)."""
    return all(tp.partition not in learner.offsets
               or (committed.get(tp) is not None and learner.offsets[tp.partition] <= committed[tp]) for tp in tps)


def _save(cfg: LearnerConfig, learner: StreamLearner) -> None:
    checkpoint.save(cfg.checkpoint_dir, learner, {**learner.summary(), "offsets": learner.offsets,
                                                  "cluster_id": cfg.cluster_id, "saved_at": time.time(),
                                                  "pid": os.getpid()})
    log.debug("checkpoint: %d windows, offsets %s", learner.windows_learned, learner.offsets)
