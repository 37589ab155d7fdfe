"""Mechanics on explicit arrival lists (no length table needed)."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adaptwin.twin import Arrivals, ConfigError, Engine, ServerConfig, simulate
from adaptwin.twin.engine import FINISHED, REJECTED, RUNNING, WAITING

from .conftest import LLAMA, make_arrivals


def run_checked(cfg, arr, duration, step=0.5):
    eng = Engine(cfg)
    eng.add_arrivals(arr)
    t = 0.0
    while t < duration:
        t += step
        eng.advance_until(t)
        eng.check_invariants()
        st_ = np.frombuffer(bytes(eng.status), dtype=np.uint8)
        arrived = int((np.asarray(eng.arrival) <= eng.time).sum())
        counts = {s: int((st_ == s).sum()) for s in (WAITING, RUNNING, FINISHED, REJECTED)}
        # every arrived request is finished, running, waiting (incl. the client backlog) or rejected
        assert counts[FINISHED] + counts[RUNNING] + counts[WAITING] + counts[REJECTED] + len(eng._backlog) == arrived
        assert counts[RUNNING] == len(eng.running)
    return eng


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 300), served=st.integers(1, 12), slots=st.integers(1, 12), rate=st.floats(0.5, 200),
       kv_blocks=st.integers(70, 3000), seed=st.integers(0, 10_000), seqs=st.integers(1, 64))
def test_invariants_hold_at_every_checkpoint(n, served, slots, rate, kv_blocks, seed, seqs):
    slots = min(slots, served)
    cfg = ServerConfig(model=LLAMA, served=served, max_loras=slots, max_num_seqs=seqs,
                       kv_capacity_tokens=kv_blocks * 16, max_model_len=1024 + 64, client_max_waiting=None)
    arr = make_arrivals(n, served, rate=rate, seed=seed, max_prompt=1000, max_out=60)
    eng = run_checked(cfg, arr, duration=arr.time[-1] + 5.0, step=max(0.05, arr.time[-1] / 20))
    r = eng.request_arrays()
    fin = r["status"] == FINISHED
    assert (r["finish_time"][fin] >= r["arrival"][fin]).all()
    assert (r["first_token"][fin] >= r["arrival"][fin]).all()
    assert (r["generated"][fin] == r["output"][fin]).all()
    # prompt + output over max_model_len: rejected as vLLM does
    too_long = r["prompt"] + r["output"] > 1024 + 64
    assert (r["status"][too_long] == REJECTED).all()


def test_distinct_adapters_per_step_never_exceed_max_loras():
    cfg = ServerConfig(model=LLAMA, served=16, max_loras=3)
    eng = Engine(cfg)
    eng.add_arrivals(make_arrivals(400, 16, rate=40, seed=3))
    seen = 0
    for k in range(1, 200):
        eng.advance_until(k * 0.1)
        assert eng.n_adapters <= 3
        seen = max(seen, eng.n_adapters)
    assert seen == 3


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), slots=st.integers(1, 8))
def test_single_adapter_result_independent_of_max_loras(seed, slots):
    """With one adapter, max_loras only matters through the KV cache: fix KV and the run is identical."""
    arr = make_arrivals(150, 1, rate=20, seed=seed)
    arr = Arrivals(arr.time, np.zeros(len(arr), dtype=np.int64), arr.prompt, arr.output)
    base = simulate(ServerConfig(model=LLAMA, served=8, max_loras=1, kv_capacity_tokens=40_000, max_model_len=4096), arr, 30.0).summary()
    other = simulate(ServerConfig(model=LLAMA, served=8, max_loras=slots, kv_capacity_tokens=40_000, max_model_len=4096), arr, 30.0).summary()
    base.pop("wall_s"), other.pop("wall_s")
    assert base == other


def test_preemption_recomputes_newest_and_everything_finishes():
    cfg = ServerConfig(model=LLAMA, served=2, max_loras=2, kv_capacity_tokens=16 * 200, max_model_len=2048,
                       client_max_waiting=None)
    arr = Arrivals(np.zeros(12), np.arange(12) % 2, np.full(12, 100), np.full(12, 400))
    eng = run_checked(cfg, arr, 60.0, step=0.05)
    r = eng.request_arrays()
    assert (r["status"] == FINISHED).all()
    assert r["preemptions"].sum() > 0
    # the oldest request is never the victim while newer ones run
    assert r["preemptions"][0] == 0


def test_jumps_match_step_by_step():
    """Advancing in tiny increments (few jumps) and in one call (long jumps) gives the same run."""
    cfg = ServerConfig(model=LLAMA, served=4, max_loras=2)
    arr = make_arrivals(200, 4, rate=8, seed=11)
    one = simulate(cfg, arr, 40.0).summary()
    eng = Engine(cfg)
    eng.add_arrivals(arr)
    for k in range(1, 4001):
        eng.advance_until(k * 0.01)
    from adaptwin.twin.result import SimResult

    many = SimResult.from_engine(eng, 40.0).summary()
    one.pop("wall_s"), many.pop("wall_s")
    assert one["finished"] == many["finished"]
    assert one["total_throughput"] == pytest.approx(many["total_throughput"], rel=1e-9)
    assert one["mean_itl_ms"] == pytest.approx(many["mean_itl_ms"], rel=1e-6)


def test_adapter_loads_follow_lru():
    cfg = ServerConfig(model=LLAMA, served=3, max_loras=2)
    # a, b, a, c, a: c evicts b (least recently used), a stays resident
    times = [0.0, 1.0, 2.0, 3.0, 4.0]
    arr = Arrivals(times, [0, 1, 0, 2, 0], [10] * 5, [5] * 5)
    res = simulate(cfg, arr, 10.0)
    assert res.summary()["adapter_loads"] == 3


def test_determinism_for_a_seed():
    from adaptwin.twin.runner import run_scenario

    a = run_scenario(LLAMA, [0.5, 0.2], [8, 16], 8, 4, duration=120, seed=7).summary()
    b = run_scenario(LLAMA, [0.5, 0.2], [8, 16], 8, 4, duration=120, seed=7).summary()
    c = run_scenario(LLAMA, [0.5, 0.2], [8, 16], 8, 4, duration=120, seed=8).summary()
    for d in (a, b, c):
        d.pop("wall_s")
    assert a == b and a != c


@pytest.mark.parametrize("kw, match", [
    (dict(served=4, max_loras=8), "max_loras .8. cannot exceed served"),
    (dict(served=0, max_loras=1), "served must be a positive integer"),
    (dict(served=4, max_loras=2, max_num_seqs=4096), "max_num_batched_tokens"),
    (dict(served=2, max_loras=1, adapter_ranks=(8, 32), max_lora_rank=16), "max_lora_rank"),
])
def test_bad_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        ServerConfig(model=LLAMA, **kw)


def test_bad_arrivals_errors():
    with pytest.raises(ConfigError, match="finite"):
        Arrivals([0.0, float("nan")], [0, 0], [5, 5], [5, 5])
    with pytest.raises(ConfigError, match="no arrivals"):
        simulate(ServerConfig(model=LLAMA, served=1, max_loras=1), Arrivals.empty(), 10.0)
    with pytest.raises(ConfigError, match="adapter index 5"):
        simulate(ServerConfig(model=LLAMA, served=2, max_loras=1), Arrivals([0.0], [5], [5], [5]), 10.0)
    with pytest.raises(ConfigError, match="duration"):
        simulate(ServerConfig(model=LLAMA, served=1, max_loras=1), Arrivals([0.0], [0], [5], [5]), float("nan"))


def test_kv_too_small_for_context_refuses_to_start():
    with pytest.raises(ConfigError, match="vLLM (failed|refuses) to start"):
        Engine(ServerConfig(model=LLAMA, served=128, max_loras=128, adapter_ranks=(32,) * 128))
    # a shorter --max-model-len makes a (measured-OK) config start
    Engine(ServerConfig(model=LLAMA, served=96, max_loras=96, adapter_ranks=(32,) * 96, max_model_len=32768))


def test_result_tables():
    cfg = ServerConfig(model=LLAMA, served=4, max_loras=2)
    res = simulate(cfg, make_arrivals(300, 4, rate=5, seed=1), 90.0, window_s=30)
    req, win = res.requests, res.windows
    assert req.num_rows == 300
    assert {"ttft_ms", "itl_ms", "e2e_ms", "finished", "preempted"} <= set(req.column_names)
    assert win.num_rows == 3
    assert {"offered_tokens", "completed_tokens", "throughput", "starvation_ratio", "starved", "running",
            "waiting", "kv_usage", "adapter_loads", "adapters"} <= set(win.column_names)
    s = res.summary()
    assert sum(win.column("completed_tokens").to_pylist()) == pytest.approx(s["total_throughput"] * 90, rel=1e-6)


def test_incremental_driving_reports_completions():
    """The replay engine's use: feed arrivals as they come, advance, drain completions."""
    eng = Engine(ServerConfig(model=LLAMA, served=4, max_loras=2), track_completions=True)
    arr = make_arrivals(60, 4, rate=4, seed=5, max_out=50)
    seen = []
    for k in range(0, 60, 10):
        part = Arrivals(arr.time[k:k + 10], arr.adapter[k:k + 10], arr.prompt[k:k + 10], arr.output[k:k + 10])
        eng.add_arrivals(part)
        eng.advance_until(float(arr.time[min(k + 10, 59)]))
        for rid in eng.drain_completions():
            info = eng.request_info(rid)
            assert info["status"] == "finished" and info["finish_time"] >= info["arrival"]
            seen.append(rid)
    eng.advance_until(arr.time[-1] + 60)
    seen += eng.drain_completions()
    assert sorted(seen) == list(range(60))
    with pytest.raises(ConfigError, match="time order"):
        eng.add_arrivals(Arrivals([0.0], [0], [5], [5]))
