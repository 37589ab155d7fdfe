"""Prequential evaluation: for each row, in order, predict with every candidate, score, then learn.

All candidate regressors see the same rows in the same order; the one with the lowest prequential half sMAPE is
chosen, and for it the starvation answer (derived from the throughput ratio, or the dedicated classifier) with the
higher F1. Besides the metrics, the evaluation reports:

* ``prior_half_smape_after_50`` vs ``half_smape_after_50``: after a warm start, the warm model alone (what the twin
  data taught it, never updated on the dataset) against the learner, on rows 51…N;
* ``config_regret_pct_*``: per workload in the dataset, the configuration with the highest predicted throughput
  among those predicted not to starve (prequential predictions) against the best non-starving one actually
  measured: 100·(best − measured(chosen)) / best.

>>> from adaptwin.learner.dataset import Run
>>> from adaptwin.learner.features import Scenario
>>> runs = [Run(Scenario.round_robin("llama-3.1-8b-instruct", [0.1], [8], n, n), 42.0 * n, 0) for n in (8, 16, 32)]
>>> report = evaluate(runs, candidates=["linear"])
>>> report["model"], report["rows"]
('linear', 3)
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

from adaptwin.learner.dataset import Run
from adaptwin.learner.features import features
from adaptwin.learner.metrics import PrequentialMetrics, half_smape_term
from adaptwin.learner.models import CANDIDATES, ThroughputLearner, make_classifier, make_regressor

__all__ = ["evaluate", "config_regret"]

log = logging.getLogger("adaptwin.learner.prequential")

AFTER = 50  # rows after which the learner must beat the warm model alone


@dataclass
class _Track:
    learner: ThroughputLearner
    derived: PrequentialMetrics = field(default_factory=PrequentialMetrics)
    classified: PrequentialMetrics = field(default_factory=PrequentialMetrics)
    after_sum: float = 0.0
    prior_after_sum: float = 0.0
    n_after: int = 0
    predict_s: float = 0.0
    learn_s: float = 0.0
    warm_s: float = 0.0
    preds: list = field(default_factory=list)


def config_regret(runs: Sequence[Run], predicted: Sequence[float], predicted_starved: Sequence[int]) -> dict:
    """Regret (%) of choosing, per workload, the best predicted non-starving configuration."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(runs):
        s = r.scenario
        groups.setdefault((s.model, s.rates, s.ranks, round(s.duration_s / 60)), []).append(i)
    regrets, chose_starved = [], 0
    for idx in groups.values():
        ok = [i for i in idx if not runs[i].starved]
        if len(idx) < 2 or not ok:
            continue
        best = max(runs[i].throughput for i in ok)
        cands = [i for i in idx if not predicted_starved[i]] or idx
        chosen = max(cands, key=lambda i: predicted[i])
        chose_starved += runs[chosen].starved
        regrets.append(100.0 * max(0.0, best - runs[chosen].throughput) / best if best > 0 else 0.0)
    if not regrets:
        return {"workloads": 0}
    return {"workloads": len(regrets), "config_regret_pct_mean": round(sum(regrets) / len(regrets), 3),
            "config_regret_pct_max": round(max(regrets), 3), "config_chosen_starved": chose_starved}


def evaluate(runs: Sequence[Run], warm: Sequence[Run] = (), candidates: Sequence[str] = tuple(CANDIDATES),
             seed: int = 0, alpha: float = 0.1, classifier: bool = True, warm_label: str | None = None) -> dict:
    """Prequential evaluation of ``candidates`` on ``runs`` (file order), each pre-trained on ``warm``."""
    if not runs:
        raise ValueError("the dataset has no rows to evaluate")
    tracks: dict[str, _Track] = {}
    warm_x = [(features(r.scenario), r) for r in warm]
    for name in candidates:
        t = _Track(ThroughputLearner(make_regressor(name, seed), make_classifier(seed) if classifier else None,
                                     alpha=alpha))
        t0 = time.perf_counter()
        for x, r in warm_x:
            t.learner.warm_one(x, r.throughput, r.starved)
        t.warm_s = time.perf_counter() - t0
        if warm_x:
            log.info("warm start of %s on %d runs: %.1f s", name, len(warm_x), t.warm_s)
        tracks[name] = t
    for i, r in enumerate(runs):
        x = features(r.scenario)
        for t in tracks.values():
            t0 = time.perf_counter()
            p = t.learner.predict_one(x)
            t1 = time.perf_counter()
            t.learner.learn_one(x, r.throughput, r.starved)
            t.learn_s += time.perf_counter() - t1
            t.predict_s += t1 - t0
            interval = (p.low, p.high)
            t.derived.update(r.throughput, p.throughput, r.starved, p.starved_derived, interval)
            t.classified.update(r.throughput, p.throughput, r.starved, p.starved_classifier, interval)
            t.preds.append((p.throughput, p.starved_derived, p.starved_classifier))
            if i >= AFTER:
                t.n_after += 1
                t.after_sum += half_smape_term(r.throughput, p.throughput)
            if i >= AFTER and warm_x:
                # the warm model alone: the prior regressor, which never learns from the dataset after a warm start
                prior_thr = p.offered * math.exp(t.learner.prior_log_ratio(x))
                t.prior_after_sum += half_smape_term(r.throughput, prior_thr)
    cand_report = {}
    for name, t in tracks.items():
        n = len(runs)
        best_clf = "classifier" if t.classified.f1 > t.derived.f1 else "derived"
        m = t.classified if best_clf == "classifier" else t.derived
        rep = m.as_dict()
        rep.update(starvation_method=best_clf, starvation_f1_derived=round(t.derived.f1, 4),
                   starvation_f1_classifier=round(t.classified.f1, 4),
                   predict_ms=round(1000 * t.predict_s / n, 4), learn_ms=round(1000 * t.learn_s / n, 4),
                   warm_s=round(t.warm_s, 2))
        if t.n_after:
            rep["half_smape_after_50"] = round(t.after_sum / t.n_after, 4)
            if warm_x:
                rep["prior_half_smape_after_50"] = round(t.prior_after_sum / t.n_after, 4)
        col = 2 if best_clf == "classifier" else 1
        rep.update(config_regret(runs, [q[0] for q in t.preds], [q[col] for q in t.preds]))
        cand_report[name] = rep
    chosen = min(cand_report, key=lambda k: cand_report[k]["throughput_half_smape"])
    out = dict(cand_report[chosen])
    out.update(model=chosen, interval="split-conformal, rolling 200 |log residuals|", interval_level=1 - alpha,
               warm_start=warm_label, warm_rows=len(warm_x), candidates=cand_report)
    return out
