"""Helpers for the ingest tests: run a config to completion, copy shipped traces."""

from __future__ import annotations

from pathlib import Path

import pytest

from adaptwin.ingest.readers.shipped import shipped_path
from adaptwin.ingest.source import IngestConfig, IngestStats, iter_batches


class Ingested:
    def __init__(self, config: IngestConfig, batch_size: int = 500):
        self.stats = IngestStats()
        self.batches = list(iter_batches(config, batch_size=batch_size, stats=self.stats))
        self.requests = [r for b in self.batches for r in b.requests]
        self.dead = [d for b in self.batches for d in b.dead]

    def dead_by_line(self) -> dict[int, str]:
        """line -> reason code."""
        return {d["line"]: d["reason"].split(":", 1)[0] for d in self.dead}


@pytest.fixture
def ingest():
    return lambda config, batch_size=500: Ingested(config, batch_size)


@pytest.fixture
def shipped_lines():
    """The lines (bytes, without newline) of a shipped trace."""
    return lambda name: shipped_path(name).read_bytes().split(b"\n")


def _write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture
def write_lines():
    """Write byte lines (newline-terminated) to a path; returns the path."""
    return _write_lines
