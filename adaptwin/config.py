"""Defaults shared by every command: broker address, lake location, topic names."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_LAKE = "./lake"


@dataclass(frozen=True)
class Topics:
    """Kafka topic names (DESIGN.md §Data flow)."""

    requests: str = "adaptwin.requests"
    telemetry: str = "adaptwin.telemetry"
    windows: str = "adaptwin.windows"
    recommendations: str = "adaptwin.recommendations"
    deadletter: str = "adaptwin.deadletter"
    sweep_tasks: str = "adaptwin.sweep.tasks"
    sweep_results: str = "adaptwin.sweep.results"

    def all(self) -> list[str]:
        return list(self.__dict__.values())


TOPICS = Topics()

# Partitions per topic when the project creates them; requests are keyed by adapter, so more
# partitions let several replay workers share one trace while each adapter keeps its order.
TOPIC_PARTITIONS = {TOPICS.requests: 4, TOPICS.sweep_tasks: 4}


def bootstrap(value: str | None = None) -> str:
    """The broker address: the flag, else $ADAPTWIN_BOOTSTRAP, else 127.0.0.1:9092."""
    return value or os.environ.get("ADAPTWIN_BOOTSTRAP") or DEFAULT_BOOTSTRAP


def lake(value: str | os.PathLike | None = None) -> Path:
    """The lake root: the flag, else $ADAPTWIN_LAKE, else ./lake."""
    return Path(value or os.environ.get("ADAPTWIN_LAKE") or DEFAULT_LAKE)
