"""Stop a run early once its starvation verdict is settled: a sequential test on the backlog of offered tokens.

A run over ``[0, T)`` starves when the tokens of requests that arrived but did not finish by ``T`` — the backlog
``U(T)`` — are at least 10 % of the offered tokens ``O`` (completed = offered − backlog). The arrivals of the whole
window are known before the run, so ``O`` and the tokens offered up to any time are exact; only ``U(T)`` is unknown.

The engine is advanced in chunks of ``check_s`` seconds. After chunk ``i`` the backlog ``U_i`` (arrived − completed
tokens) is known; its increments ``d_i = U_i − U_{i−1}`` are roughly independent and identically distributed for the
paper's stationary (Poisson) workload: mean ≈ 0 for a stable server, the overload rate for one that cannot keep up.
With ``n`` chunks left and the increments' mean ``μ`` and standard deviation ``σ`` over the recent chunks (``m`` of
them), ``U(T) ≈ U_i + nμ`` with uncertainty ``σ√n`` (future noise, a random walk — conservative for a stable queue,
which does not wander) plus ``nσ/√m`` (error of ``μ``). The verdict is settled when
``U_i + nμ ± z(σ√n + nσ/√m)`` lies entirely on one side of ``0.1·O``; ``z`` = 4 by default, so a settled verdict is
wrong with probability far below 1e-3 under the model, and the model's weak spot (a queue still filling up early on)
is kept out by a warm-up. A run whose verdict is never settled runs to ``T`` and is exact.

>>> import numpy as np
>>> d = Backlog(offered=1000.0, duration=100.0, check_s=10.0)
>>> for i in range(1, 6): d.add(i * 10.0, 40.0 * i)   # the backlog grows by 40 tokens a chunk: overloaded
>>> d.verdict(EarlyStop(warmup_s=30.0, z=4.0))
True
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from adaptwin.twin.config import Arrivals, ServerConfig
from adaptwin.twin.engine import Engine
from adaptwin.twin.profile import Profile
from adaptwin.twin.result import STARVATION_THRESHOLD, SimResult

__all__ = ["EarlyStop", "Backlog", "RunOutcome", "SettlingRun", "run_until_settled"]


@dataclass(frozen=True)
class EarlyStop:
    """The sequential test's knobs."""

    check_s: float = 60.0
    """Chunk length: the backlog is checked after each chunk (also the engine's statistics window)."""
    warmup_s: float = 300.0
    """No verdict before this much simulated time (the queue of a loaded server is still filling)."""
    z: float = 4.0
    """Width of the projection band in standard deviations."""
    recent: float = 0.5
    """Share of the most recent increments used for the drift (the early ones carry the warm-up)."""
    trend_z: float = 3.0
    """A starving verdict also needs the backlog to end above the threshold if its growth decelerates as fast as the
    recent increments' trend allows (slope lowered by this many standard errors)."""
    min_increments: int = 4


class Backlog:
    """The backlog ``U`` of one run at its checkpoints, and the sequential test on where it ends."""

    def __init__(self, offered: float, duration: float, check_s: float):
        self.offered, self.duration, self.check_s = float(offered), float(duration), float(check_s)
        self.times: list[float] = [0.0]
        self.values: list[float] = [0.0]

    def add(self, t: float, backlog: float) -> None:
        self.times.append(float(t))
        self.values.append(float(backlog))

    def projection(self, rule: EarlyStop) -> tuple[float, float] | None:
        """(low, high) band of the backlog at the end of the window, or None while too little is known."""
        t = self.times[-1]
        d = np.diff(np.asarray(self.values))
        if t < rule.warmup_s or d.size < rule.min_increments:
            return None
        m = max(rule.min_increments, int(math.ceil(d.size * rule.recent)))
        d = d[-m:]
        mu, sd = float(d.mean()), float(d.std(ddof=1))
        n = max(0.0, (self.duration - t) / self.check_s)
        centre = self.values[-1] + n * mu
        spread = rule.z * (sd * math.sqrt(n) + n * sd / math.sqrt(m))
        return centre - spread, centre + spread

    def decelerating_low(self, rule: EarlyStop) -> float | None:
        """The end backlog if growth slows down as fast as the data allow: the recent increments' linear trend with
        its slope lowered by ``trend_z`` standard errors (never above 0), extrapolated until growth stops, minus the
        random-walk noise. A loaded but stable server's queue grows fast while it fills and then levels off; this
        keeps that warm-up from being read as overload."""
        d = np.diff(np.asarray(self.values))
        if d.size < rule.min_increments:
            return None
        m = max(rule.min_increments, int(math.ceil(d.size * rule.recent)))
        d = d[-m:]
        x = np.arange(m, dtype=np.float64) - (m - 1) / 2
        sxx = float((x * x).sum())
        mu = float(d.mean())
        slope = float((x * (d - mu)).sum() / sxx)
        resid = d - mu - slope * x
        sd = math.sqrt(float((resid ** 2).sum()) / max(1, m - 2))
        slope_low = min(0.0, slope - rule.trend_z * sd / math.sqrt(sxx))
        level = mu + slope * (m - 1) / 2 - rule.trend_z * sd / math.sqrt(m)  # the latest increment, low side
        n = int(max(0.0, (self.duration - self.times[-1]) / self.check_s))
        j = np.arange(1, n + 1, dtype=np.float64)
        growth = float(np.clip(level + slope_low * j, 0.0, None).sum())
        return self.values[-1] + growth - rule.z * sd * math.sqrt(n)

    def verdict(self, rule: EarlyStop) -> bool | None:
        """True: certainly starves; False: certainly does not; None: not settled yet."""
        band = self.projection(rule)
        if band is None or self.offered <= 0:
            return None
        limit = STARVATION_THRESHOLD * self.offered
        if band[0] >= limit and (self.decelerating_low(rule) or 0.0) >= limit:
            return True
        if band[1] < limit:
            return False
        return None

    def projected_ratio(self, rule: EarlyStop) -> float:
        band = self.projection(rule)
        centre = self.values[-1] if band is None else (band[0] + band[1]) / 2
        return min(1.0, max(0.0, centre / self.offered)) if self.offered > 0 else 0.0


@dataclass
class RunOutcome:
    """One run: the twin's ``--json`` summary when it ran to the end (``stopped_at`` None), otherwise the settled
    verdict with the projected starvation ratio and throughput."""

    summary: dict
    starved: bool
    starvation_ratio: float
    stopped_at: float | None = None

    @property
    def early(self) -> bool:
        return self.stopped_at is not None


class SettlingRun:
    """One run advanced in chunks of ``check_s``: :meth:`settle` stops at the first settled verdict, and
    :meth:`finish` carries the same engine on to the end of the window (no step is simulated twice). The engine's
    statistics window is the chunk whether or not the run is checked, so a run checked in chunks takes exactly the
    steps of one run in one go (the engine splits decode jumps at window ends)."""

    def __init__(self, config: ServerConfig, arrivals: Arrivals, duration: float, profile: Profile,
                 check_s: float = EarlyStop.check_s):
        self.duration = float(duration)
        self.check = min(float(check_s), self.duration)
        self.wall_s = 0.0
        t0 = time.perf_counter()
        self.engine = Engine(config, profile, window_s=self.check, track_completions=True)
        self.engine.add_arrivals(arrivals)
        self._time = arrivals.time
        self._tokens = (arrivals.prompt + arrivals.output).astype(np.float64)
        self._cum = np.concatenate([[0.0], np.cumsum(self._tokens)])
        self.offered = float(self._cum[np.searchsorted(self._time, self.duration, side="left")])
        self.backlog = Backlog(self.offered, self.duration, self.check)
        self._completed = 0.0
        self._k = 0  # chunks done
        self.wall_s += time.perf_counter() - t0

    @property
    def requests(self) -> int:
        return int(self._time.size)

    @property
    def simulated_s(self) -> float:
        return min(self._k * self.check, self.duration)

    def settle(self, rule: EarlyStop) -> RunOutcome:
        """Advance chunk by chunk until the verdict is settled (a projection) or the window ends (exact)."""
        t0 = time.perf_counter()
        eng = self.engine
        while (self._k + 1) * self.check < self.duration:
            self._k += 1
            t = self._k * self.check
            eng.advance_until(t)
            done = eng.drain_completions()
            if done:
                self._completed += float(self._tokens[done].sum())
            self.backlog.add(t, self._cum[np.searchsorted(self._time, t, side="right")] - self._completed)
            verdict = self.backlog.verdict(rule)
            if verdict is not None:
                ratio = self.backlog.projected_ratio(rule)
                ideal = self.offered / self.duration
                self.wall_s += time.perf_counter() - t0
                return RunOutcome(summary={"total_throughput": ideal * (1.0 - ratio), "ideal_total_throughput": ideal,
                                           "starved": int(verdict), "wall_s": self.wall_s},
                                  starved=verdict, starvation_ratio=ratio, stopped_at=t)
        self.wall_s += time.perf_counter() - t0
        return self.finish()

    def finish(self) -> RunOutcome:
        """Run to the end of the window: the twin's exact summary."""
        t0 = time.perf_counter()
        self.engine.advance_until(self.duration)
        self._k = math.ceil(self.duration / self.check)
        self.wall_s += time.perf_counter() - t0
        s = SimResult.from_engine(self.engine, self.duration, self.wall_s).summary()
        ideal = s["ideal_total_throughput"]
        ratio = 1.0 - s["total_throughput"] / ideal if ideal > 0 else 0.0
        return RunOutcome(summary=s, starved=bool(s["starved"]), starvation_ratio=ratio)


def run_until_settled(config: ServerConfig, arrivals: Arrivals, duration: float, profile: Profile,
                      rule: EarlyStop | None) -> RunOutcome:
    """Simulate ``arrivals`` on ``config`` over ``[0, duration)``, stopping once the starvation verdict is settled
    (``rule`` None: run to the end, exact)."""
    run = SettlingRun(config, arrivals, duration, profile, (rule or EarlyStop()).check_s)
    return run.finish() if rule is None else run.settle(rule)
