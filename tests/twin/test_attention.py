"""The attention (KV-read) step term: exact under closed-form jumps, and it prices long contexts."""

import dataclasses

import pytest

from adaptwin.twin import Engine, ServerConfig
from adaptwin.twin.profile import load_profile
from adaptwin.twin.result import SimResult

from .conftest import LLAMA, make_arrivals


class _StepByStep(Engine):
    """Never jumps: every decode step simulated on its own (the reference for the closed form)."""

    def _jump(self, until: float) -> None:
        self._exact_step()


def _profile(kv_ms_per_ktoken: float):
    prof = load_profile(LLAMA)
    return dataclasses.replace(prof, step=dataclasses.replace(prof.step, kv_read_ms_per_ktoken=kv_ms_per_ktoken))


def _summary(cls, prof, arr, cfg, duration):
    eng = cls(cfg, prof)
    eng.add_arrivals(arr)
    eng.advance_until(duration)
    s = SimResult.from_engine(eng, duration).summary()
    s.pop("wall_s")
    return eng, s


@pytest.mark.parametrize("slots", [1, 4])
def test_jumps_with_growing_step_time_match_step_by_step(slots):
    cfg = ServerConfig(model=LLAMA, served=4, max_loras=slots)
    arr = make_arrivals(150, 4, rate=4, seed=5, max_out=300)
    prof = _profile(0.5)  # ten times a real GPU's cost, so that the growth matters within a jump
    jumped, a = _summary(Engine, prof, arr, cfg, 60.0)
    stepped, b = _summary(_StepByStep, prof, arr, cfg, 60.0)
    assert jumped.max_steps_jumped > 10  # the closed form was exercised
    assert a["finished"] == b["finished"] and a["arrivals"] == b["arrivals"]
    assert a["total_throughput"] == pytest.approx(b["total_throughput"], rel=1e-9)
    assert a["mean_itl_ms"] == pytest.approx(b["mean_itl_ms"], rel=1e-9)
    assert a["mean_ttft_ms"] == pytest.approx(b["mean_ttft_ms"], rel=1e-9)
    assert jumped.step == stepped.step


def test_long_contexts_cost_more():
    """One request decoding alone: its step time rises by the KV-read cost of its context, token by token."""
    cfg = ServerConfig(model=LLAMA, served=1, max_loras=1)
    from adaptwin.twin import Arrivals

    arr = Arrivals([0.0], [0], [1000], [101])
    kv = 0.05

    def itl_ms(prof):
        eng, _ = _summary(Engine, prof, arr, cfg, 60.0)
        r = eng.request_arrays()
        return float((r["last_token"][0] - r["first_token"][0]) / 100 * 1e3)

    # the 100 decode steps attend to 1001 … 1100 tokens (prompt + tokens so far incl. the one fed in): mean 1050.5
    assert itl_ms(_profile(kv)) - itl_ms(_profile(0.0)) == pytest.approx(kv * 1.0505, rel=1e-6)
