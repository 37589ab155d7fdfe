"""Fixtures of the replay tests."""

from __future__ import annotations

import pytest

from adaptwin.replay.aio import new_event_loop


@pytest.fixture
def loop():
    """A fresh event loop of the kind twin serve and the vllm backend run on (uvloop where installed)."""
    lp = new_event_loop()
    yield lp
    lp.close()
