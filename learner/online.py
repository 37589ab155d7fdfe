"""The streaming model: several candidate learners side by side, the one with the lowest recent prequential error
answers.

Every window is first predicted by every candidate (:class:`~adaptwin.learner.models.ThroughputLearner`), scored
(half sMAPE of throughput), then learned by all of them; the *chosen* candidate is the one with the lowest mean error
over the last ``error_window`` windows (beating the current one by 5 %, so near-ties do not flip it). Its signed
log residuals (kept prequentially) give the conformal interval and the starvation probability: the share of recent
residuals ``e`` with ``predicted log ratio + e ≤ log 0.9``, which is near 0.5 exactly when the prediction sits on
the starvation line.

``version`` goes up whenever the answering model changes: a different candidate is chosen, or the candidates are
adapted after drift (:meth:`adapt`).

>>> from adaptwin.learner.features import Scenario, features
>>> m = OnlineModel(["linear", "hoeffding"])
>>> x = features(Scenario.round_robin("llama-3.1-8b-instruct", [0.1], [8], served=16, max_loras=16))
>>> for _ in range(3):
...     _ = m.learn(x, 600.0, 0)
>>> m.n_learned, m.chosen in ("linear", "hoeffding"), 0.0 <= m.predict(x).starvation_prob <= 1.0
(3, True, True)
"""

from __future__ import annotations

import collections
import copy
import logging
import math
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

from adaptwin.learner.dataset import Run
from adaptwin.learner.features import features
from adaptwin.learner.metrics import half_smape_term
from adaptwin.learner.models import STARVED_RATIO, ThroughputLearner, make_regressor
from adaptwin.learner.conformal import RollingConformal

__all__ = ["OnlineModel", "StreamPrediction", "warm_runs"]

log = logging.getLogger("adaptwin.learner.online")

STREAM_CANDIDATES = ("linear", "hoeffding", "bagging", "capacity")
"""Default candidates of the streaming learner: the baseline, a tree and a bagged ensemble (ARF is slower than the
per-window budget; name it with ``--models`` to include it)."""
_LOG_STARVED = math.log(STARVED_RATIO)


@dataclass(frozen=True)
class StreamPrediction:
    throughput: float
    low: float
    high: float
    offered: float
    log_ratio: float
    starvation_prob: float

    @property
    def relative_width(self) -> float:
        """(high − low) / predicted throughput: how unsure the model is."""
        return (self.high - self.low) / self.throughput if self.throughput > 0 else math.inf


class OnlineModel:
    """Candidate learners compared prequentially; the best answers (see the module docstring)."""

    def __init__(self, names: Sequence[str] = STREAM_CANDIDATES, seed: int = 0, alpha: float = 0.1,
                 residual_window: int = 100, error_window: int = 30, min_residuals: int = 5,
                 switch_ratio: float = 0.95) -> None:
        if not names:
            raise ValueError("at least one candidate model is needed")
        self.names = list(names)
        self.seed = seed
        self.alpha = alpha
        self.learners = {n: ThroughputLearner(make_regressor(n, seed), None, alpha=alpha, window=residual_window)
                         for n in self.names}
        # untrained copies of what drift resets: the residual corrector (and a self-correcting regressor's own `dz`)
        self._fresh = {n: (copy.deepcopy(lrn.corrector), copy.deepcopy(getattr(lrn.regressor, "dz", None)))
                       for n, lrn in self.learners.items()}
        self.errors = {n: collections.deque(maxlen=error_window) for n in self.names}
        self.residuals: collections.deque[float] = collections.deque(maxlen=residual_window)
        self.conformal = RollingConformal(alpha=alpha, window=residual_window)
        self.min_residuals = min_residuals
        self.switch_ratio = switch_ratio
        # the structural model answers first when present (best offline, sane from its first row); else the first
        self.chosen = "capacity" if "capacity" in self.names else self.names[0]
        self.version = 1
        self.n_learned = 0
        self.n_warm = 0

    # ---- warm start -----------------------------------------------------------------------------------------------
    def warm(self, runs: Iterable[Run]) -> int:
        """Pre-train every candidate on twin runs (sweep rows or what-if runs); returns how many were learned."""
        n = 0
        for run in runs:
            x = features(run.scenario)
            for lrn in self.learners.values():
                lrn.warm_one(x, run.throughput, run.starved)
            n += 1
        self.n_warm += n
        return n

    # ---- predict / learn ------------------------------------------------------------------------------------------
    def mean_error(self, name: str) -> float | None:
        e = self.errors[name]
        return sum(e) / len(e) if e else None

    def starvation_prob(self, log_ratio: float) -> float:
        """P(ratio ≤ 0.9) from the recent signed residuals; a hard 0/1 before there are enough of them."""
        if len(self.residuals) < self.min_residuals:
            return 1.0 if log_ratio <= _LOG_STARVED else 0.0
        hits = sum(1 for e in self.residuals if log_ratio + e <= _LOG_STARVED)
        return hits / len(self.residuals)

    def predict(self, x: dict) -> StreamPrediction:
        p = self.learners[self.chosen].predict_one(x)
        hw = self.conformal.half_width()
        low, high = (p.throughput, p.throughput) if hw is None else (p.offered * math.exp(p.log_ratio - hw),
                                                                      p.offered * math.exp(p.log_ratio + hw))
        return StreamPrediction(p.throughput, low, high, p.offered, p.log_ratio, self.starvation_prob(p.log_ratio))

    def learn(self, x: dict, throughput: float, starved: int) -> float:
        """Score every candidate on this window, learn it, re-choose; returns the chosen model's signed log residual
        (observed − predicted, before learning)."""
        residual = 0.0
        for name, lrn in self.learners.items():
            p = lrn.predict_one(x)
            self.errors[name].append(half_smape_term(throughput, p.throughput))
            if name == self.chosen:
                residual = (math.log(max(throughput / p.offered, 1e-3)) - p.log_ratio) if p.offered > 0 else 0.0
            lrn.learn_one(x, throughput, starved)
        self.residuals.append(residual)
        self.conformal.update(residual)
        self.n_learned += 1
        self._choose()
        return residual

    def _choose(self) -> None:
        scored = [(self.mean_error(n), i, n) for i, n in enumerate(self.names) if self.errors[n]]
        if not scored or len(self.errors[self.chosen]) < 5:
            return
        err, _, best = min(scored)
        current = self.mean_error(self.chosen)
        # switch only on a clear win: near-ties would flip the answering model (and its version) every window
        if best != self.chosen and err < self.switch_ratio * current:
            log.info("model %s -> %s (recent half-sMAPE %.2f %% vs %.2f %%)", self.chosen, best,
                     self.mean_error(self.chosen), self.mean_error(best))
            self.chosen = best
            self.version += 1

    def adapt(self) -> None:
        """After drift: forget what described the old regime, keep what generalises.

        Warm-started learners keep their twin prior (workload and configuration are its features) and get a fresh
        residual corrector; cold ones keep their regressor (Hoeffding/ARF trees adapt on their own). Residuals,
        interval and recent errors restart, so the interval and the model choice reflect the new regime only.
        """
        for name, lrn in self.learners.items():
            corrector, dz = self._fresh[name]
            if lrn.n_warm and lrn.corrector is not None:
                lrn.corrector = copy.deepcopy(corrector)
            if lrn.n_warm and dz is not None:
                lrn.regressor.dz = copy.deepcopy(dz)
            lrn.conformal = RollingConformal(alpha=lrn.conformal.alpha, window=lrn.conformal.window)
        for e in self.errors.values():
            e.clear()
        self.residuals.clear()
        self.conformal = RollingConformal(alpha=self.conformal.alpha, window=self.conformal.window)
        self.version += 1


def warm_runs(pool: Sequence[Run], model: str, limit: int, seed: int = 0) -> list[Run]:
    """Up to ``limit`` rows of a sweep file for ``model`` (a seeded random sample, shuffled)."""
    rows = [r for r in pool if r.scenario.model == model]
    rng = random.Random(seed)
    rows = rng.sample(rows, limit) if len(rows) > limit else list(rows)
    rng.shuffle(rows)
    return rows
