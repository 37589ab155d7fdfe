"""Kafka's side of the Pipeline page: consumer lag per group and topic, and which project topics exist.

The dashboard never consumes Kafka; it asks the broker's admin API for committed and latest offsets
(``adaptwin.kafka.consumer_lag``). A broker that is down or slow gives a message, not a hang: a quick TCP
probe first, then short admin timeouts.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from adaptwin.cliutil import UserError
from adaptwin.config import TOPICS

LAKE_TOPICS = (TOPICS.requests, TOPICS.telemetry, TOPICS.windows, TOPICS.recommendations, TOPICS.deadletter)


@dataclass
class KafkaStatus:
    bootstrap: str
    error: str | None = None  # why nothing could be read
    lag: list[dict] = field(default_factory=list)  # group, topic, partition, lag
    missing_topics: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)


def _reachable(bootstrap: str, timeout_s: float) -> bool:
    for item in bootstrap.split(","):
        host, _, port = item.strip().rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port or 9092)), timeout=timeout_s):
                return True
        except (OSError, ValueError):
            continue
    return False


def _group_ids(listing) -> list[str]:
    out = []
    for g in listing:
        if isinstance(g, dict):
            gid = g.get("group_id") or g.get("group") or g.get("groupId")
        elif isinstance(g, (tuple, list)):
            gid = g[0]
        else:
            gid = getattr(g, "group_id", None) or getattr(g, "group", None)
        if gid:
            out.append(str(gid))
    return sorted(set(out))


def status(bootstrap: str, groups: tuple[str, ...] = (), timeout_s: float = 3.0) -> KafkaStatus:
    """Lag of ``groups`` (default: every group the broker knows) on every topic they committed."""
    from kafka import errors as kerrors

    from adaptwin.kafka import admin_client, consumer_lag

    out = KafkaStatus(bootstrap)
    if not _reachable(bootstrap, min(timeout_s, 1.0)):
        out.error = (f"no Kafka broker answers at {bootstrap}. Start one with `make kafka-up`, or start the "
                     f"dashboard with --bootstrap / $ADAPTWIN_BOOTSTRAP pointing at yours.")
        return out
    try:
        with admin_client(bootstrap, timeout_s) as admin:
            topics = set(admin.list_topics())
            out.missing_topics = [t for t in LAKE_TOPICS if t not in topics]
            out.groups = list(groups) or _group_ids(admin.list_groups())
        for group in out.groups:
            for (topic, partition), lag in consumer_lag(bootstrap, group, timeout_s=timeout_s).items():
                out.lag.append({"group": group, "topic": topic, "partition": partition, "lag": lag})
    except UserError as err:
        out.error = str(err)
    except kerrors.KafkaError as err:
        out.error = f"the broker at {bootstrap} did not answer ({type(err).__name__}: {err})"
    return out
