"""Kafka helpers every stage uses: readiness, topic creation, producer/consumer defaults, offsets, lag.

The defaults carry DESIGN.md's delivery rules: producers use acks=all with idempotence and retries, so a
broker restart loses and duplicates nothing; consumers never auto-commit, so a stage commits (last + 1)
only after its output is durable.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka import errors as kerrors
from kafka.admin import OffsetSpec
from kafka.codec import has_lz4, has_zstd
from kafka.structs import OffsetAndMetadata

from adaptwin.cliutil import UserError
from adaptwin.config import TOPIC_PARTITIONS, TOPICS

log = logging.getLogger(__name__)
T = TypeVar("T")

# A blocking client call that takes longer than this: the broker is gone, or the client is stuck.
CALL_TIMEOUT_S = 60.0
# A transactional call still waiting this long after the broker answers again is stuck (a restarted broker
# loads its coordinators in a few seconds); one waiting this long in all gives up on the broker.
STUCK_S = 20.0
DOWN_S = 600.0
# The exit status of a process that gave up on the broker (EX_TEMPFAIL): run it again and it resumes from its
# last commit, which is all that survives it anyway.
EXIT_BROKER_STALLED = 75

START_HINT = ("start the local broker with `make kafka-up` (or deploy/kafka/kafka.sh up), "
              "or point --bootstrap / $ADAPTWIN_BOOTSTRAP at a running broker")


def _compression() -> str | None:
    # zstd compresses JSON request batches best; kafka-python needs the `zstandard` package for it.
    if has_zstd():
        return "zstd"
    if has_lz4():
        return "lz4"
    return "gzip"


PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    # Idempotence makes retrying safe: a resend after a lost ack is de-duplicated by the broker, so a
    # broker restart neither loses nor duplicates records. `retries` stays at kafka-python's default
    # (unbounded, capped in time by delivery_timeout_ms), as its docs advise with idempotence.
    "enable_idempotence": True,
    "delivery_timeout_ms": 120_000,
    "linger_ms": 10,
    "batch_size": 256 * 1024,
    "compression_type": _compression(),
}

CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    # kafka-python 3.0.12 can join its group before its first metadata for the subscribed topics arrives
    # (seen right after a broker restart): it is assigned nothing and only rejoins at the next metadata
    # refresh, 5 minutes later by default. Refreshing every 5 s bounds that stall; it costs one tiny request.
    "metadata_max_age_ms": 5_000,
}


def _split(bootstrap: str) -> list[tuple[str, int]]:
    """'h1:9092,h2' -> [('h1', 9092), ('h2', 9092)]."""
    hosts = []
    for item in filter(None, (x.strip() for x in bootstrap.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep:
            host, port = item, "9092"
        try:
            hosts.append((host.strip("[]") or "127.0.0.1", int(port)))
        except ValueError:
            raise UserError(f"bad Kafka bootstrap address {item!r}: expected host:port, "
                            "e.g. 127.0.0.1:9092") from None
    return hosts


def _listening(bootstrap: str, timeout_s: float = 1.0) -> bool:
    """Whether any bootstrap address accepts a TCP connection (cheap, and no Kafka client to clean up)."""
    for host, port in _split(bootstrap):
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return True
        except OSError:
            continue
    return False


def _construct(cls: type[T], bootstrap: str, **config: Any) -> T:
    """cls(bootstrap_servers=bootstrap, **config), raising UserError if it cannot bootstrap.

    kafka-python 3.0.12's admin client and consumer start their IO thread before bootstrapping and leak
    it (with its sockets) when bootstrapping fails; a retry loop would pile them up. So build the object
    in two steps and stop what its failed __init__ left running.
    """
    obj = cls.__new__(cls)
    try:
        obj.__init__(bootstrap_servers=bootstrap, **config)
    except kerrors.KafkaError as e:
        for part, method in (("_client", "close"), ("_net", "stop")):
            try:
                getattr(vars(obj)[part], method)()
            except Exception:  # noqa: BLE001 -- best-effort cleanup of a half-built client
                pass
        if isinstance(e, kerrors.KafkaConfigurationError):   # a bad setting, not a missing broker
            raise
        raise UserError(f"cannot reach the Kafka broker at {bootstrap} ({type(e).__name__}: {e}); "
                        f"{START_HINT}") from None
    return obj


@contextmanager
def admin_client(bootstrap: str, timeout_s: float = 10.0, **overrides: Any) -> Iterator[KafkaAdminClient]:
    """A KafkaAdminClient that is closed on exit; raises UserError if the broker cannot be reached."""
    ms = int(timeout_s * 1000)
    admin = _construct(KafkaAdminClient, bootstrap, bootstrap_timeout_ms=ms,
                       request_timeout_ms=max(ms, 5000), **overrides)
    try:
        yield admin
    finally:
        admin.close()


def cluster_id(bootstrap: str, timeout_s: float = 10.0) -> str:
    """The Kafka cluster id: offsets mean something only within one cluster (a re-created broker starts at 0)."""
    with admin_client(bootstrap, timeout_s) as admin:
        return admin.describe_cluster()["cluster_id"]


def _broker_ready(bootstrap: str, timeout_s: float) -> str | None:
    """None if the broker answers and has an unfenced broker registered, else why not."""
    if not _listening(bootstrap, min(timeout_s, 1.0)):
        return "nothing accepts connections there"
    try:
        with admin_client(bootstrap, timeout_s) as admin:
            brokers = admin.describe_cluster().get("brokers") or []
    except UserError:
        return "it accepts connections but answers no Kafka requests yet"
    except kerrors.KafkaError as e:
        return f"{type(e).__name__}: {e}"
    if not any(not b.get("is_fenced", False) for b in brokers):
        return "no unfenced broker registered yet"
    return None


def wait_for_broker(bootstrap: str, timeout_s: float = 30.0) -> None:
    """Block until the broker at `bootstrap` answers a cluster request; UserError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        why = _broker_ready(bootstrap, max(0.5, min(left, 5.0)))
        if why is None:
            return
        if time.monotonic() >= deadline:
            raise UserError(f"the Kafka broker at {bootstrap} did not answer within {timeout_s:g} s "
                            f"(last: {why}); {START_HINT}")
        log.debug("waiting for %s: %s", bootstrap, why)
        time.sleep(0.2)


def _wanted(topics: Mapping[str, int] | Iterable[str] | None) -> dict[str, int]:
    if topics is None:
        topics = TOPICS.all()
    if isinstance(topics, Mapping):
        return {name: int(n) for name, n in topics.items()}
    return {name: TOPIC_PARTITIONS.get(name, 1) for name in topics}


def ensure_topics(bootstrap: str, topics: Mapping[str, int] | Iterable[str] | None = None,
                  replication_factor: int = 1, timeout_s: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet and wait until each has a leader; returns those created.

    `topics` maps names to partition counts, or lists names (partitions from config.TOPIC_PARTITIONS,
    else 1); None means every project topic (config.TOPICS.all()). Existing topics are left as they are.
    """
    wanted = _wanted(topics)
    with admin_client(bootstrap, timeout_s) as admin:
        existing = {t["name"]: len(t.get("partitions") or []) for t in admin.describe_topics()}
        for name, n in wanted.items():
            if name in existing and existing[name] < n:
                log.warning("topic %s has %d partitions, fewer than the %d configured; "
                            "consumers will scale out less than expected", name, existing[name], n)
        missing = {name: n for name, n in wanted.items() if name not in existing}
        created: list[str] = []
        if missing:
            result = admin.create_topics(
                {name: {"num_partitions": n, "replication_factor": replication_factor}
                 for name, n in missing.items()},
                timeout_ms=int(timeout_s * 1000), raise_errors=False)
            for t in result["topics"]:
                err = kerrors.for_code(t["error_code"])
                if err is kerrors.NoError:
                    created.append(t["name"])
                elif err is not kerrors.TopicAlreadyExistsError:  # another process won the race: fine
                    raise UserError(f"cannot create Kafka topic {t['name']!r} on {bootstrap}: "
                                    f"{err.__name__} {t.get('error_message') or ''}".rstrip())
        try:
            admin.wait_for_topics(list(wanted), timeout_ms=int(timeout_s * 1000))
        except kerrors.KafkaTimeoutError as e:
            raise UserError(f"Kafka topics on {bootstrap} got no leader in time ({e}); "
                            f"check the broker's log (.cache/kafka/run-*/kafka.log)") from None
    if created:
        log.info("created Kafka topics %s", ", ".join(sorted(created)))
    return created


def topic_partitions(bootstrap: str, topics: Iterable[str], timeout_s: float = 30.0) -> list[TopicPartition]:
    """Every partition of `topics`, in a stable order; UserError naming any topic that does not exist."""
    names = list(topics)
    with admin_client(bootstrap, timeout_s) as admin:
        described = {t["name"]: t for t in admin.describe_topics(names)}
    missing = [n for n in names if n not in described or described[n].get("error_code", 0) != 0
               or not described[n].get("partitions")]
    if missing:
        raise UserError(f"Kafka topic(s) {', '.join(missing)} do not exist on {bootstrap}; "
                        f"create them with `adaptwin topics create`")
    return [TopicPartition(n, p["partition_index"]) for n in names
            for p in sorted(described[n]["partitions"], key=lambda p: p["partition_index"])]


def make_producer(bootstrap: str, **overrides: Any) -> KafkaProducer:
    """A KafkaProducer with the project's delivery defaults (PRODUCER_DEFAULTS), any of them overridable."""
    return _construct(KafkaProducer, bootstrap, **{**PRODUCER_DEFAULTS, **overrides})


def make_consumer(bootstrap: str, group_id: str | None, topics: str | Iterable[str] = (),
                  **overrides: Any) -> KafkaConsumer:
    """A KafkaConsumer in `group_id` subscribed to `topics` (none: assign partitions yourself).

    Auto-commit is off: commit with commit_offsets() once what was consumed is durable downstream.
    """
    names = [topics] if isinstance(topics, str) else list(topics)
    consumer = _construct(KafkaConsumer, bootstrap, group_id=group_id, **{**CONSUMER_DEFAULTS, **overrides})
    if names:
        consumer.subscribe(names)
    return consumer


def commit_offsets(consumer: KafkaConsumer, last_offsets: Mapping[TopicPartition, int],
                   metadata: str = "") -> None:
    """Commit, for each partition, the offset after the last record processed (last + 1)."""
    if not last_offsets:
        return
    consumer.commit({tp: OffsetAndMetadata(last + 1, metadata, -1) for tp, last in last_offsets.items()},
                    timeout_ms=int(CALL_TIMEOUT_S * 1000))


def committed_offset(consumer: KafkaConsumer, tp: TopicPartition, metadata: bool = False):
    """The group's committed offset of ``tp`` (None if none); KafkaTimeoutError after CALL_TIMEOUT_S (kafka-python
    waits forever by default, e.g. for a group coordinator that never comes back)."""
    return consumer.committed(tp, metadata=metadata, timeout_ms=int(CALL_TIMEOUT_S * 1000))


@contextmanager
def exit_if_stalled(what: str, bootstrap: str, stuck_s: float = STUCK_S, down_s: float = DOWN_S) -> Iterator[None]:
    """Exit the process (EXIT_BROKER_STALLED) if the block is still running ``stuck_s`` after the broker answers
    again, or ``down_s`` in all.

    kafka-python 3.0.12's transactional calls (send_offsets_to_transaction, commit_transaction,
    abort_transaction) wait without a timeout and cannot be interrupted, and after a broker restart one was seen
    to wait forever with the broker back up. A process stuck like that is worse than one that exits: what it
    committed is in Kafka, and run again (by hand, a supervisor, compose's restart policy) it fences its own
    open transaction and resumes from its last commit. While the broker is down, waiting is right: the call
    goes on by itself once it is back.
    """
    done = threading.Event()

    def watch() -> None:
        t0 = up_since = time.monotonic()
        while not done.wait(0.5):
            now = time.monotonic()
            if not _listening(bootstrap, timeout_s=0.5):
                up_since = now
            if now - up_since >= stuck_s or now - t0 >= down_s:
                break
        else:
            return
        log.error("%s is stuck (%.0f s, the broker answering for the last %.0f s): the Kafka client did not "
                  "recover. Exiting (status %d); run the same command again: it resumes from its last commit",
                  what, time.monotonic() - t0, time.monotonic() - up_since, EXIT_BROKER_STALLED)
        sys.stderr.flush()
        os._exit(EXIT_BROKER_STALLED)

    watcher = threading.Thread(target=watch, name="exit-if-stalled", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()


def consumer_lag(bootstrap: str, group_id: str, topics: Iterable[str] | None = None,
                 timeout_s: float = 10.0) -> dict[tuple[str, int], int]:
    """Records not yet committed by `group_id`, per (topic, partition).

    Covers the partitions the group has committed offsets for, plus every partition of `topics` if given
    (a partition without a commit counts from its earliest offset).
    """
    with admin_client(bootstrap, timeout_s) as admin:
        try:
            committed = admin.list_group_offsets(group_id).get(group_id, {})
        except kerrors.GroupIdNotFoundError:
            committed = {}
        tps = {tp for tp, om in committed.items()}
        if topics:
            for t in admin.describe_topics(list(topics)):
                if t.get("error_code", 0) == 0:
                    tps.update(TopicPartition(t["name"], p["partition_index"]) for p in t["partitions"])
        if not tps:
            return {}
        latest = admin.list_partition_offsets({tp: OffsetSpec.LATEST for tp in tps})
        uncommitted = [tp for tp in tps if tp not in committed or committed[tp].offset < 0]
        earliest = (admin.list_partition_offsets({tp: OffsetSpec.EARLIEST for tp in uncommitted})
                    if uncommitted else {})
    lag: dict[tuple[str, int], int] = {}
    for tp in sorted(tps):
        start = committed[tp].offset if tp not in earliest else earliest[tp].offset
        lag[(tp.topic, tp.partition)] = max(0, latest[tp].offset - start)
    return lag
