"""The lake sink against the real broker: contents, dead letters, and exactly-once across SIGKILL."""

import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest

from adaptwin import schemas
from adaptwin.cliutil import UserError
from adaptwin.config import TOPICS
from adaptwin.ingest import catalog
from adaptwin.ingest.sink import LakeSink, SinkConfig
from adaptwin.kafka import make_producer

pytestmark = pytest.mark.broker


def _req(run_id: str, i: int) -> dict:
    return {"v": 1, "request_id": f"{run_id}-{i}", "run_id": run_id, "ts": i * 0.01, "adapter_id": f"lora-{i % 7}",
            "adapter_rank": 8, "prompt_tokens": 100 + i % 50, "output_tokens": 10 + i % 5, "source": f"test:{i}"}


def _produce(bootstrap: str, run_id: str, n: int, per_message: int) -> None:
    producer = make_producer(bootstrap)
    for start in range(0, n, per_message):
        recs = [_req(run_id, i) for i in range(start, min(n, start + per_message))]
        producer.send(TOPICS.requests, key=recs[0]["adapter_id"].encode(), value=schemas.encode(recs))
    producer.flush()
    producer.close()


def _count(lake, run_id: str) -> tuple[int, int]:
    row = catalog.query(lake, f"select count(*) n, count(distinct request_id) d from requests "
                              f"where run_id = '{run_id}'").to_pylist()[0]
    return row["n"], row["d"]


def test_sink_writes_rows_and_dead_letters_bad_records(bootstrap, tmp_path):
    run_id = f"sink-{uuid.uuid4().hex[:8]}"
    _produce(bootstrap, run_id, 2_500, per_message=100)
    producer = make_producer(bootstrap)
    producer.send(TOPICS.requests, key=b"x", value=schemas.encode([dict(_req(run_id, 99_999), v=9)]))
    producer.send(TOPICS.requests, key=b"x", value=b'{"v":1, "request_id": oops')
    producer.flush()
    group = f"g-{run_id}"
    stats = LakeSink(SinkConfig(bootstrap, tmp_path, topics=(TOPICS.requests,), group_id=group,
                                idle_exit_s=2.0, max_age_s=0.5)).run()
    assert stats.dead_lettered >= 2
    assert _count(tmp_path, run_id) == (2_500, 2_500)
    # the dead letters reached their topic with the reason and the raw payload
    LakeSink(SinkConfig(bootstrap, tmp_path, topics=(TOPICS.deadletter,), group_id=group, idle_exit_s=2.0)).run()
    dead = catalog.query(tmp_path, "select reason, payload, source from deadletter where stage = 'sink' "
                                   f"and payload like '%{run_id}%' or payload like '%oops%'").to_pylist()
    reasons = " ".join(d["reason"] for d in dead)
    assert "version" in reasons and "not valid JSON" in reasons
    assert all(d["source"] == TOPICS.requests for d in dead)


def test_second_run_of_same_group_adds_nothing(bootstrap, tmp_path):
    run_id = f"again-{uuid.uuid4().hex[:8]}"
    _produce(bootstrap, run_id, 1_000, per_message=50)
    cfg = SinkConfig(bootstrap, tmp_path, topics=(TOPICS.requests,), group_id=f"g-{run_id}", idle_exit_s=1.5)
    LakeSink(cfg).run()
    LakeSink(cfg).run()
    assert _count(tmp_path, run_id) == (1_000, 1_000)


def test_sigkill_at_random_moments_keeps_lake_exactly_once(bootstrap, tmp_path):
    run_id = f"kill-{uuid.uuid4().hex[:8]}"
    n = 60_000
    rng = random.Random(7)
    cmd = [sys.executable, "-m", "adaptwin", "sink", "--bootstrap", bootstrap, "--lake", str(tmp_path),
           "--topics", TOPICS.requests, "--group", f"g-{run_id}", "--max-age", "0.05"]
    kills = 0
    # produce from a thread while the sink is killed and restarted
    t = threading.Thread(target=_produce, args=(bootstrap, run_id, n, 40))
    t.start()
    rows_seen = 0
    while t.is_alive() or kills < 4:
        sink = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # kill only once this sink is writing (start-up time varies with the machine's load)
        deadline = time.monotonic() + 120
        while _count(tmp_path, run_id)[0] <= rows_seen and time.monotonic() < deadline and rows_seen < n:
            time.sleep(0.1)
        time.sleep(rng.uniform(0.0, 0.4))
        os.kill(sink.pid, signal.SIGKILL)
        sink.wait()
        kills += 1
        rows_seen = _count(tmp_path, run_id)[0]
    t.join()
    assert 0 < rows_seen, "the killed sinks never got to write: the test did not test anything"
    final = subprocess.run(cmd + ["--idle-exit", "3"], capture_output=True, text=True, timeout=180)
    assert final.returncode == 0, final.stderr
    assert _count(tmp_path, run_id) == (n, n), f"after {kills} kills"
    assert not list(tmp_path.rglob("*.tmp")), "temp files left behind in the lake"


def test_second_sink_on_same_lake_and_group_is_refused(bootstrap, tmp_path):
    first = LakeSink(SinkConfig(bootstrap, tmp_path, topics=(TOPICS.requests,), group_id="g-lock", idle_exit_s=0.5))
    with pytest.raises(UserError, match="already writing"):
        LakeSink(SinkConfig(bootstrap, tmp_path, topics=(TOPICS.requests,), group_id="g-lock"))
    first.run()  # releases the lock
    LakeSink(SinkConfig(bootstrap, tmp_path, topics=(TOPICS.requests,), group_id="g-lock", idle_exit_s=0.5)).run()


def test_missing_topic_is_a_clear_error(bootstrap, tmp_path):
    with pytest.raises(UserError, match="adaptwin topics create"):
        LakeSink(SinkConfig(bootstrap, tmp_path, topics=("no.such.topic",), group_id="g-missing"))

