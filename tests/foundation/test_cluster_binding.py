"""Offsets mean something only within one Kafka cluster and one consumer group: a lake and a learner checkpoint
made from one broker refuse another (a re-created broker starts its offsets again at 0), instead of deleting the
lake's files as "uncommitted" or skipping windows."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest

from adaptwin.cliutil import UserError
from adaptwin.config import TOPICS
from adaptwin.ingest.sink import LakeSink, SinkConfig

from .test_sink import _count, _produce

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def other_broker(broker_factory):
    return broker_factory()


def test_a_lake_refuses_another_group_or_cluster(bootstrap, other_broker, tmp_path):
    run_id = f"bind-{uuid.uuid4().hex[:8]}"
    _produce(bootstrap, run_id, 500, per_message=50)
    LakeSink(SinkConfig(bootstrap, tmp_path, topics=(TOPICS.requests,), group_id="g-owner", idle_exit_s=1.0)).run()
    assert _count(tmp_path, run_id) == (500, 500)
    with pytest.raises(UserError, match="sink group 'g-owner'"):
        LakeSink(SinkConfig(bootstrap, tmp_path, topics=(TOPICS.requests,), group_id="g-other"))
    with pytest.raises(UserError, match="cluster"):
        LakeSink(SinkConfig(other_broker.bootstrap, tmp_path, topics=(TOPICS.requests,), group_id="g-owner"))
    assert _count(tmp_path, run_id) == (500, 500)  # nothing deleted


def test_a_learner_checkpoint_refuses_another_cluster(bootstrap, other_broker, make_topic, tmp_path):
    windows = make_topic(prefix="win")
    argv = [sys.executable, "-m", "adaptwin", "learn", "--windows-topic", windows, "--checkpoint", str(tmp_path),
            "--group", f"g-{windows}", "--idle-exit", "1", "--no-progress", "--json"]
    first = subprocess.run([*argv, "--bootstrap", bootstrap], capture_output=True, text=True, timeout=180)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run([*argv, "--bootstrap", other_broker.bootstrap], capture_output=True, text=True, timeout=180)
    assert again.returncode == 2 and "cluster" in again.stderr, again.stderr[-2000:]
