"""Shared fixtures: the real Kafka broker (DESIGN.md: delivery, offsets, restarts and kills use it).

- `kafka_broker` (session): one LocalBroker on free ports in a temp dir, all project topics created.
- `bootstrap`: its "127.0.0.1:port" string.
- `make_topic`: creates a uniquely named topic on that broker (isolates tests that share the broker).
- `broker_factory`: private brokers for fault tests that kill or restart theirs; all stopped at the end.

A test that uses any of these is marked `broker` automatically (`pytest -m "not broker"` skips them).
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from adaptwin.broker import LocalBroker, free_port
from adaptwin.kafka import ensure_topics

log = logging.getLogger(__name__)

BROKER_FIXTURES = {"kafka_broker", "bootstrap", "make_topic", "broker_factory"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if BROKER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


def _start(data_dir: Path) -> LocalBroker:
    return LocalBroker(port=free_port(), controller_port=free_port(), data_dir=data_dir,
                       heap="-Xmx384m").start()


def _stop(broker: LocalBroker) -> None:
    try:
        broker.stop()
    except Exception:  # never leave a JVM behind because a graceful stop failed
        log.exception("stopping the broker on %s failed; killing it", broker.bootstrap)
        broker.kill()


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    broker = _start(tmp_path_factory.mktemp("kafka"))
    try:
        ensure_topics(broker.bootstrap)
        yield broker
    finally:
        _stop(broker)


@pytest.fixture
def bootstrap(kafka_broker: LocalBroker) -> str:
    return kafka_broker.bootstrap


@pytest.fixture
def make_topic(kafka_broker: LocalBroker) -> Callable[..., str]:
    """make_topic(partitions=1, prefix="t") -> name of a new, empty topic on the session broker."""
    def make(partitions: int = 1, prefix: str = "t") -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        ensure_topics(kafka_broker.bootstrap, {name: partitions})
        return name
    return make


@pytest.fixture(scope="module")
def broker_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], LocalBroker]]:
    """broker_factory() -> a started private LocalBroker (module-scoped: start one per module, reuse it)."""
    started: list[LocalBroker] = []
    counter = itertools.count()

    def make() -> LocalBroker:
        broker = _start(tmp_path_factory.mktemp(f"kafka-private{next(counter)}"))
        started.append(broker)
        return broker

    yield make
    for broker in started:
        _stop(broker)
