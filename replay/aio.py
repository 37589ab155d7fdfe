"""The event loop and step clock of ``twin serve`` and the ``vllm`` backend, where wall-clock precision is the product.

At ``--speedup 10`` every wall millisecond of HTTP overhead reads as 10 trace ms of TTFT, so both ends use uvloop
when it is installed (a localhost hop costs about 0.03 ms instead of 0.06–0.09 ms with asyncio's own loop), and the
twin's step clock wakes on a Linux ``timerfd``: epoll takes whole milliseconds, so ``asyncio.sleep`` wakes 0–1 ms
late (uvloop's timers too), while a timerfd fires within about 0.06 ms of its deadline. Arrival stamps of bytes are
in :mod:`.netstamp`.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import sys
import time
from typing import Coroutine

__all__ = ["new_event_loop", "run", "WallTimer", "LOOP_KIND"]

try:
    import uvloop
except ImportError:  # not on Windows; everything works on asyncio's loop, a little slower
    uvloop = None

LOOP_KIND = "uvloop" if uvloop is not None else "asyncio"


def new_event_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def run(main: Coroutine) -> None:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(main)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


EARLY_GAIN = 0.1  # how fast the aim follows the wake-up delay (a mean over about ten wake-ups)
MAX_EARLY_S = 0.002
_CLOCK_MONOTONIC, _TFD_TIMER_ABSTIME = 1, 1
_TFD_NONBLOCK, _TFD_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC  # timerfd's flags are these values on Linux


def _libc_timerfd():
    if not sys.platform.startswith("linux") or time.get_clock_info("perf_counter").implementation != \
            "clock_gettime(CLOCK_MONOTONIC)":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return libc if hasattr(libc, "timerfd_create") else None
    except OSError:
        return None


class WallTimer:
    """``await timer.sleep_until(t)``: resume when ``time.perf_counter()`` reaches ``t`` (one sleeper at a time).

    On Linux a ``timerfd`` armed at the absolute CLOCK_MONOTONIC deadline (= ``perf_counter``) wakes the loop through
    its reader; elsewhere it falls back to ``asyncio.sleep``. The timer aims ``early_s`` before the deadline, and
    ``early_s`` follows the measured wake-up delay (a running mean), so that the resumptions centre on the
    deadlines whatever the machine's load: some a little early, some a little late.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self._loop = loop or asyncio.get_running_loop()
        self._libc = _libc_timerfd()
        self._fd = -1
        self._waiter: asyncio.Future | None = None
        if self._libc is not None:
            fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
            if fd >= 0:
                self._fd = fd
                self._loop.add_reader(fd, self._fired)
        self.precise = self._fd >= 0
        self.early_s = 0.00005 if self.precise else 0.0005  # starting points: typical mean wake-up delays

    def _learn(self, deadline: float) -> None:
        late = time.perf_counter() - deadline
        self.early_s = min(MAX_EARLY_S, max(0.0, self.early_s + EARLY_GAIN * late))

    def _fired(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:  # re-armed after it fired: the old expiry is gone
            return
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def sleep_until(self, deadline: float) -> None:
        t = deadline - self.early_s
        if t <= time.perf_counter():
            return
        if not self.precise:
            await asyncio.sleep(t - time.perf_counter())
        else:
            sec = int(t)
            spec = _Itimerspec(_Timespec(0, 0), _Timespec(sec, int((t - sec) * 1e9)))
            if self._libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(spec), None) != 0:
                raise OSError(ctypes.get_errno(), "timerfd_settime failed")
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._learn(deadline)

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
            self.precise = False
