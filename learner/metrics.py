"""Prequential metrics, kept as running sums so that they cost O(1) per row and can be checkpointed.

The throughput error is the paper's "half" sMAPE, ``100 · mean(|y − p| / (|y| + |p|))`` (a 0/0 term counts as 0),
and the textbook sMAPE is twice it. Starvation is scored with accuracy and the F1 of the class ``starved = 1``.

>>> m = PrequentialMetrics()
>>> for y, p, s, ps in [(100.0, 90.0, 0, 0), (50.0, 50.0, 1, 1), (10.0, 30.0, 1, 0)]:
...     m.update(y, p, s, ps)
>>> round(m.half_smape, 4), round(m.smape, 4), round(m.accuracy, 4), round(m.f1, 4)
(18.4211, 36.8421, 0.6667, 0.6667)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PrequentialMetrics", "half_smape_term"]


def half_smape_term(y: float, p: float) -> float:
    """One term of the half sMAPE, in percent: 100·|y − p| / (|y| + |p|); 0 when both are 0."""
    den = abs(y) + abs(p)
    return 0.0 if den == 0 else 100.0 * abs(y - p) / den


@dataclass
class PrequentialMetrics:
    """Running throughput error, starvation confusion counts and interval coverage."""

    n: int = 0
    _smape_sum: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0
    _covered: int = 0
    _n_interval: int = 0

    def update(self, y: float, p: float, starved: int, predicted_starved: int,
               interval: tuple[float, float] | None = None) -> None:
        self.n += 1
        self._smape_sum += half_smape_term(y, p)
        if starved and predicted_starved:
            self.tp += 1
        elif predicted_starved:
            self.fp += 1
        elif starved:
            self.fn += 1
        else:
            self.tn += 1
        if interval is not None:
            self._n_interval += 1
            self._covered += int(interval[0] <= y <= interval[1])

    @property
    def half_smape(self) -> float:
        return self._smape_sum / self.n if self.n else 0.0

    @property
    def smape(self) -> float:
        """Textbook sMAPE (2 × the half sMAPE)."""
        return 2.0 * self.half_smape

    @property
    def accuracy(self) -> float:
        return (self.tp + self.tn) / self.n if self.n else 0.0

    @property
    def f1(self) -> float:
        """F1 of the class starved = 1 (1.0 when there are neither true nor predicted positives)."""
        den = 2 * self.tp + self.fp + self.fn
        return 1.0 if den == 0 else 2 * self.tp / den

    @property
    def coverage(self) -> float | None:
        return self._covered / self._n_interval if self._n_interval else None

    def as_dict(self) -> dict:
        out = {"rows": self.n, "throughput_half_smape": round(self.half_smape, 4),
               "throughput_smape": round(self.smape, 4), "starvation_accuracy": round(self.accuracy, 4),
               "starvation_f1": round(self.f1, 4)}
        if self.coverage is not None:
            out["interval_coverage"] = round(self.coverage, 4)
        return out
