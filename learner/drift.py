"""Drift detection on the learner's prediction error (river.drift).

The detector watches the chosen model's absolute log residual per window (|log observed/predicted throughput|). A
workload change the features describe (rates, adapters, skew) moves the prediction with it and need not raise the
error; what the features do not explain — the server got slower, a new model version, a twin that no longer fits —
raises it, and that is what a drift means here. After a drift the caller adapts the models
(:meth:`~adaptwin.learner.online.OnlineModel.adapt`) and the detector starts afresh.

>>> d = DriftMonitor(DriftConfig(method="page-hinkley"))
>>> [d.update(0.02) for _ in range(30)].count(True)
0
>>> any(d.update(0.5) for _ in range(5))
True
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DriftConfig", "DriftMonitor", "METHODS"]

METHODS = ("page-hinkley", "adwin")


@dataclass(frozen=True)
class DriftConfig:
    method: str = "page-hinkley"
    """``page-hinkley`` (fires 2–3 windows after a jump of the error) or ``adwin`` (distribution-free, but river's
    ADWIN needs 20–40 windows to see the same jump: long streams only)."""
    min_windows: int = 10
    """Windows seen before a drift may be declared (Page-Hinkley's ``min_instances``)."""
    threshold: float = 0.5
    """Page-Hinkley: cumulative excess of the log error (0.5 ≈ two windows 25 % off, or five 10 % off)."""
    delta: float = 0.02
    """Page-Hinkley: error increase tolerated per window (log units) before it accumulates."""
    adwin_delta: float = 0.002

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown drift method {self.method!r}; choose from {', '.join(METHODS)}")


class DriftMonitor:
    """One river detector over the absolute log residuals; :meth:`update` says whether a drift was detected."""

    def __init__(self, config: DriftConfig = DriftConfig()) -> None:
        self.config = config
        self.detections = 0
        self._detector = self._make()

    def _make(self):
        from river import drift

        c = self.config
        if c.method == "adwin":
            return drift.ADWIN(delta=c.adwin_delta, clock=4, min_window_length=max(1, c.min_windows // 2),
                               grace_period=c.min_windows)
        return drift.PageHinkley(min_instances=c.min_windows, delta=c.delta, threshold=c.threshold, mode="up")

    def update(self, abs_error: float) -> bool:
        self._detector.update(float(abs_error))
        if self._detector.drift_detected:
            self.detections += 1
            self._detector = self._make()
            return True
        return False
