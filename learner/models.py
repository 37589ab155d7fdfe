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
* **Capacity structure** (candidates ``capacity``, ``capacity_tree``; :class:`CapacityRegressor`). A run completes
  ``min(offered, capacity)``: the capacity is the closed-form
  :func:`~adaptwin.learner.features.saturated_capacity` times a learned correction, learned from starved runs
  only (their throughput *is* the capacity). It carries its own warm-start correction, and, when a row carries the
  twin's own prediction (``twin_gap``), a k-NN of the twin's residual, blended with its own answer by their recent
  errors.
* **Interval.** Split-conformal on a rolling window of absolute log residuals (:class:`RollingConformal`).
* **Starvation.** Three answers every row: *derived* (predicted ratio ≤ 0.9), *classifier* (a dedicated river
  classifier on the features plus the predicted log ratio) and *margin* (predicted log ratio ≤ a threshold learned
  for F1, :class:`MarginThreshold`); the evaluation keeps all scores and picks one.

>>> from adaptwin.learner.features import Scenario, features
>>> learner = ThroughputLearner(make_regressor("linear"))
>>> x = features(Scenario.round_robin("llama-3.1-8b-instruct", [0.1], [8], served=16, max_loras=16))
>>> learner.learn_one(x, 600.0, 0)
>>> p = learner.predict_one(x)
>>> p.throughput <= p.offered, p.starved_derived in (0, 1)
(True, True)
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from adaptwin.learner.conformal import RollingConformal

__all__ = ["CANDIDATES", "CAPACITY_KEYS", "CORRECTION_KEYS", "TWIN_KEYS", "CapacityRegressor", "MarginThreshold",
           "Prediction", "ThroughputLearner", "WindowKNN", "make_classifier", "make_regressor", "STARVED_RATIO"]

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


class WindowKNN:
    """k-nearest-neighbour regressor over the last ``window`` rows, in numpy (river's LazySearch is pure Python and
    costs ~0.6 ms per query at 1,000 rows; this costs tens of µs).

    Features are ``keys`` of the input dict, standardised by the running mean and deviation of all rows learned; the
    scaled copy of the window is refreshed every ``refresh`` rows (always during the first 2·``refresh``), so that a
    query is one matrix-vector product. The prediction is the mean target of the ``k`` nearest rows.

    >>> knn = WindowKNN(("a", "b"), k=2, window=3)
    >>> knn.predict_one({"a": 0.0, "b": 0.0}) is None
    True
    >>> for a, y in [(0.0, 1.0), (1.0, 2.0), (10.0, 5.0), (11.0, 7.0)]:  # the first row leaves the window
    ...     knn.learn_one({"a": a, "b": 1.0}, y)
    >>> knn.predict_one({"a": 0.2, "b": 1.0})
    3.5
    """

    _fixed = None  # class default: a checkpoint pickled before ``scales`` existed loads as standardised

    def __init__(self, keys: Sequence[str], k: int = 5, window: int = 1000, refresh: int = 32,
                 scales: Sequence[float] | None = None) -> None:
        if k < 1 or window < 1 or refresh < 1:
            raise ValueError(f"k, window and refresh must be >= 1, got k={k}, window={window}, refresh={refresh}")
        if scales is not None and (len(scales) != len(keys) or any(not math.isfinite(v) or v < 0 for v in scales)):
            raise ValueError(f"scales must be one finite weight >= 0 per key ({len(keys)}), got {list(scales)}")
        self.keys = tuple(keys)
        # fixed weights per feature (a metric in physical units) instead of the running standardisation
        self._fixed = None if scales is None else np.asarray(scales, float)
        self.k = k
        self.window = window
        self.refresh = refresh
        d = len(self.keys)
        self._x = np.zeros((window, d))  # raw rows (ring buffer)
        self._xs = np.zeros((window, d))  # the same, scaled by _inv
        self._sq = np.zeros(window)  # squared norms of the scaled rows
        self._y = np.zeros(window)
        self._n = 0  # rows held (≤ window)
        self._pos = 0  # next slot to overwrite
        self._count = 0  # rows learned in all (for the running moments)
        self._mean = np.zeros(d)
        self._m2 = np.zeros(d)
        self._inv = np.ones(d) if self._fixed is None else self._fixed.copy()

    def __len__(self) -> int:
        """Rows held (at most ``window``)."""
        return self._n

    def _vec(self, x: dict) -> np.ndarray:
        return np.fromiter((x[k] for k in self.keys), float, len(self.keys))

    def _rescale(self) -> None:
        if self._fixed is None:
            var = self._m2 / max(1, self._count - 1)
            self._inv = np.where(var > 0, 1.0 / np.sqrt(np.where(var > 0, var, 1.0)), 0.0)  # constant: weight 0
        self._xs[: self._n] = self._x[: self._n] * self._inv
        self._sq[: self._n] = (self._xs[: self._n] ** 2).sum(axis=1)

    def learn_one(self, x: dict, y: float) -> None:
        v = self._vec(x)
        self._count += 1
        delta = v - self._mean
        self._mean += delta / self._count
        self._m2 += delta * (v - self._mean)
        i = self._pos
        self._x[i] = v
        self._y[i] = y
        self._pos = (i + 1) % self.window
        self._n = min(self._n + 1, self.window)
        if self._count <= 2 * self.refresh or self._count % self.refresh == 0:
            self._rescale()
        else:
            self._xs[i] = v * self._inv
            self._sq[i] = float(self._xs[i] @ self._xs[i])

    def predict_one(self, x: dict, radius: float | None = None) -> float | None:
        """Mean target of the ``k`` nearest rows; with ``radius``, of those among them within that distance (in
        the scaled units), None when there is none."""
        n = self._n
        if not n:
            return None
        if n <= self.k and radius is None:
            return float(self._y[:n].mean())
        q = self._vec(x) * self._inv
        d2 = self._sq[:n] - 2.0 * (self._xs[:n] @ q)  # squared distance less |q|², the same for every row
        idx = np.argpartition(d2, self.k - 1)[: self.k] if n > self.k else np.arange(n)
        if radius is not None:
            idx = idx[d2[idx] + float(q @ q) <= radius * radius + 1e-12]
            if not len(idx):
                return None
        return float(self._y[idx].mean())


TWIN_KEYS = ("is_qwen", "log2_served", "log2_max_loras", "max_lora_rank", "twin_gap")
"""Session-2 keys of the twin's residual (plus ``head``, the capacity model's own answer), standardised: neighbours
in *prediction* space. Kept for comparison (``twin_scales=None``); the default is :data:`CONFIG_KEYS`."""

CONFIG_KEYS = ("log_total_rate", "log2_served", "log2_max_loras", "is_qwen", "max_lora_rank")
CONFIG_SCALES = (1.0 / math.log(2.0), 1.0, 1.0, 0.1, 0.1 / 16.0)
"""The twin's residual is learned over *configurations under traffic*, in a fixed metric of log2 units: a doubling
of the offered rate, of the served adapters or of the slots is 1; another model or another adapter-rank set
(max rank 16 vs 32) is 0.1 each. The twin's error is a property of the configuration (e.g. it is low on capacity
with few slots for many adapters and high with many slots: docs/learner.md), not of the value it predicts."""

SIBLING_RADIUS = 0.2
"""Runs within this distance in :data:`CONFIG_SCALES` are *the same traffic and configuration* on another model or
rank set (≤ 0.14 apart); the paper grid's smallest configuration step (320 → 384 served: 0.26 in served, and the
total rate moves with it) is farther."""

STARVATION_TWIN_WEIGHT = 0.5
"""Weight of the sibling-corrected twin in the ``twin`` starvation call (the model's answer has the rest): equal,
because near the 0.9 cut neither answer is better (alone at that cut, each misses 15-16 of the 294 real runs)."""

CAPACITY_KEYS = ("is_qwen", "log2_served", "log2_max_loras", "max_lora_rank", "rank_mean", "rank32_share", "rate_cv",
                 "top_share", "hot_adapters", "cap_gap", "slots_over_served", "log_ideal", "log_cap")
"""What the capacity correction depends on: the configuration, the adapter mix, the load and how far it is past the
closed-form capacity (a saturated server's queue, hence its scheduler work, grows with the load)."""


class CapacityRegressor:
    """The log ratio throughput/offered as ``min(log r_free, cap_gap + z(x))``: a run completes its offered load
    (less a small end-of-window loss ``r_free``) or what the server can do when saturated, whichever is smaller.

    ``cap_gap`` is the closed-form :func:`~adaptwin.learner.features.saturated_capacity` over the offered load (a
    feature); ``z`` (a regressor on :data:`CAPACITY_KEYS`) learns the log error of that closed form from starved runs
    (ratio ≤ 0.9, whose throughput *is* the capacity). A run that was not starved only says capacity ≥ throughput
    (a censored observation): it teaches ``z`` only when ``z`` predicts less than that, plus ``margin``.
    ``r_free`` is the ratio of runs that were not starved: their running mean, or (``knee_k`` > 0) a k-NN on the
    predicted headroom, which learns the dip of the ratio when the load nears the capacity.

    Warm start: :meth:`warm_one` trains ``z`` and ``r_free`` (the prior, e.g. twin runs); :meth:`learn_one` after a
    warm start leaves the prior alone and learns, in the same way, a correction ``dz`` (k-NN on
    ``correction_keys`` over the last ``correction_window`` observed rows) and the observed ``r_free``: the prior's
    shape of capacity stays, the deployment's offset is learned from a few rows.

    Twin feature: rows with ``twin_gap`` (the twin's own log ratio for the scenario) also train a k-NN of the twin's
    residual (on :data:`TWIN_KEYS` + this model's own answer); once it has ``twin_k`` rows, the prediction is the
    blend of the corrected twin and the model's own answer, weighted by the inverse of each one's squared error
    over the last 50 rows (both scored before the row is learned). river API otherwise: ``learn_one(x, y)`` with
    ``y`` the (capped) log ratio.

    >>> from adaptwin.learner.features import Scenario, features
    >>> reg = CapacityRegressor(WindowKNN(CAPACITY_KEYS, k=1))
    >>> x = features(Scenario.round_robin("llama-3.1-8b-instruct", [3.2], [8], served=256, max_loras=32))
    >>> x["cap_gap"] < 0  # 256 adapters at 3.2 req/s: far past the closed-form capacity
    True
    >>> reg.learn_one(x, x["cap_gap"] + 0.1)  # it did 10 % better than the closed form
    >>> round(reg.predict_one(x) - x["cap_gap"], 6)
    0.1
    """

    corrects_itself = True
    """Tells :class:`ThroughputLearner` to call :meth:`learn_one` after a warm start (no outside corrector)."""
    sibling_radius = SIBLING_RADIUS  # class defaults: checkpoints pickled before session 3 still load
    starvation_twin_weight = STARVATION_TWIN_WEIGHT

    def __init__(self, z_regressor, keys: Sequence[str] = CAPACITY_KEYS, margin: float = 0.03,
                 correction_k: int = 3, correction_window: int = 200, correction_keys: Sequence[str] | None = None,
                 knee_k: int = 0, knee_window: int = 1000, twin_k: int = 3, twin_window: int = 1000,
                 twin_keys: Sequence[str] = CONFIG_KEYS, correction_scales: Sequence[float] | None = None,
                 twin_scales: Sequence[float] | None = CONFIG_SCALES, sibling_radius: float = SIBLING_RADIUS,
                 starvation_twin_weight: float = STARVATION_TWIN_WEIGHT) -> None:
        self.z = z_regressor
        self.keys = tuple(keys)
        self.margin = margin
        self.dz = WindowKNN(tuple(correction_keys or keys), k=correction_k, window=correction_window,
                            scales=correction_scales)
        # the ratio of runs that were not starved: near the knee (load close to capacity) it dips below 1
        self._free = _FreeRatio(knee_k, knee_window)  # prior (warm) runs
        self._free_seen = _FreeRatio(knee_k, knee_window)  # observed runs (after a warm start)
        # rows that carry the twin's own prediction (``twin_gap``): learn the twin's residual instead
        # (with ``twin_scales``: exactly ``twin_keys`` under that fixed metric, e.g. the configuration alone)
        self.twin = (WindowKNN(tuple(twin_keys) + ("head",), k=twin_k, window=twin_window) if twin_scales is None
                     else WindowKNN(tuple(twin_keys), k=twin_k, window=twin_window, scales=twin_scales))
        self.sibling_radius = sibling_radius
        self.starvation_twin_weight = starvation_twin_weight
        self._sq_err = (collections.deque(maxlen=50), collections.deque(maxlen=50))  # own, twin: recent errors
        self.n_warm = 0

    def _zx(self, x: dict) -> dict:
        return {k: x[k] for k in self.keys} if len(self.keys) < len(x) else x

    @staticmethod
    def _val(model, zx: dict) -> float:
        z = model.predict_one(zx)
        return float(z) if z is not None and math.isfinite(z) else 0.0

    def _combine(self, x: dict, head: float, free: "_FreeRatio") -> float:
        return min(free.predict(x, head), head)

    def prior_one(self, x: dict) -> float:
        """The prior alone (what the warm rows taught), or the model itself when there was no warm start."""
        return self._combine(x, x["cap_gap"] + self._val(self.z, self._zx(x)), self._free)

    def _own(self, x: dict) -> float:
        """The capacity model's answer (prior + correction), without the twin."""
        zx = self._zx(x)
        if not self.n_warm:
            return self._combine(x, x["cap_gap"] + self._val(self.z, zx), self._free)
        head = x["cap_gap"] + self._val(self.z, zx) + self._val(self.dz, x)
        return self._combine(x, head, self._free_seen if self._free_seen.ready else self._free)

    def _twin_x(self, x: dict, own: float) -> dict:
        return {**{k: x[k] for k in self.twin.keys if k != "head"}, "head": own}  # "head" unused when not a key

    def _twin_answer(self, x: dict, own: float) -> float | None:
        if "twin_gap" not in x or len(self.twin) < self.twin.k:
            return None
        return min(0.0, x["twin_gap"] + self._val(self.twin, self._twin_x(x, own)))

    def _weight(self) -> float:
        """Weight of the twin's corrected answer: inverse recent squared error of each answer (0.5 before any)."""
        if not self._sq_err[0] or not self._sq_err[1]:
            return 0.5
        e_own, e_twin = (sum(q) / len(q) + 1e-9 for q in self._sq_err)
        return (1 / e_twin) / (1 / e_own + 1 / e_twin)

    def predict_one(self, x: dict) -> float:
        return self.predict_with_starvation(x)[0]

    def predict_with_starvation(self, x: dict) -> tuple[float, float | None]:
        """The log ratio (as :meth:`predict_one`) and, for a row with ``twin_gap``, the log ratio of the starvation
        call: the model's own answer and the twin corrected by its residual on runs of the same traffic and
        configuration (other model or rank set; none seen: the twin as is), weighted
        :data:`STARVATION_TWIN_WEIGHT`. The throughput blend weighs by recent squared errors, which large misses
        far from the knee set; the starvation call only needs the side of 0.9, where the two are on a par."""
        own = self._own(x)
        if "twin_gap" not in x:
            return own, None
        sib = self.twin.predict_one(self._twin_x(x, own), radius=self.sibling_radius)
        twin_sib = min(0.0, x["twin_gap"] + (sib if sib is not None and math.isfinite(sib) else 0.0))
        ws = self.starvation_twin_weight
        starvation = ws * twin_sib + (1 - ws) * own
        twin = self._twin_answer(x, own)
        if twin is None:
            return own, starvation
        w = self._weight()
        return w * twin + (1 - w) * own, starvation

    def _learn(self, model, zx: dict, x: dict, y: float, free: "_FreeRatio", offset: float) -> None:
        z_seen = y - x["cap_gap"] - offset  # log(throughput / closed-form capacity), less the prior's part
        if math.exp(y) <= STARVED_RATIO:
            model.learn_one(zx, z_seen)
            return
        z_now = self._val(model, zx)
        free.learn(x, x["cap_gap"] + offset + z_now, y)
        if z_now < z_seen + self.margin:
            model.learn_one(zx, z_seen + self.margin)

    def warm_one(self, x: dict, y: float) -> None:
        self._learn(self.z, self._zx(x), x, y, self._free, 0.0)
        self.n_warm += 1

    def learn_one(self, x: dict, y: float) -> None:
        if "twin_gap" in x:
            own = self._own(x)
            twin = self._twin_answer(x, own)
            if twin is not None:  # both answers scored on rows before they are learned
                for q, v in zip(self._sq_err, (own, twin)):
                    q.append((y - v) ** 2)
            self.twin.learn_one(self._twin_x(x, own), y - x["twin_gap"])
        zx = self._zx(x)
        if self.n_warm:
            self._learn(self.dz, x, x, y, self._free_seen, self._val(self.z, zx))
        else:
            self._learn(self.z, zx, x, y, self._free, 0.0)


class _FreeRatio:
    """Log ratio of runs that were not starved: the running mean (``k`` = 0), or a k-NN on the predicted headroom
    (log capacity − log offered), the model and the offered load, which learns the dip near the knee."""

    _KEYS = ("headroom", "is_qwen", "log_ideal")

    def __init__(self, k: int, window: int) -> None:
        self.total, self.n = 0.0, 0
        self.knn = WindowKNN(self._KEYS, k=k, window=window) if k else None

    @property
    def ready(self) -> bool:
        return self.n >= (self.knn.k if self.knn else 1)

    def _q(self, x: dict, head: float) -> dict:
        return {"headroom": head, "is_qwen": x["is_qwen"], "log_ideal": x["log_ideal"]}

    def predict(self, x: dict, head: float) -> float:
        if not self.n:
            return -0.01
        if self.knn is not None and self.n >= self.knn.k:
            return self.knn.predict_one(self._q(x, head))
        return self.total / self.n

    def learn(self, x: dict, head: float, y: float) -> None:
        self.total += y
        self.n += 1
        if self.knn is not None:
            self.knn.learn_one(self._q(x, head), y)


CORRECTION_KEYS = ("is_qwen", "log2_served", "log2_max_loras", "max_lora_rank")
"""What the correction of a warm prior is learned on: the deployment's offset is a matter of configuration."""


def _capacity_knn(seed: int):
    return CapacityRegressor(WindowKNN(CAPACITY_KEYS, k=4, window=2000), knee_k=5, correction_keys=CORRECTION_KEYS)


def _capacity_tree(seed: int):
    from river import preprocessing, tree

    return CapacityRegressor(preprocessing.StandardScaler()
                             | tree.HoeffdingAdaptiveTreeRegressor(grace_period=50, seed=seed), knee_k=5,
                             correction_keys=CORRECTION_KEYS)


CANDIDATES: dict[str, Callable[[int], object]] = {
    "linear": _linear,  # StandardScaler | LinearRegression: the baseline
    "hoeffding": _hoeffding,  # HoeffdingAdaptiveTreeRegressor: one adaptive tree
    "arf": _arf,  # ARFRegressor (10 trees): a random forest with drift detectors
    "bagging": _bagging,  # BaggingRegressor of 5 Hoeffding trees (online bagging)
    "capacity": _capacity_knn,  # min(offered, closed-form capacity × learned correction), correction by numpy k-NN
    "capacity_tree": _capacity_tree,  # the same, correction by a Hoeffding adaptive tree
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


class MarginThreshold:
    """Starvation from the margin of the predicted ratio: starved ⇔ predicted log ratio ≤ τ, with τ the cut that
    maximises F1 over the last ``window`` rows seen (predicted log ratio, label), within [log 0.7, log 1].

    A model that is biased near the knee (e.g. predicts 0.93 for runs that complete 0.88) keeps its throughput error
    but no longer mislabels them. Warm rows set τ until ``min_rows`` observed rows are in.

    >>> m = MarginThreshold()
    >>> round(math.exp(m.value), 3)
    0.9
    >>> for pred, starved in [(-0.02, 0), (-0.06, 1), (-0.07, 1), (-0.03, 0), (-0.5, 1)] * 5:
    ...     m.update(pred, starved)
    >>> -0.06 <= m.value < -0.03
    True
    """

    def __init__(self, window: int = 300, min_rows: int = 20) -> None:
        self.window = window
        self.min_rows = min_rows
        self._warm: list[tuple[float, int]] = []
        self._seen: list[tuple[float, int]] = []
        self.value = math.log(STARVED_RATIO)

    def update(self, pred_log_ratio: float, starved: int, warm: bool = False) -> None:
        rows = self._warm if warm else self._seen
        rows.append((pred_log_ratio, int(starved)))
        if len(rows) > self.window:
            del rows[0]
        use = self._seen if len(self._seen) >= self.min_rows else self._warm
        if use is rows and any(s for _, s in rows):
            self.value = self._best(rows)

    @staticmethod
    def _best(rows: list[tuple[float, int]]) -> float:
        pred = np.array([p for p, _ in rows])
        lab = np.array([s for _, s in rows], float)
        order = np.argsort(pred, kind="stable")
        pred, lab = pred[order], lab[order]
        tp = np.cumsum(lab)  # predict starved for the first i+1 rows (lowest ratios)
        f1 = 2 * tp / (np.arange(1, len(pred) + 1) + lab.sum())
        ok = (pred >= math.log(0.7)) & (pred <= 0.0)  # a cut far from 0.9 is noise, not a threshold
        if not ok.any():
            return math.log(STARVED_RATIO)
        i = int(np.argmax(np.where(ok, f1, -1.0)))
        nxt = pred[i + 1] if i + 1 < len(pred) else 0.0
        return float(min(0.0, (pred[i] + nxt) / 2))


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

    starved_margin: int | None = None
    """1 when the predicted log ratio is at or below the learned threshold (:class:`MarginThreshold`)."""

    starved_twin: int | None = None
    """With the twin's prediction as a feature: 1 when the starvation call of
    :meth:`CapacityRegressor.predict_with_starvation` (model and sibling-corrected twin) is ≤ log 0.9; else None."""

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
        self._last: tuple | None = None  # (x, _log_ratio(x)) of the last prediction
        self.margin = MarginThreshold()

    # ---- internals --------------------------------------------------------------------------------------------
    @staticmethod
    def _offered(x: dict) -> float:
        return math.exp(x["log_ideal"])

    @staticmethod
    def _target(x: dict, throughput: float) -> float:
        offered = math.exp(x["log_ideal"])
        return math.log(min(max(throughput / offered, _FLOOR), 1.0)) if offered > 0 else 0.0

    @property
    def _self_correcting(self) -> bool:
        return bool(getattr(self.regressor, "corrects_itself", False))

    def prior_log_ratio(self, x: dict) -> float:
        """The warm (prior) regressor's log ratio alone, capped at 0."""
        y = self.regressor.prior_one(x) if self._self_correcting else self.regressor.predict_one(x)
        return min(0.0, float(y)) if y is not None and math.isfinite(y) else 0.0

    def _corrector_x(self, x: dict, prior: float) -> dict:
        out = {k: x[k] for k in _CORRECTOR_KEYS}
        out["prior"] = prior
        return out

    def _log_ratio(self, x: dict) -> tuple[float, float, float | None]:
        """(prior, prediction, the regressor's own starvation log ratio or None), log ratios of the offered load."""
        if self._self_correcting:  # prior and correction in one model: one query
            y, starvation = (self.regressor.predict_with_starvation(x)
                             if hasattr(self.regressor, "predict_with_starvation")
                             else (self.regressor.predict_one(x), None))
            y = float(y) if y is not None and math.isfinite(y) else 0.0
            return y, max(math.log(_FLOOR), min(0.0, y)), starvation
        prior = self.prior_log_ratio(x)
        y = prior
        if self.n_warm and self.corrector is not None and self.n_learned:
            d = self.corrector.predict_one(self._corrector_x(x, prior))
            if d is not None and math.isfinite(d):
                y = prior + d
        return prior, max(math.log(_FLOOR), min(0.0, y)), None

    # ---- API --------------------------------------------------------------------------------------------------
    def _log_ratio_cached(self, x: dict) -> tuple[float, float, float | None]:
        """``_log_ratio`` of the row just predicted (predict, then learn the same row: one model query, not two)."""
        last, self._last = self._last, None
        if last is not None and last[0] is x:
            return last[1]
        return self._log_ratio(x)

    def predict_one(self, x: dict) -> Prediction:
        offered = self._offered(x)
        prior, y, starvation = self._log_ratio(x)
        self._last = (x, (prior, y, starvation))
        thr = offered * math.exp(y)
        hw = self.conformal.half_width()
        low, high = (thr, thr) if hw is None else (offered * math.exp(y - hw), offered * math.exp(y + hw))
        prob = None
        if self.classifier is not None:
            proba = self.classifier.predict_proba_one({**x, "pred_log_ratio": y})
            prob = float(proba.get(1, 0.0)) if proba else 0.0
        return Prediction(thr, low, high, offered, y, int(math.exp(y) <= STARVED_RATIO), prob,
                          int(y <= self.margin.value),
                          None if starvation is None else int(math.exp(starvation) <= STARVED_RATIO))

    def warm_one(self, x: dict, throughput: float, starved: int) -> None:
        """Learn one twin run (prior regressor and classifier)."""
        self._last = None
        y = self._target(x, throughput)
        prior = self.prior_log_ratio(x)  # before learning the row: the threshold sees honest predictions
        self.margin.update(prior, starved, warm=True)
        if self.classifier is not None:
            self.classifier.learn_one({**x, "pred_log_ratio": prior}, int(starved))
        if self._self_correcting:
            self.regressor.warm_one(x, y)
        else:
            self.regressor.learn_one(x, y)
        self.n_warm += 1

    def learn_one(self, x: dict, throughput: float, starved: int) -> None:
        """Learn one observed run: the corrector after a warm start, the regressor itself otherwise."""
        y = self._target(x, throughput)
        prior, pred, _ = self._log_ratio_cached(x)
        offered = self._offered(x)
        # residual of the uncapped ratio: a run may complete slightly more than the mean offered load
        self.conformal.update(math.log(max(throughput / offered, _FLOOR)) - pred if offered > 0 else 0.0)
        self.margin.update(pred, starved)
        if self.classifier is not None:
            self.classifier.learn_one({**x, "pred_log_ratio": pred}, int(starved))
        if self.n_warm and self.corrector is not None and not self._self_correcting:
            self.corrector.learn_one(self._corrector_x(x, prior), y - prior)
        else:
            self.regressor.learn_one(x, y)
        self.n_learned += 1
