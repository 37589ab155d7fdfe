"""`adaptwin replay` against the real broker: Kafka in, telemetry and windows out through the lake sink,
exactly once across a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import TopicPartition

import adaptwin.ingest.sink as sink_module
from adaptwin import schemas
from adaptwin.config import TOPICS
from adaptwin.ingest import catalog
from adaptwin.kafka import make_consumer, make_producer
from adaptwin.replay.telemetry import Checkpoint

pytestmark = pytest.mark.broker
ADAPTWIN = [sys.executable, "-m", "adaptwin"]


def _ingest(bootstrap: str, run_id: str, limit: int | None = None) -> None:
    cmd = ADAPTWIN + ["ingest", "--trace", "azure-conv", "--adapters", "16", "--ranks", "8,16", "--run-id", run_id,
                      "--bootstrap", bootstrap, "--json"]
    if limit:
        cmd += ["--limit", str(limit)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _replay_cmd(bootstrap: str, run_in: str, run_id: str, *extra: str) -> list[str]:
    return ADAPTWIN + ["replay", "--run-id-in", run_in, "--run-id", run_id, "--served", "12", "--max-loras", "4",
                       "--bootstrap", bootstrap, "--json", "--no-progress", *extra]


def _sink(bootstrap: str, lake: Path, group: str, monkeypatch) -> None:
    sink_module.LakeSink(sink_module.SinkConfig(bootstrap, lake, topics=(TOPICS.telemetry, TOPICS.windows),
                                                group_id=group, idle_exit_s=1.5, max_age_s=0.3)).run()


def _check_lake(lake: Path, run_id: str, requests: int, summary: dict) -> None:
    tel = catalog.query(lake, f"select count(*) n, count(distinct request_id) d, sum(finished::int) f "
                              f"from telemetry where run_id = '{run_id}'").to_pylist()[0]
    assert (tel["n"], tel["d"]) == (requests, requests)
    assert tel["f"] == summary["finished"]
    wins = catalog.query(lake, f"select scope, window_start, window_end, offered_tokens, completed_tokens, throughput "
                               f"from windows where run_id = '{run_id}' order by scope, window_start").to_pylist()
    run = [w for w in wins if w["scope"] == "run"]
    per = [w for w in wins if w["scope"] == "window"]
    assert len(run) == 1 and len(wins) == summary["windows"]
    assert [(w["window_start"], w["window_end"]) for w in per] == [(60.0 * i, 60.0 * (i + 1)) for i in range(len(per))]
    assert per[-1]["window_end"] == run[0]["window_end"] == summary["duration_s"]
    assert sum(w["offered_tokens"] for w in per) == run[0]["offered_tokens"]
    assert run[0]["throughput"] == pytest.approx(summary["total_throughput"], abs=1e-3)


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_replay_from_kafka_into_the_lake(bootstrap, tmp_path, monkeypatch):
    run_in = f"rin-{uuid.uuid4().hex[:8]}"
    _ingest(bootstrap, run_in, limit=3000)
    # requests of another run in the same topic are skipped
    other = make_producer(bootstrap)
    other.send(TOPICS.requests, key=b"lora-1", value=schemas.encode([
        {"v": 1, "request_id": "x-1", "run_id": "someone-else", "ts": 1.0, "adapter_id": "lora-1", "adapter_rank": 8,
         "prompt_tokens": 10, "output_tokens": 10, "source": "test"}]))
    other.flush()
    other.close()
    run_id = f"rp-{uuid.uuid4().hex[:8]}"
    out = subprocess.run(_replay_cmd(bootstrap, run_in, run_id), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = _last_json(out.stdout)
    assert summary["arrivals"] == 3000 and summary["other_runs_skipped"] >= 1
    refused = summary["refused"]
    assert refused > 0  # lora-12 … lora-15 are not served by --served 12
    assert summary["telemetry"] == 3000
    _sink(bootstrap, tmp_path, f"sink-{run_id}", monkeypatch)
    _check_lake(tmp_path, run_id, 3000, summary)
    # running it again changes nothing: the replay is complete
    again = subprocess.run(_replay_cmd(bootstrap, run_in, run_id), capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and _last_json(again.stdout)["already_complete"] is True


def _checkpoint(bootstrap: str, group: str) -> Checkpoint | None:
    consumer = make_consumer(bootstrap, group)
    try:
        om = consumer.committed(TopicPartition(TOPICS.requests, 0), metadata=True)
    finally:
        consumer.close(autocommit=False)
    return Checkpoint.from_metadata(om.metadata) if om is not None else None


def test_sigkilled_replay_restarts_without_duplicate_telemetry(bootstrap, tmp_path, monkeypatch):
    run_in = f"kin-{uuid.uuid4().hex[:8]}"
    _ingest(bootstrap, run_in)
    n = 19_366
    run_id = f"rk-{uuid.uuid4().hex[:8]}"
    # small flushes: records reach the broker inside the open transaction, which the kill leaves to be aborted
    cmd = _replay_cmd(bootstrap, run_in, run_id, "--commit-interval", "1.0", "--flush-records", "50")
    # paced (an hour of trace in about 24 s), so that a fast machine cannot finish before the kill
    replay = subprocess.Popen(cmd + ["--speedup", "150"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    cp = None
    while time.monotonic() < deadline and replay.poll() is None:
        cp = _checkpoint(bootstrap, f"adaptwin-replay-{run_id}")
        # kill it mid-run: ten trace minutes committed, and more telemetry sent in the open transaction
        if cp is not None and cp.tick >= 600 and _telemetry_rows(bootstrap, run_id, "read_uncommitted") > cp.telemetry:
            break
        time.sleep(0.02)
    assert replay.poll() is None, "the replay finished before it could be killed: the test tested nothing"
    os.kill(replay.pid, signal.SIGKILL)
    replay.wait()
    assert cp is not None and not cp.done and 0 < cp.telemetry < n
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    summary = _last_json(out.stdout)
    assert summary["resumed_after_tick"] >= cp.tick
    assert summary["telemetry"] == n
    _sink(bootstrap, tmp_path, f"sink-{run_id}", monkeypatch)
    _check_lake(tmp_path, run_id, n, summary)
    raw = _telemetry_rows(bootstrap, run_id, "read_uncommitted")
    assert raw >= n  # > n when the kill left an open transaction: its records are in the log, aborted
    print(f"killed after tick {cp.tick}; aborted telemetry records in the log: {raw - n}")


def _telemetry_rows(bootstrap: str, run_id: str, isolation_level: str) -> int:
    consumer = make_consumer(bootstrap, None, isolation_level=isolation_level)
    tp = TopicPartition(TOPICS.telemetry, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    end = consumer.end_offsets([tp])[tp]
    needle = f'"run_id":"{run_id}"'.encode()
    rows = 0
    while consumer.position(tp) < end:
        for records in consumer.poll(timeout_ms=1000, max_records=5000).values():
            rows += sum(r.value.count(needle) for r in records)
        if isolation_level == "read_committed":
            break
    consumer.close(autocommit=False)
    return rows


def test_follow_replays_a_live_ingest_and_file_source_commits_too(bootstrap, tmp_path, monkeypatch):
    run_in = f"fin-{uuid.uuid4().hex[:8]}"
    run_id = f"rf-{uuid.uuid4().hex[:8]}"
    follow = subprocess.Popen(_replay_cmd(bootstrap, run_in, run_id, "--follow", "--idle-exit", "4",
                                          "--discover", "0", "--ranks", "8,16"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    _ingest(bootstrap, run_in, limit=2000)  # produced while the replay is already reading
    out, err = follow.communicate(timeout=120)
    assert follow.returncode == 0, err
    summary = _last_json(out)
    assert summary["arrivals"] == 2000 and summary["telemetry"] == 2000
    # the same trace from the file: no request offsets to commit, the checkpoint still goes with the transaction
    file_id = f"rfile-{uuid.uuid4().hex[:8]}"
    res = subprocess.run(ADAPTWIN + ["replay", "--source", "azure-conv", "--adapters", "16", "--ranks", "8,16",
                                     "--limit", "2000", "--served", "12", "--max-loras", "4", "--run-id", file_id,
                                     "--bootstrap", bootstrap, "--json", "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    from_file = _last_json(res.stdout)
    for key in ("arrivals", "finished", "refused", "total_throughput", "mean_ttft_ms", "adapter_loads"):
        assert from_file[key] == summary[key], key
    _sink(bootstrap, tmp_path, f"sink-{file_id}", monkeypatch)
    _check_lake(tmp_path, run_id, 2000, summary)
    _check_lake(tmp_path, file_id, 2000, from_file)
