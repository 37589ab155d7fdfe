"""`adaptwin demo` (issue 9 item 1): the whole pipeline on a real trace, a summary, the dashboard until Ctrl-C.

Run as a process, as a user runs it: against the session broker (summary only, then exit), and once with its own
broker and the dashboard, stopped by SIGINT to its process group as a terminal's Ctrl-C does.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import httpx
import pytest

from adaptwin.broker import free_port

pytestmark = pytest.mark.broker

LIMIT = 4000  # first requests of the Azure conversation trace: ~12 trace minutes, a dozen windows


def demo(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adaptwin", "demo", "--limit", str(LIMIT), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def lake_count(lake: Path, table: str, run: str) -> int:
    files = str(lake / table / f"run_id={run}" / "**" / "*.parquet")
    with duckdb.connect() as con:
        return con.execute(f"select count(*) from read_parquet('{files}', hive_partitioning=false)").fetchone()[0]


def test_demo_runs_end_to_end_twice_without_cleanup(bootstrap: str, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    runs = []
    for _ in range(2):
        proc = demo("--no-dashboard", "--bootstrap", bootstrap, "--lake", str(lake))
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        run = re.search(r"run_id = '(demo-[0-9T]+)'", out).group(1)
        runs.append(run)
        assert f"ingest  {LIMIT:,} requests" in out
        for title in ("replay through the twin", "recommendation changes", "result"):
            assert title in out
        assert lake_count(lake, "requests", run) == LIMIT
        assert lake_count(lake, "telemetry", f"{run}-twin") == LIMIT  # one row per accepted request
        assert lake_count(lake, "recommendations", f"{run}-twin") > 0
        time.sleep(1.1)  # run ids have one-second resolution
    assert runs[0] != runs[1]


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_ctrl_c_stops_the_dashboard_and_the_broker_it_started(tmp_path: Path) -> None:
    port, kafka_port = free_port(), free_port()
    proc = demo("--bootstrap", f"127.0.0.1:{kafka_port}", "--lake", str(tmp_path / "lake"), "--port", str(port),
                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the demo's dashboard never answered")
        started = _descendants(proc.pid)
        assert started, "the demo should have child processes (dashboard, broker)"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        proc.wait(timeout=90)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not [p for p in started if _alive(p)], "processes the demo started outlived it"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
        with pytest.raises(OSError):  # the broker (kafka.sh daemonises it, so it is no descendant) is down too
            socket.create_connection(("127.0.0.1", kafka_port), timeout=2).close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
