"""Dashboard settings, passed from ``adaptwin dashboard`` to the Streamlit process through the environment.

The Streamlit script cannot take argparse flags of its own, so the CLI resolves everything once and
exports it; the pages read ``current()`` on every run (cheap), which also lets tests point a page at a
lake with ``monkeypatch.setenv``.

The lake is fixed when the dashboard starts: no widget changes it, so a browser user cannot point the
Query page's DuckDB at another directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from adaptwin import config

ENV_REFRESH = "ADAPTWIN_DASHBOARD_REFRESH"
ENV_TTL = "ADAPTWIN_DASHBOARD_TTL"
ENV_GROUPS = "ADAPTWIN_DASHBOARD_GROUPS"

DEFAULT_REFRESH_S = 5.0
DEFAULT_TTL_S = 2.0


def _float(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        return default


@dataclass(frozen=True)
class Settings:
    lake: Path  # absolute lake root
    bootstrap: str  # Kafka broker, used only for consumer lag on the Pipeline page
    refresh_s: float = DEFAULT_REFRESH_S  # live fragments rerun this often; 0 turns auto-refresh off
    groups: tuple[str, ...] = ()  # consumer groups to show; empty: every group the broker knows

    @property
    def run_every(self) -> float | None:
        return self.refresh_s if self.refresh_s > 0 else None


def current() -> Settings:
    groups = tuple(g for g in os.environ.get(ENV_GROUPS, "").split(",") if g.strip())
    return Settings(lake=config.lake().resolve(), bootstrap=config.bootstrap(),
                    refresh_s=_float(ENV_REFRESH, DEFAULT_REFRESH_S), groups=groups)


def cache_ttl_s() -> float:
    """TTL of cached query results (read once, when the data module is imported)."""
    return _float(ENV_TTL, DEFAULT_TTL_S)
