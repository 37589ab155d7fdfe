"""GaugeEngine: the step features the closed-loop fit regresses on must rebuild the run's ITL and τ exactly."""

import dataclasses

import pytest

from adaptwin.twin import Engine, ServerConfig
from adaptwin.twin.gauges import FEATURES, GaugeEngine, known_ms, lora_ms
from adaptwin.twin.profile import load_profile
from adaptwin.twin.result import SimResult

from .conftest import LLAMA, make_arrivals


def _run(cls, cfg, arr, duration, profile=None):
    eng = cls(cfg, profile)
    eng.add_arrivals(arr)
    eng.advance_until(duration)
    return eng, SimResult.from_engine(eng, duration)


def _step_ms(prof, f, cfg):
    return known_ms(prof, f) + lora_ms(prof, f, cfg.max_lora_rank)


def _slowdown_rebuilding_tau(priced, base, cfg, arr, dur):
    """Mean ITL of ``cfg`` on ``priced`` over that on ``base``, after checking that the features rebuild the priced
    run's τ exactly; with the priced run's τ features."""
    gauged, res = _run(GaugeEngine, cfg, arr, dur, priced)
    _, plain = _run(GaugeEngine, cfg, arr, dur, base)
    decode_tokens = float((res.req["output"][res.finished_mask] - 1).sum())
    running_ms = sum(w.running_s for w in gauged.windows) * 1e3
    f = gauged.tau.mean(per=decode_tokens)
    assert _step_ms(priced, f, cfg) == pytest.approx(running_ms / decode_tokens, rel=1e-6)
    return res.summary()["mean_itl_ms"] / plain.summary()["mean_itl_ms"], f


def _slowdown_by_rank(priced, base, max_loras, arr):
    """:func:`_slowdown_rebuilding_tau` at max_lora_rank 16 and 32 (8 adapters of ranks 8 and 16)."""
    dur = float(arr.time[-1]) + 600.0
    return {rank: _slowdown_rebuilding_tau(priced, base, ServerConfig(
        model=LLAMA, served=8, max_loras=max_loras, adapter_ranks=(8, 16) * 4, max_lora_rank=rank), arr, dur)
        for rank in (16, 32)}


@pytest.mark.parametrize("slots, rate", [(2, 3.0), (8, 40.0)])  # adapter-limited queue; busy, prefill-heavy
def test_features_rebuild_the_itl_and_tau(slots, rate):
    cfg = ServerConfig(model=LLAMA, served=8, max_loras=slots, adapter_ranks=(8, 16) * 4, max_lora_rank=16)
    arr = make_arrivals(600, 8, rate=rate, seed=3, max_prompt=900, max_out=200)
    dur = float(arr.time[-1]) + 600.0  # everything finishes: the result counts finished requests only
    _, plain = _run(Engine, cfg, arr, dur)
    gauged, res = _run(GaugeEngine, cfg, arr, dur)
    s = res.summary()
    assert {k: v for k, v in s.items() if k != "wall_s"} == {k: v for k, v in plain.summary().items() if k != "wall_s"}
    assert gauged.itl.weight > 0 and gauged.steps > 0
    # the recorded gaps time is exactly the result's token-weighted mean ITL
    assert gauged.itl_gap_s / gauged.itl.weight * 1e3 == pytest.approx(s["mean_itl_ms"], abs=1e-4)  # 4 decimals
    # the linear step-time model applied to the weighted features gives both back (prefill tokens are recovered
    # from each step's time, so this checks the bookkeeping of every other term too)
    prof = load_profile(LLAMA)
    f = gauged.itl.mean()
    assert _step_ms(prof, f, cfg) == pytest.approx(s["mean_itl_ms"], rel=1e-3)
    assert set(f) == set(FEATURES) and 0 < f["adapters"] <= slots
    fin = res.finished_mask
    decode_tokens = float((res.req["output"][fin] - 1).sum())
    running_ms = sum(w.running_s for w in gauged.windows) * 1e3
    assert _step_ms(prof, gauged.tau.mean(per=decode_tokens), cfg) == pytest.approx(running_ms / decode_tokens,
                                                                                    rel=1e-6)


def test_features_rebuild_tau_above_the_decode_knee():
    """With a decode knee inside the run's batch sizes, the knee feature prices the compute-bound steps exactly."""
    cfg = ServerConfig(model=LLAMA, served=8, max_loras=8, adapter_ranks=(8, 16) * 4, max_lora_rank=16)
    arr = make_arrivals(600, 8, rate=40.0, seed=3, max_prompt=900, max_out=200)
    dur = float(arr.time[-1]) + 600.0
    prof = load_profile(LLAMA)
    kneed = dataclasses.replace(prof, step=dataclasses.replace(prof.step, decode_knee_seqs=5.0,
                                                               decode_ms_per_seq_above_knee=0.5))
    _, plain = _run(GaugeEngine, cfg, arr, dur, dataclasses.replace(
        prof, step=dataclasses.replace(prof.step, decode_ms_per_seq_above_knee=0.0)))
    gauged, res = _run(GaugeEngine, cfg, arr, dur, kneed)
    assert res.summary()["mean_itl_ms"] > plain.summary()["mean_itl_ms"]
    f = gauged.tau.mean(per=float((res.req["output"][res.finished_mask] - 1).sum()))
    assert 0 < f["n_decode_above_knee"] < f["n_decode"]
    running_ms = sum(w.running_s for w in gauged.windows) * 1e3
    decode_tokens = float((res.req["output"][res.finished_mask] - 1).sum())
    assert _step_ms(kneed, f, cfg) == pytest.approx(running_ms / decode_tokens, rel=1e-6)


def test_features_follow_the_profile():
    """A slower per-adapter cost shows up in the ITL the features explain, not only in the step clock."""
    cfg = ServerConfig(model=LLAMA, served=8, max_loras=4, adapter_ranks=(8,) * 8)
    arr = make_arrivals(300, 8, rate=10.0, seed=1, max_out=100)
    prof = load_profile(LLAMA)
    slow = dataclasses.replace(prof, step=dataclasses.replace(prof.step, lora_ms_per_adapter=3.0))
    _, fast = _run(GaugeEngine, cfg, arr, float(arr.time[-1]) + 300, prof)
    eng, slow_res = _run(GaugeEngine, cfg, arr, float(arr.time[-1]) + 300, slow)
    itl = slow_res.summary()["mean_itl_ms"]
    assert itl > fast.summary()["mean_itl_ms"]
    assert eng.itl_gap_s / eng.itl.weight * 1e3 == pytest.approx(itl, abs=1e-4)
    assert _step_ms(slow, eng.itl.mean(), cfg) == pytest.approx(itl, rel=1e-3)


def test_adapter_rank_scale_prices_rank_blocks_and_the_features_follow():
    """``lora_adapter_rank_scale`` scales the per-adapter term per 16-wide rank block beyond the first (vLLM's LoRA
    kernels tile the rank by 16): ranks 8 and 16 cost the same, 32 one block more; τ is still rebuilt exactly."""
    prof = load_profile(LLAMA)
    st = dataclasses.replace(prof.step, lora_adapter_rank_scale=0.5)
    assert [st.adapter_rank_factor(r) for r in (8, 16, 32, 64)] == [1.0, 1.0, 1.5, 2.5]
    extra = st.step_ms(10, 0, 2, adapter_rank_factor=st.adapter_rank_factor(32)) - st.step_ms(10, 0, 2)
    assert extra == pytest.approx(2 * 0.5 * st.lora_ms_per_adapter)
    slow = _slowdown_by_rank(dataclasses.replace(prof, step=st), prof, 4,
                             make_arrivals(400, 8, rate=20.0, seed=2, max_prompt=600, max_out=150))
    assert slow[16][0] == pytest.approx(1.0, abs=1e-9) and slow[32][0] > 1.01


def test_rank_kernel_terms_price_rank_blocks_by_tiling_and_the_features_follow():
    """The measured ``lora_rank_block_*`` terms: nothing up to rank 16 or without adapters, one block at 32 and three
    at 64, the tiling chosen by the step's tokens; a prefill-heavy run still rebuilds τ exactly (the engine hands
    each step's prefill tokens to the gauges)."""
    shipped = load_profile(LLAMA)
    unpriced = {f.name: 0.0 for f in dataclasses.fields(shipped.step) if f.name.startswith("lora_rank_block_ms")}
    prof = dataclasses.replace(shipped, step=dataclasses.replace(shipped.step, **unpriced))
    st = dataclasses.replace(prof.step, lora_rank_block_ms_per_slot=0.004, lora_rank_block_ms_per_adapter=0.08,
                             lora_rank_block_ms_per_slot_ktoken=0.2, lora_rank_block_ms_per_adapter_large=0.03,
                             lora_rank_block_ms_per_slot_ktoken_large=0.03, lora_rank_block_split_tokens=128)
    assert st.rank_kernel_ms(16, 64, 60, 10) == 0.0 and st.rank_kernel_ms(32, 64, 60, 0) == 0.0
    below = 65 * 0.004 + 10 * 0.08 + 65 * 0.2 * 0.06
    assert st.rank_kernel_ms(32, 64, 60, 10) == pytest.approx(below)
    assert st.rank_kernel_ms(64, 64, 60, 10) == pytest.approx(3 * below)
    assert st.rank_kernel_ms(32, 64, 128, 10) == pytest.approx(10 * 0.03 + 65 * 0.03 * 0.128)
    slow = _slowdown_by_rank(dataclasses.replace(prof, step=st), prof, 8,
                             make_arrivals(600, 8, rate=30.0, seed=4, max_prompt=900, max_out=200))
    assert slow[16][1]["rank_kernel_ms"] == 0 < slow[32][1]["rank_kernel_ms"]
    assert slow[16][0] == pytest.approx(1.0, abs=1e-9) and slow[32][0] > 1.01
