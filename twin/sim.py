"""Batch entry point: :func:`simulate` one configuration over a fixed window."""

from __future__ import annotations

import math
import time as _time

from adaptwin.twin.config import Arrivals, ConfigError, ServerConfig
from adaptwin.twin.engine import Engine
from adaptwin.twin.profile import Profile
from adaptwin.twin.result import SimResult

__all__ = ["simulate"]


def simulate(config: ServerConfig, arrivals: Arrivals, duration: float, window_s: float = 60.0,
             profile: Profile | None = None) -> SimResult:
    """Run ``arrivals`` through a twin of ``config`` for ``duration`` seconds (requests still in flight then are
    cancelled, as the paper's client does) and return the :class:`SimResult`."""
    if not isinstance(duration, (int, float)) or not math.isfinite(duration) or duration <= 0:
        raise ConfigError(f"duration must be a positive number of seconds, got {duration!r}")
    if len(arrivals) == 0:
        raise ConfigError("no arrivals to simulate: the workload is empty (check rates, duration or the trace)")
    t0 = _time.perf_counter()
    eng = Engine(config, profile, window_s=window_s)
    eng.add_arrivals(arrivals)
    eng.advance_until(duration)
    return SimResult.from_engine(eng, duration, _time.perf_counter() - t0)
