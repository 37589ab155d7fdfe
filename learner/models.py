"""The learner's models: throughput as a fraction of the offered load, an interval, and starvation.

Structure (more important than the choice of river estimator):

* **Target.** A run can never complete more than its offered load (:func:`~adaptwin.learner.features.ideal_throughput`),
  so the regressor predicts ``log(throughput / offered)`` capped at 0, and the prediction is ``offered · exp(ŷ)``.
  Starvation follows from it: ``starved ⇔ throughput / offered ≤ 0.9`` (paper §1.3).
* **Warm start + correction.** Rows learned with :meth:`ThroughputLearner.warm_one` (twin runs) train the *prior*
  regressor. Once warm, real rows no longer move the prior: a small *corrector* (k nearest neighbours over the last
  ``corrector_window`` rows, on the prior's prediction and a few configuration features) learns the residual
  real − prior. The twin's shape stays, its bias for this deployment is learned from the first few dozen rows. Without
  warm start the regressor itself learns online.
* **Interval.** Split-conformal on a rolling window of absolute log residuals (:class:`RollingConformal`).
* **Starvation.** Two answers every row: *derived* (predicted ratio ≤ 0.9) and *classifier* (a dedicated river
  classifier on the features plus the predicted log ratio); the evaluation keeps both scores and picks one.

>>> from adaptwin.learner.features import Scenario, features
>>> learner = ThroughputLearner(make_regressor("linear"))
>>> x = features(Scenario.round_robin("llama-3.1-8b-instruct", [0.1], [8], served=16, max_loras=16))
>>> learner.learn_one(x, 600.0, 0)
>>> p = learner.predict_one(x)
>>> p.throughput <= p.offered, p.starved_derived in (0, 1)
(True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from adaptwin.learner.conformal import RollingConformal

__all__ = ["CANDIDATES", "Prediction", "ThroughputLearner", "make_classifier", "make_regressor", "STARVED_RATIO"]

STARVED_RATIO = 0.9
"""A run starves when it completes at most this fraction of the offered tokens (1 − ratio ≥ 0.1)."""
_FLOOR = 1e-3  # smallest ratio learned (log space)
_CORRECTOR_KEYS = ("is_qwen", "log2_served", "log2_max_loras", "log_kv_load", "rank_max")


def _linear(seed: int):
    from river import linear_model, optim, preprocessing

    return preprocessing.StandardScaler() | linear_model.LinearRegression(optimizer=optim.SGD(0.01),
                                                                          intercept_lr=0.05, l2=0.0)


def _hoeffding(seed: int):
    from river import preprocessing, tree

    return preprocessing.StandardScaler() | tree.HoeffdingAdaptiveTreeRegressor(grace_period=50, seed=seed)


def _arf(seed: int):
    from river import forest

    return forest.ARFRegressor(n_models=10, seed=seed)


def _bagging(seed: int):
    from river import ensemble, preprocessing, tree

    return ensemble.BaggingRegressor(preprocessing.StandardScaler() | tree.HoeffdingTreeRegressor(grace_period=50),
                                     n_models=5, seed=seed)


CANDIDATES: dict[str, Callable[[int], object]] = {
    "linear": _linear,  # StandardScaler | LinearRegression: the baseline
    "hoeffding": _hoeffding,  # HoeffdingAdaptiveTreeRegressor: one adaptive tree
    "arf": _arf,  # ARFRegressor (10 trees): a random forest with drift detectors
    "bagging": _bagging,  # BaggingRegressor of 5 Hoeffding trees (online bagging)
}
"""Regressor families compared by prequential error (name -> factory taking a seed)."""


def make_regressor(name: str, seed: int = 0):
    """A fresh river regressor of family ``name`` (one of :data:`CANDIDATES`)."""
    try:
        return CANDIDATES[name](seed)
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(CANDIDATES)}") from None


def make_classifier(seed: int = 0):
    """The dedicated starvation classifier: a Hoeffding adaptive tree on the features + the predicted log ratio."""
    from river import tree

    return tree.HoeffdingAdaptiveTreeClassifier(grace_period=50, seed=seed)


def _make_corrector(window: int):
    from river import neighbors, preprocessing

    return preprocessing.StandardScaler() | neighbors.KNNRegressor(
        n_neighbors=3, engine=neighbors.LazySearch(window_size=window))


@dataclass(frozen=True)
class Prediction:
    """What the learner says about one scenario."""

    throughput: float
    """Predicted total tokens/s."""
    low: float
    high: float
    """Conformal interval (tokens/s); equal to ``throughput`` until enough residuals were seen."""
    offered: float
    """Offered load (tokens/s) the prediction is capped at."""
    log_ratio: float
    """Predicted log(throughput / offered) (≤ 0)."""
    starved_derived: int
    """1 when the predicted ratio is ≤ 0.9."""
    starvation_prob: float | None
    """The dedicated classifier's P(starved); None without a classifier."""

    @property
    def starved_classifier(self) -> int:
        if self.starvation_prob is None:
            return self.starved_derived
        return int(self.starvation_prob >= 0.5)


class ThroughputLearner:
    """Throughput (with interval) and starvation of one configuration under one workload, learned online.

    ``regressor``: a river regressor of the log ratio; ``corrector_window`` (0 = off) sizes the residual corrector
    used after a warm start; ``classifier``: a river classifier (or None); ``alpha``/``window``: the conformal
    interval's miss rate and residual window.
    """

    def __init__(self, regressor, classifier=None, corrector_window: int = 200, alpha: float = 0.1,
                 window: int = 200) -> None:
        self.regressor = regressor
        self.classifier = classifier
        self.corrector_window = corrector_window
        self.corrector = _make_corrector(corrector_window) if corrector_window else None
        self.conformal = RollingConformal(alpha=alpha, window=window)
        self.n_warm = 0
        self.n_learned = 0

    # ---- internals --------------------------------------------------------------------------------------------
    @staticmethod
    def _offered(x: dict) -> float:
        return math.exp(x["log_ideal"])

    @staticmethod
    def _target(x: dict, throughput: float) -> float:
        offered = math.exp(x["log_ideal"])
        return math.log(min(max(throughput / offered, _FLOOR), 1.0)) if offered > 0 else 0.0

    def prior_log_ratio(self, x: dict) -> float:
        """The warm (prior) regressor's log ratio alone, capped at 0."""
        y = self.regressor.predict_one(x)
        return min(0.0, float(y)) if y is not None and math.isfinite(y) else 0.0

    def _corrector_x(self, x: dict, prior: float) -> dict:
        out = {k: x[k] for k in _CORRECTOR_KEYS}
        out["prior"] = prior
        return out

    def _log_ratio(self, x: dict) -> tuple[float, float]:
        prior = self.prior_log_ratio(x)
        y = prior
        if self.n_warm and self.corrector is not None and self.n_learned:
            d = self.corrector.predict_one(self._corrector_x(x, prior))
            if d is not None and math.isfinite(d):
                y = prior + d
        return prior, max(math.log(_FLOOR), min(0.0, y))

    # ---- API --------------------------------------------------------------------------------------------------
    def predict_one(self, x: dict) -> Prediction:
        offered = self._offered(x)
        prior, y = self._log_ratio(x)
        thr = offered * math.exp(y)
        hw = self.conformal.half_width()
        low, high = (thr, thr) if hw is None else (offered * math.exp(y - hw), offered * math.exp(y + hw))
        prob = None
        if self.classifier is not None:
            proba = self.classifier.predict_proba_one({**x, "pred_log_ratio": y})
            prob = float(proba.get(1, 0.0)) if proba else 0.0
        return Prediction(thr, low, high, offered, y, int(math.exp(y) <= STARVED_RATIO), prob)

    def warm_one(self, x: dict, throughput: float, starved: int) -> None:
        """Learn one twin run (prior regressor and classifier)."""
        y = self._target(x, throughput)
        if self.classifier is not None:
            self.classifier.learn_one({**x, "pred_log_ratio": self.prior_log_ratio(x)}, int(starved))
        self.regressor.learn_one(x, y)
        self.n_warm += 1

    def learn_one(self, x: dict, throughput: float, starved: int) -> None:
        """Learn one observed run: the corrector after a warm start, the regressor itself otherwise."""
        y = self._target(x, throughput)
        prior, pred = self._log_ratio(x)
        offered = self._offered(x)
        # residual of the uncapped ratio: a run may complete slightly more than the mean offered load
        self.conformal.update(math.log(max(throughput / offered, _FLOOR)) - pred if offered > 0 else 0.0)
        if self.classifier is not None:
            self.classifier.learn_one({**x, "pred_log_ratio": pred}, int(starved))
        if self.n_warm and self.corrector is not None:
            self.corrector.learn_one(self._corrector_x(x, prior), y - prior)
        else:
            self.regressor.learn_one(x, y)
        self.n_learned += 1
