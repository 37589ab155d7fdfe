"""The starvation call with the twin as a feature (session 3 of issue 7): the twin's residual learned over
configurations (fixed metric), the sibling correction, and the online choice of the starvation answer."""

from __future__ import annotations

import math
import random

import pytest

from adaptwin.learner.dataset import Run
from adaptwin.learner.features import Scenario, features, ideal_throughput, saturated_capacity
from adaptwin.learner.metrics import PrequentialMetrics
from adaptwin.learner.models import (CONFIG_KEYS, CONFIG_SCALES, SIBLING_RADIUS, CapacityRegressor, ThroughputLearner,
                                     WindowKNN, make_regressor)
from adaptwin.learner.prequential import evaluate, online_answer

LLAMA, QWEN = "llama-3.1-8b-instruct", "qwen-2.5-7b-instruct"


def test_window_knn_radius_and_fixed_scales():
    knn = WindowKNN(("a", "b"), k=2, window=10, scales=(1.0, 0.0))  # b weighs nothing
    assert knn.predict_one({"a": 0.0, "b": 0.0}, radius=1.0) is None  # empty
    knn.learn_one({"a": 0.0, "b": 100.0}, 1.0)
    knn.learn_one({"a": 1.0, "b": -50.0}, 3.0)
    knn.learn_one({"a": 5.0, "b": 0.0}, 7.0)
    assert knn.predict_one({"a": 0.1, "b": 0.0}) == pytest.approx(2.0)  # the 2 nearest in a alone
    assert knn.predict_one({"a": 0.1, "b": 0.0}, radius=0.5) == pytest.approx(1.0)  # only a = 0 is that near
    assert knn.predict_one({"a": 0.1, "b": 0.0}, radius=0.95) == pytest.approx(2.0)
    assert knn.predict_one({"a": 3.0, "b": 0.0}, radius=0.5) is None
    with pytest.raises(ValueError, match="one finite weight"):
        WindowKNN(("a", "b"), scales=(1.0,))


def test_config_metric_puts_siblings_inside_the_radius_and_grid_steps_outside():
    """Same traffic and configuration on another model and rank set: inside; one grid step of served: outside."""
    def vec(model, served, slots, rank):
        x = features(Scenario.round_robin(model, [0.1, 0.05, 0.025], [8, 16, 32][: 2 if rank == 16 else 3], served,
                                          slots, rank))
        return [x[k] * s for k, s in zip(CONFIG_KEYS, CONFIG_SCALES)]

    def dist(u, v):
        return math.dist(u, v)

    base = vec(LLAMA, 320, 16, 16)
    assert dist(base, vec(QWEN, 320, 16, 32)) < SIBLING_RADIUS
    assert dist(base, vec(LLAMA, 384, 16, 16)) > SIBLING_RADIUS
    assert dist(base, vec(LLAMA, 320, 32, 16)) > SIBLING_RADIUS


def _x(model: str, served: int, slots: int, rank: int, twin_ratio: float) -> dict:
    s = Scenario.round_robin(model, [0.1], [8, rank], served, slots, rank)
    return features(s, twin_ratio * ideal_throughput(s))


def test_sibling_run_corrects_the_twin_in_the_starvation_call():
    """A twin 25 % low on one configuration says it starves; once a run of that configuration on the other model
    completed 95 % of its load, the call for it flips to 'not starved' — but not for another configuration."""
    reg = CapacityRegressor(WindowKNN(("cap_gap",), k=1))  # cold: the model's own answer is ~the offered load
    x_qwen = _x(QWEN, 32, 16, 16, 0.75)
    x_other = _x(QWEN, 64, 16, 16, 0.75)  # one served doubling away: not a sibling
    _, call = reg.predict_with_starvation(x_qwen)
    assert call <= math.log(0.9)  # the twin's 0.75 pulls the call below the cut
    x_llama = _x(LLAMA, 32, 16, 16, 0.75)
    reg.learn_one(x_llama, math.log(0.95))
    _, call = reg.predict_with_starvation(x_qwen)
    assert call > math.log(0.9)
    _, call_other = reg.predict_with_starvation(x_other)
    assert call_other <= math.log(0.9)
    no_twin = features(Scenario.round_robin(LLAMA, [0.1], [8], 32, 16))
    assert reg.predict_with_starvation(no_twin)[1] is None  # no twin feature: no call


def test_prediction_carries_the_twin_call_only_with_the_twin_feature():
    learner = ThroughputLearner(make_regressor("capacity"))
    s = Scenario.round_robin(LLAMA, [0.1], [8], 32, 16)
    assert learner.predict_one(features(s)).starved_twin is None
    p = learner.predict_one(features(s, 0.5 * ideal_throughput(s)))
    assert p.starved_twin == 1 and p.starved_derived == 0  # the twin's 0.5 flips the call: 0.5·log 0.5 < log 0.9


def test_online_answer_uses_only_scored_rows():
    twin, derived = PrequentialMetrics(), PrequentialMetrics()
    assert online_answer({"twin": twin, "derived": derived}) == "twin"
    twin.update(10.0, 10.0, 0, 1)  # a false alarm
    derived.update(10.0, 10.0, 0, 0)
    twin.update(5.0, 5.0, 1, 1)
    derived.update(5.0, 5.0, 1, 1)
    assert online_answer({"twin": twin, "derived": derived}) == "derived"


def test_evaluate_scores_every_answer_and_chooses_online():
    """Every answer is scored and the headline F1 is the online choice. Without the twin feature the twin answer is
    the derived one. A twin 30 % low everywhere with no sibling runs (one model, one rank set) raises false alarms in
    the twin call; the online choice then moves to the derived answer and beats the twin call."""
    runs = []
    for served in (16, 32, 64, 128, 256):
        for slots in (8, 16, 32, 64):
            for rate in (0.05, 0.2, 0.4, 0.8, 1.6):
                s = Scenario.round_robin(LLAMA, [rate], [8, 16], served, slots, 16)
                thr = min(ideal_throughput(s), 0.8 * saturated_capacity(s))
                runs.append(Run(s, thr, int(thr / ideal_throughput(s) <= 0.9)))
    random.Random(1).shuffle(runs)
    assert 20 < sum(r.starved for r in runs) < 80
    cap = evaluate(runs, candidates=["capacity"], classifier=False)["candidates"]["capacity"]
    assert cap["starvation_method"].startswith("online: ")
    assert cap["starvation_f1_twin"] == cap["starvation_f1_derived"]
    assert cap["starvation_f1_best_after_fact"] == max(cap[f"starvation_f1_{k}"] for k in
                                                       ("twin", "derived", "classifier", "margin"))
    twin = {r.scenario: 0.7 * r.throughput for r in runs}
    rep = evaluate(runs, candidates=["capacity"], classifier=False, twin=twin, twin_label="test")
    cap = rep["candidates"]["capacity"]
    assert rep["twin_feature_rows"] == len(runs)
    assert cap["starvation_f1_twin"] < cap["starvation_f1_derived"]
    assert cap["starvation_f1"] > cap["starvation_f1_twin"]


def test_state_pickled_before_session_3_still_works():
    """Checkpoints hold pickled models: one made before the fixed metric and the twin call existed (no such
    attributes) must still predict and learn."""
    import pickle

    learner = ThroughputLearner(make_regressor("capacity"))
    reg = learner.regressor
    old_attrs = ((reg.twin, ("_fixed",)), (reg.dz, ("_fixed",)), (reg, ("sibling_radius", "starvation_twin_weight")))
    for obj, names in old_attrs:
        for name in names:
            del obj.__dict__[name]
    old = pickle.loads(pickle.dumps(learner))
    x = _x(LLAMA, 32, 16, 16, 0.8)
    for _ in range(40):  # past the rescale points of the k-NNs
        old.learn_one(x, 0.8 * math.exp(x["log_ideal"]), 1)
    p = old.predict_one(x)
    assert p.starved_twin == 1 and p.throughput == pytest.approx(0.8 * math.exp(x["log_ideal"]), rel=0.05)
