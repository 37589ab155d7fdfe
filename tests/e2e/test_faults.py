"""Fault tests on a private real broker: consumers SIGKILLed at random moments and restarted, the broker
stopped and restarted mid-run, the lake compacted after each fault; afterwards every accepted request has exactly one telemetry row in the lake,
every window of the run is there once, and every rejected row is in the dead-letter table with its reason.

The harness (ingest with malformed rows, a supervisor that restarts what died, the lake checks) is
benchmarks/reliability.py, which also prints the reliability table of benchmarks/RESULTS.md. The consumers
under fault are its ``CONSUMERS`` list plus the learner (``OPTIONAL_CONSUMERS``).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("adaptwin_reliability", ROOT / "benchmarks" / "reliability.py")
reliability = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = reliability  # dataclasses look their module up there
_spec.loader.exec_module(reliability)

log = logging.getLogger(__name__)

# which consumers a run starts and kills: each entry is one test (one run with all three keeps CI short; the
# sweep worker's kill test is tests/replay/test_worker.py, its tasks are another flow)
VICTIMS = [
    pytest.param(("replay", "sink", "learner"), id="replay+sink+learner"),
]
ALL_CONSUMERS = {c.name: c for c in [*reliability.CONSUMERS, *reliability.OPTIONAL_CONSUMERS.values()]}


@pytest.fixture(scope="module")
def private_broker(broker_factory):
    return broker_factory()


def _assert_nothing_lost(r) -> None:
    assert r.rows_produced > 0 and r.replay_summary["telemetry"] == r.rows_produced
    assert (r.telemetry_in_lake, r.lost, r.duplicated) == (r.rows_produced, 0, 0), r
    assert r.requests_in_lake == r.rows_produced
    assert r.windows_complete and r.windows_in_lake == r.windows_expected > 2, r
    assert r.dead_lettered_by_ingest == r.bad_rows_tried == r.dead_letters_in_lake, r
    assert r.dead_letters_without_reason == 0
    if r.recommendations_in_lake is not None:  # the learner ran: one recommendation per window, none twice
        assert r.recommendations_in_lake == r.recommendations_distinct == r.recommendations_expected > 0, r


@pytest.mark.parametrize("victims", VICTIMS)
def test_kills_and_a_broker_restart_lose_and_duplicate_nothing(private_broker, tmp_path, victims):
    consumers = [ALL_CONSUMERS[name] for name in victims]
    r = reliability.run_scenario(private_broker, tmp_path, requests=5000, bad_rows=150, kills=4,
                                 broker_restarts=1, seed=11, consumers=consumers, timeout_s=150)
    log.warning("fault run: %s", {k: v for k, v in r.__dict__.items() if k != "replay_summary"})
    assert r.broker_restarts == 1 and r.kills == 4
    assert r.faults_mid_replay >= 2 and r.kills_by_consumer.get("replay", 0) >= 1, \
        f"the replay finished before the faults: the test tested little ({r})"
    # `lake compact` ran beside the killed sink (and once at the end): the counts below are after it
    assert r.compactions >= 2, r.compaction_skipped
    _assert_nothing_lost(r)


@pytest.mark.soak
def test_soak_many_kills_and_broker_restarts(private_broker, tmp_path):
    r = reliability.run_scenario(private_broker, tmp_path, requests=19_000, bad_rows=1000, kills=12,
                                 broker_restarts=3, seed=5, timeout_s=900)
    log.warning("soak run: %s", {k: v for k, v in r.__dict__.items() if k != "replay_summary"})
    assert r.broker_restarts == 3 and r.kills == 12 and r.faults_mid_replay >= 6
    _assert_nothing_lost(r)
