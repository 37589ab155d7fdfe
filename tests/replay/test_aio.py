"""``adaptwin.replay.aio``: the precise step clock and the event loop that twin serve and the vllm backend run on."""

from __future__ import annotations

import sys
import time

import pytest

from adaptwin.replay import aio
from adaptwin.replay.aio import MAX_EARLY_S, WallTimer


def _lateness(loop, timer: WallTimer, n: int, gap_s: float) -> list[float]:
    async def go() -> list[float]:
        late = []
        for _ in range(n):
            deadline = time.perf_counter() + gap_s
            await timer.sleep_until(deadline)
            late.append(time.perf_counter() - deadline)
        return late

    return loop.run_until_complete(go())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")
def test_wall_timer_uses_a_timerfd_and_never_wakes_before_its_aim(loop):
    timer = WallTimer(loop)
    assert timer.precise
    late = _lateness(loop, timer, 30, 0.002)
    timer.close()
    # a timerfd fires at or after its absolute deadline: the resumption is never before the aim
    assert all(lt >= -MAX_EARLY_S for lt in late)
    assert sorted(late)[15] < 0.005  # and it comes: the median wake-up is a few ms late at worst


def test_wall_timer_follows_its_measured_wake_up_delay(loop):
    timer = WallTimer(loop)
    start = timer.early_s
    timer._learn(time.perf_counter() - 0.001)  # resumed 1 ms late: aim earlier
    assert timer.early_s == pytest.approx(start + aio.EARLY_GAIN * 0.001, abs=2e-5)
    for _ in range(200):
        timer._learn(time.perf_counter() - 0.01)
    assert timer.early_s == MAX_EARLY_S  # bounded: a stall does not make every later token early
    for _ in range(500):
        timer._learn(time.perf_counter() + 0.001)  # resumed early: aim later, down to the deadline itself
    assert timer.early_s == 0.0
    timer.close()


def test_wall_timer_falls_back_to_asyncio_sleep(loop, monkeypatch):
    monkeypatch.setattr(aio, "_libc_timerfd", lambda: None)
    timer = WallTimer(loop)
    assert not timer.precise
    late = _lateness(loop, timer, 5, 0.003)
    assert all(lt > -MAX_EARLY_S for lt in late)
    timer.close()


def test_both_ends_run_on_uvloop(loop):
    """uvloop is a dependency (as for vLLM's own API server): twin serve and the vllm backend use it."""
    import uvloop

    assert aio.LOOP_KIND == "uvloop"
    assert isinstance(loop, uvloop.Loop)
