"""The Kafka sweep under faults (issue 9 item 3 for the sweep worker): workers SIGKILLed at random moments and the
broker stopped and restarted mid-sweep; whatever exits is restarted, as a supervisor would. Every task ends in the
dataset exactly once and among the committed results."""

from __future__ import annotations

import collections
import json
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adaptwin.kafka import ensure_topics, make_consumer, topic_partitions
from adaptwin.twin.sweep import SweepDataset, grid_design

pytestmark = pytest.mark.broker
QWEN = "qwen-2.5-7b-instruct"
SERVED, SLOTS = [8, 16, 32, 48, 64, 96], [4, 8, 16]


def _start(log: Path, *argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adaptwin", *argv], stdout=subprocess.PIPE,
                            stderr=open(log, "a"), text=True)


def _committed_results(bootstrap: str, topic: str) -> collections.Counter:
    consumer = make_consumer(bootstrap, None, isolation_level="read_committed", consumer_timeout_ms=3000)
    try:
        consumer.assign(topic_partitions(bootstrap, [topic]))
        consumer.seek_to_beginning()
        return collections.Counter(json.loads(line)["task_id"] for msg in consumer for line in msg.value.splitlines())
    finally:
        consumer.close()


def test_worker_kills_and_a_broker_restart_mid_sweep_lose_and_duplicate_nothing(broker_factory, tmp_path):
    broker = broker_factory()
    tag = uuid.uuid4().hex[:8]
    tasks_t, results_t = f"sweep-tasks-{tag}", f"sweep-results-{tag}"
    ensure_topics(broker.bootstrap, {tasks_t: 4, results_t: 4})
    out = tmp_path / "ds"
    want = grid_design([(QWEN, (0.4, 0.2, 0.1), (8, 16))], SERVED, SLOTS, duration=600.0)
    topics = ["--bootstrap", broker.bootstrap, "--tasks-topic", tasks_t, "--results-topic", results_t]
    worker = ["twin", "worker", *topics, "--group", f"g-{tag}", "--idle-exit", "120"]
    workers = {wid: _start(tmp_path / f"worker-{wid}.log", *worker, "--worker-id", wid) for wid in ("a", "b")}
    sweep = _start(tmp_path / "sweep.log", "sweep", "--kafka", "--out", str(out), *topics, "--model", QWEN,
                   "--rates", "0.4,0.2,0.1", "--ranks", "8,16", "--served", ",".join(map(str, SERVED)),
                   "--max-loras", ",".join(map(str, SLOTS)), "--duration", "600", "--idle-timeout", "150", "--json")
    rng = random.Random(7)
    kills = restarts = 0
    try:
        deadline = time.monotonic() + 120
        while SweepDataset(out).read().num_rows < 2 and time.monotonic() < deadline:
            assert sweep.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            time.sleep(0.1)
        # the kills first and quickly, the slow broker restart last: a fast machine must not finish the sweep
        # before the faults (it once did, with the restart in the middle)
        faults = ["kill", "kill", "broker"]
        for fault in faults:
            if sweep.poll() is not None:
                break
            if fault == "broker":
                broker.stop()
                time.sleep(rng.uniform(0.5, 2.0))
                broker.start()
                restarts += 1
            else:
                wid = rng.choice(sorted(workers))
                workers[wid].send_signal(signal.SIGKILL)
                workers[wid].wait()
                kills += 1
            for wid, proc in workers.items():  # the supervisor: whatever died (a kill, the broker away) restarts
                if proc.poll() is not None:
                    workers[wid] = _start(tmp_path / f"worker-{wid}.log", *worker, "--worker-id", wid)
            time.sleep(rng.uniform(0.3, 1.0))
        while sweep.poll() is None:
            for wid, proc in workers.items():
                if proc.poll() is not None:
                    workers[wid] = _start(tmp_path / f"worker-{wid}.log", *worker, "--worker-id", wid)
            time.sleep(0.5)
            assert time.monotonic() < deadline + 400, "the sweep did not finish"
        stdout = sweep.stdout.read()
        assert sweep.returncode == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    finally:
        for p in [sweep, *workers.values()]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [sweep, *workers.values()]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    assert kills == 2 and restarts == 1, "the sweep ended before the faults: the test tested little"
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["rows"] == len(want)
    raw = pa.concat_tables([pq.read_table(p) for p in SweepDataset(out).parts()])
    ids = collections.Counter(raw.column("task_id").to_pylist())
    assert set(ids) == {t.task_id for t in want} and set(ids.values()) == {1}
    assert set(_committed_results(broker.bootstrap, results_t)) == set(ids)
