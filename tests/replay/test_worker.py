"""``adaptwin sweep --kafka`` with ``adaptwin twin worker`` processes on the real broker (replay/worker.py):
a worker SIGKILLed mid-sweep and restarted, every task in the dataset exactly once; bad tasks to the dead letters."""

import collections
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from adaptwin.config import TOPICS
from adaptwin.kafka import make_consumer, make_producer, topic_partitions
from adaptwin.replay.worker import WorkerConfig, run_worker
from adaptwin.twin.sweep import SweepDataset, grid_design

QWEN = "qwen-2.5-7b-instruct"


def _adaptwin(*argv: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "adaptwin", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _read_all(bootstrap: str, topic: str) -> list[dict]:
    consumer = make_consumer(bootstrap, None, isolation_level="read_committed", consumer_timeout_ms=3000)
    try:
        consumer.assign(topic_partitions(bootstrap, [topic]))
        consumer.seek_to_beginning()
        return [json.loads(line) for msg in consumer for line in msg.value.splitlines()]
    finally:
        consumer.close()


def test_worker_killed_mid_sweep_and_restarted_every_task_exactly_once(bootstrap, make_topic, tmp_path):
    tasks_t, results_t = make_topic(4, "sweep-tasks"), make_topic(4, "sweep-results")
    group = f"g-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "ds"
    design = ["--model", QWEN, "--rates", "0.4,0.2,0.1", "--ranks", "8,16", "--served", "8,16,32,48,64,96",
              "--max-loras", "4,8,16", "--duration", "600"]
    want = grid_design([(QWEN, (0.4, 0.2, 0.1), (8, 16))], [8, 16, 32, 48, 64, 96], [4, 8, 16], duration=600.0)
    topics = ["--bootstrap", bootstrap, "--tasks-topic", tasks_t, "--results-topic", results_t]
    worker = ["twin", "worker", *topics, "--group", group, "--idle-exit", "90"]
    a = _adaptwin(*worker, "--worker-id", "a")
    b = _adaptwin(*worker, "--worker-id", "b")
    sweep = _adaptwin("sweep", "--kafka", "--out", str(out), *topics, *design, "--idle-timeout", "90", "--json")
    procs = [a, b, sweep]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and SweepDataset(out).read().num_rows < 3:
            assert sweep.poll() is None, sweep.communicate()
            time.sleep(0.1)
        assert SweepDataset(out).read().num_rows >= 3, "no result arrived: did the workers join their group?"
        a.send_signal(signal.SIGKILL)  # mid-task: its open transaction holds a result that must not count
        a.wait()
        a2 = _adaptwin(*worker, "--worker-id", "a")  # same id: fences the dead one, aborts its transaction
        procs.append(a2)
        stdout, stderr = sweep.communicate(timeout=240)
        assert sweep.returncode == 0, stderr[-3000:]
        summary = json.loads(stdout.strip().splitlines()[-1])
        assert summary["planned"] == len(want) and summary["rows"] == len(want)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
    # the dataset: every task exactly once (raw part files, no de-duplication on read)
    ds = SweepDataset(out)
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = pa.concat_tables([pq.read_table(p) for p in ds.parts()])
    ids = collections.Counter(raw.column("task_id").to_pylist())
    assert set(ids) == {t.task_id for t in want} and set(ids.values()) == {1}
    assert all(e == "" for e in raw.column("error").to_pylist())
    # the committed results hold every task; the killed worker's aborted result is invisible
    committed = collections.Counter(r["task_id"] for r in _read_all(bootstrap, results_t))
    assert set(committed) == set(ids)
    # a rerun finds everything done and publishes nothing
    rerun = _adaptwin("sweep", "--kafka", "--out", str(out), *topics, *design, "--json")
    stdout, stderr = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stderr[-2000:]
    again = json.loads(stdout.strip().splitlines()[-1])
    assert again["published"] == 0 and again["skipped"] == len(want) and again["rows"] == len(want)


def test_bad_tasks_go_to_the_dead_letters_with_a_reason(bootstrap, make_topic):
    tasks_t, results_t = make_topic(1, "sweep-tasks"), make_topic(1, "sweep-results")
    marker = uuid.uuid4().hex
    producer = make_producer(bootstrap)
    good = grid_design([(QWEN, (0.2,), (8,))], [4], [4], duration=60.0)[0].to_dict()
    for value in (b"not json " + marker.encode(),
                  json.dumps({"v": 99, "marker": marker}).encode(),
                  json.dumps({"v": 1, "model": QWEN, "marker": marker}).encode(),
                  json.dumps({"v": 1, **good}).encode()):
        producer.send(tasks_t, value=value)
    producer.flush()
    producer.close()
    out = run_worker(WorkerConfig(bootstrap=bootstrap, group=f"g-{marker[:8]}", worker_id=f"t-{marker[:8]}",
                                  tasks_topic=tasks_t, results_topic=results_t, max_tasks=4, idle_exit_s=60))
    assert out["tasks"] == 1 and out["dead_letters"] == 3
    results = _read_all(bootstrap, results_t)
    assert [r["task_id"] for r in results] == [good["task_id"]] and results[0]["error"] == ""
    dead = [d for d in _read_all(bootstrap, TOPICS.deadletter) if marker in d.get("payload", "")]
    assert len(dead) == 3 and all(d["reason"].startswith("bad sweep task") for d in dead)
    assert {d["stage"] for d in dead} == {"sweep-worker"}
    reasons = " ".join(d["reason"] for d in dead)
    assert "unknown task record version 99" in reasons and "not a sweep task" in reasons


@pytest.mark.parametrize("argv,match", [(["--rates", "0.1", "--ranks", "64"], "largest rank")])
def test_kafka_sweep_refuses_invalid_designs_before_publishing(tmp_path, argv, match):
    p = _adaptwin("sweep", "--kafka", "--bootstrap", "127.0.0.1:1", "--out", str(tmp_path / "ds"), *argv)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 2 and match in stderr


def test_self_assigned_workers_split_partitions_and_resume_from_committed_offsets(bootstrap, make_topic):
    from adaptwin.replay.worker import publish_tasks

    tasks_t, results_t = make_topic(4, "sweep-tasks"), make_topic(1, "sweep-results")
    tasks = grid_design([(QWEN, (0.2, 0.1), (8,))], [4, 8, 16], [4, 8], duration=60.0, seeds=[0, 1])
    assert publish_tasks(bootstrap, tasks, tasks_t) == len(tasks)
    group = f"g-{uuid.uuid4().hex[:8]}"

    def work(i: int) -> int:
        cfg = WorkerConfig(bootstrap=bootstrap, group=group, worker_id=f"{group}-{i}", tasks_topic=tasks_t,
                           results_topic=results_t, idle_exit_s=4.0, assign=(i, 2))
        return run_worker(cfg)["tasks"]

    first, second = work(0), work(1)
    assert first > 0 and second > 0 and first + second == len(tasks)
    assert work(0) == 0  # its partitions' offsets were committed with the results
    got = collections.Counter(r["task_id"] for r in _read_all(bootstrap, results_t))
    assert got == collections.Counter(t.task_id for t in tasks)
