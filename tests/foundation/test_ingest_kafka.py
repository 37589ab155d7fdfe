"""`adaptwin ingest` against the real broker: counts, dead letters, pacing, a broker down or restarting."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from adaptwin.broker import LocalBroker, free_port
from adaptwin.config import TOPICS
from adaptwin.ingest import catalog
from adaptwin.ingest.sink import LakeSink, SinkConfig
from adaptwin.kafka import ensure_topics

pytestmark = pytest.mark.broker
TRACES = Path(__file__).resolve().parents[2] / "ingest" / "traces"


def _ingest(bootstrap: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaptwin", "ingest", "--bootstrap", bootstrap, "--json", *args],
                          capture_output=True, text=True, timeout=timeout)


def _sink(bootstrap: str, lake: Path, topics=(TOPICS.requests, TOPICS.deadletter)) -> None:
    LakeSink(SinkConfig(bootstrap, lake, topics=tuple(topics), group_id=f"t-{uuid.uuid4().hex[:8]}",
                        idle_exit_s=2.0)).run()


def _count(lake: Path, table: str, run_id: str) -> tuple[int, int]:
    key = "request_id" if table == "requests" else "line"
    row = catalog.query(lake, f"select count(*) n, count(distinct {key}) d from {table} "
                              f"where run_id = '{run_id}'").to_pylist()[0]
    return row["n"], row["d"]


def test_broken_trace_publishes_good_rows_and_dead_letters_bad_ones(bootstrap, tmp_path):
    lines = (TRACES / "AzureLLMInferenceTrace_code.csv").read_bytes().splitlines()[:1001]
    lines[10] = lines[10].replace(b",", b",abc,", 1)  # text in a number field, extra column
    lines[20] = b"2023-11-16 18:17:05.0000000,-5,10"  # negative tokens
    lines[30] = lines[30] + b"\xff\xfe"  # not UTF-8
    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"\n".join(lines) + b"\n")
    run_id = f"broken-{uuid.uuid4().hex[:6]}"
    out = _ingest(bootstrap, "--trace", str(broken), "--adapters", "8", "--run-id", run_id)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert (report["accepted"], report["dead_lettered"]) == (997, 3)
    _sink(bootstrap, tmp_path / "lake")
    assert _count(tmp_path / "lake", "requests", run_id) == (997, 997)
    dead = catalog.query(tmp_path / "lake", f"select line, reason, payload, source from deadletter "
                                            f"where run_id = '{run_id}' order by line").to_pylist()
    assert [d["line"] for d in dead] == [11, 21, 31]
    assert all(d["source"].endswith("broken.csv") for d in dead)
    assert "encoding" in dead[2]["reason"] and dead[1]["payload"].startswith("2023-11-16 18:17:05")


def test_a_file_that_is_not_a_trace_gets_one_clear_error(bootstrap, tmp_path):
    junk = tmp_path / "picture.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(2000))
    out = _ingest(bootstrap, "--trace", str(junk))
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "picture.png" in out.stderr


def test_speedup_paces_in_scaled_wall_time(bootstrap):
    t0 = time.monotonic()
    # 60 s of the conversation trace at 20x: about 3 s of pacing
    out = _ingest(bootstrap, "--trace", "azure-conv", "--duration", "60", "--speedup", "20",
                  "--run-id", f"pace-{uuid.uuid4().hex[:6]}")
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["accepted"] > 50
    assert 2.6 <= report["wall_s"] <= 7.0, report
    assert took >= 2.6


def test_broker_down_at_start_then_restarting_mid_run_loses_nothing(tmp_path):
    broker = LocalBroker(port=free_port(), controller_port=free_port(), data_dir=tmp_path / "kafka")
    run_id = f"restart-{uuid.uuid4().hex[:6]}"
    # the ingest starts first and has to wait for the broker
    ingest = subprocess.Popen([sys.executable, "-m", "adaptwin", "ingest", "--bootstrap", broker.bootstrap, "--json",
                               "--trace", "azure-conv", "--duration", "300", "--speedup", "30", "--run-id", run_id],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        broker.start()
        ensure_topics(broker.bootstrap)
        time.sleep(3)
        broker.kill()  # SIGKILL mid-run
        time.sleep(2)
        broker.start()
        out, err = ingest.communicate(timeout=240)
        assert ingest.returncode == 0, err
        report = json.loads(out.strip().splitlines()[-1])
        _sink(broker.bootstrap, tmp_path / "lake", topics=(TOPICS.requests,))
        assert _count(tmp_path / "lake", "requests", run_id) == (report["accepted"], report["accepted"])
    finally:
        if ingest.poll() is None:
            ingest.send_signal(signal.SIGKILL)
        broker.stop()
