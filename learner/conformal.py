"""Split-conformal prediction intervals on a rolling window of absolute residuals.

The learner predicts log(throughput / offered load); the interval is that prediction ± the ``1 − alpha`` quantile
of the last ``window`` absolute residuals (in log space, so it is multiplicative in tokens/s). Residuals are
recorded prequentially (prediction made before the row was learned), which is what makes the interval honest
under drift: when the model gets worse, the window widens within ``window`` rows.

>>> c = RollingConformal(alpha=0.2, window=5)
>>> c.half_width() is None
True
>>> for r in [0.1, -0.2, 0.05, 0.3, -0.01]:
...     c.update(r)
>>> round(c.half_width(), 3)
0.3
>>> for _ in range(5):
...     c.update(0.0)
>>> c.half_width()
0.0
"""

from __future__ import annotations

import bisect
import collections
import math

__all__ = ["RollingConformal"]


class RollingConformal:
    """Rolling split-conformal half-width: the ceil((n+1)(1−alpha))-th smallest of the last ``window`` |residuals|."""

    def __init__(self, alpha: float = 0.1, window: int = 200, min_samples: int = 5) -> None:
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.alpha = alpha
        self.window = window
        self.min_samples = min_samples
        self._fifo: collections.deque[float] = collections.deque()
        self._sorted: list[float] = []

    def update(self, residual: float) -> None:
        r = abs(float(residual))
        if not math.isfinite(r):
            return
        self._fifo.append(r)
        bisect.insort(self._sorted, r)
        if len(self._fifo) > self.window:
            old = self._fifo.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]

    def half_width(self) -> float | None:
        """The interval half-width, or None while fewer than ``min_samples`` residuals were seen."""
        n = len(self._sorted)
        if n < self.min_samples:
            return None
        k = min(n, math.ceil((n + 1) * (1 - self.alpha)))
        return self._sorted[k - 1]
