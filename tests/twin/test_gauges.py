"""GaugeEngine: the token-weighted step features the closed-loop fit regresses on must reproduce the run's ITL."""

import dataclasses

import pytest

from adaptwin.twin import Engine, ServerConfig
from adaptwin.twin.gauges import FEATURES, GaugeEngine
from adaptwin.twin.profile import load_profile
from adaptwin.twin.result import SimResult

from .conftest import LLAMA, make_arrivals


def _run(cls, cfg, arr, duration, profile=None):
    eng = cls(cfg, profile)
    eng.add_arrivals(arr)
    eng.advance_until(duration)
    return eng, SimResult.from_engine(eng, duration).summary()


@pytest.mark.parametrize("slots, rate", [(2, 3.0), (8, 40.0)])  # adapter-limited queue; busy, prefill-heavy
def test_features_rebuild_the_token_weighted_itl(slots, rate):
    cfg = ServerConfig(model=LLAMA, served=8, max_loras=slots, adapter_ranks=(8, 16) * 4)
    arr = make_arrivals(600, 8, rate=rate, seed=3, max_prompt=900, max_out=200)
    dur = float(arr.time[-1]) + 600.0  # everything finishes: the result counts finished requests only
    plain, s_plain = _run(Engine, cfg, arr, dur)
    gauged, s = _run(GaugeEngine, cfg, arr, dur)
    assert {k: v for k, v in s.items() if k != "wall_s"} == {k: v for k, v in s_plain.items() if k != "wall_s"}
    f = gauged.features
    assert f.gaps > 0 and f.steps > 0
    # the recorded gaps time is exactly the result's token-weighted mean ITL
    assert f.itl_gap_s / f.gaps * 1e3 == pytest.approx(s["mean_itl_ms"], abs=1e-4)  # summary: 4 decimals
    # and the linear step-time model applied to the weighted features gives it back (prefill tokens are recovered
    # from each step's time, so this checks the bookkeeping of every other term too)
    prof = load_profile(LLAMA)
    st, F = prof.step, f.weighted()
    rf = st.rank_factor(cfg.max_lora_rank)
    itl = (st.base_ms + st.decode_ms_per_seq * F["n_decode"] + st.prefill_ms_per_token * F["n_prefill"]
           + F["load_ms"] + st.kv_read_ms_per_ktoken * F["context_ktokens"]
           + prof.sched_base_ms + prof.sched_ms_per_running * F["running"]
           + prof.sched_ms_per_waiting_skipped * F["skipped_waiting"]
           + rf * (st.lora_base_ms * F["lora"] + st.lora_ms_per_seq * F["n_decode"]
                   + st.lora_ms_per_prefill_token * F["n_prefill"] + st.lora_ms_per_adapter * F["adapters"]
                   + st.lora_ms_per_adapter_ktoken * F["adapters_ktokens"]))
    assert itl == pytest.approx(s["mean_itl_ms"], rel=1e-3)
    assert set(F) == set(FEATURES)
    assert 0 < F["adapters"] <= slots


def test_features_follow_the_profile():
    """A slower per-adapter cost shows up in the ITL the features explain, not only in the step clock."""
    cfg = ServerConfig(model=LLAMA, served=8, max_loras=4, adapter_ranks=(8,) * 8)
    arr = make_arrivals(300, 8, rate=10.0, seed=1, max_out=100)
    prof = load_profile(LLAMA)
    slow = dataclasses.replace(prof, step=dataclasses.replace(prof.step, lora_ms_per_adapter=3.0))
    _, fast_s = _run(GaugeEngine, cfg, arr, float(arr.time[-1]) + 300, prof)
    eng, slow_s = _run(GaugeEngine, cfg, arr, float(arr.time[-1]) + 300, slow)
    assert slow_s["mean_itl_ms"] > fast_s["mean_itl_ms"]
    assert eng.features.itl_gap_s / eng.features.gaps * 1e3 == pytest.approx(slow_s["mean_itl_ms"], abs=1e-4)
