"""Does the Kafka sweep scale with workers? The same sweep with 1 and with 2 ``adaptwin twin worker`` processes.

    .venv/bin/python -m benchmarks.sweep_scale [--duration 900] [--bootstrap HOST:PORT] [--repeat 1]

Starts a private local broker (unless --bootstrap), then for each worker count: fresh task/result topics (4
partitions), starts the workers and waits until their consumer group is stable, then times ``adaptwin sweep
--kafka`` (publish → last result in the dataset). The same design runs locally with ``--jobs 1`` and ``--jobs 2`` in
the same session as a baseline. Prints runs/s, the 2-vs-1 speed-up and the load average (the machine has 2 cores
and is shared: the speed-up is bounded by the CPU the other processes leave).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

SWEEP = ["--model", "qwen-2.5-7b-instruct,llama-3.1-8b-instruct", "--rates", "0.4,0.2,0.1", "--ranks", "8,16,32"]


def _design() -> list[str]:
    # 2 models × 8 served × 3 max_loras values (<= served): 46 runs of moderate cost
    served = [8, 16, 24, 32, 48, 64, 96, 128]
    slots = [4, 8, 16]
    return SWEEP + ["--served", ",".join(map(str, served)), "--max-loras", ",".join(map(str, slots))]


def _adaptwin(*argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "adaptwin", *argv], env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            **kw)


def _wait_stable(bootstrap: str, group: str, members: int, timeout_s: float = 120.0) -> float:
    """Seconds until ``group`` is Stable with ``members`` members (the workers joined and got partitions)."""
    from adaptwin.kafka import admin_client

    t0 = time.monotonic()
    seen = None
    with admin_client(bootstrap) as admin:
        while time.monotonic() - t0 < timeout_s:
            try:
                g = admin.describe_groups([group])
                g = g.get(group, g) if isinstance(g, dict) else g[0]
                g = g if isinstance(g, dict) else g._asdict()
                seen = (g.get("group_state") or g.get("state"), len(g.get("members") or []))
            except Exception as err:  # noqa: BLE001 -- the group does not exist until the first join
                seen = repr(err)
            if seen == ("Stable", members):
                return time.monotonic() - t0
            time.sleep(0.2)
    raise RuntimeError(f"group {group} did not become stable with {members} members in {timeout_s:.0f} s "
                       f"(last seen: {seen})")


def kafka_sweep(bootstrap: str, workers: int, design: list[str], duration: float, work: Path) -> dict:
    from adaptwin.kafka import ensure_topics

    tag = uuid.uuid4().hex[:8]
    tasks_t, results_t, group = f"bench-sweep-tasks-{tag}", f"bench-sweep-results-{tag}", f"bench-{tag}"
    ensure_topics(bootstrap, {tasks_t: 4, results_t: 4})
    topics = ["--bootstrap", bootstrap, "--tasks-topic", tasks_t, "--results-topic", results_t]
    procs = [_adaptwin("twin", "worker", *topics, "--group", group, "--worker-id", f"{tag}-{i}",
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(workers)]
    try:
        join_s = _wait_stable(bootstrap, group, workers)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "adaptwin", "sweep", "--kafka", "--out", str(work / tag),
                              *topics, *design, "--duration", str(duration), "--json", "--no-progress"],
                             capture_output=True, text=True, check=True)
        wall = time.perf_counter() - t0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return {"workers": workers, "runs": summary["run"], "wall_s": wall, "join_s": join_s}


def local_sweep(jobs: int, design: list[str], duration: float, work: Path) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "adaptwin", "sweep", "--out", str(work / f"local-{jobs}-{time.time()}"),
                          *design, "--duration", str(duration), "--jobs", str(jobs), "--json", "--no-progress"],
                         capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    return {"jobs": jobs, "runs": summary["run"], "wall_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=900.0, help="simulated seconds per run (default 900)")
    ap.add_argument("--bootstrap", default=None, help="use this broker instead of starting a private one")
    ap.add_argument("--repeat", type=int, default=1, help="alternate 1 and 2 workers this many times")
    ap.add_argument("--skip-local", action="store_true")
    args = ap.parse_args(argv)
    design = _design()
    broker = None
    with tempfile.TemporaryDirectory(prefix="sweep-scale-") as tmp:
        work = Path(tmp)
        if args.bootstrap is None:
            from adaptwin.broker import LocalBroker, free_port

            broker = LocalBroker(port=free_port(), controller_port=free_port(), data_dir=work / "kafka",
                                 heap="-Xmx384m").start()
        boot = args.bootstrap or broker.bootstrap
        try:
            rows = []
            for r in range(args.repeat):
                for w in (1, 2):
                    load = os.getloadavg()[0]
                    res = kafka_sweep(boot, w, design, args.duration, work)
                    res["load"] = load
                    rows.append(res)
                    print(f"kafka: {w} worker(s): {res['runs']} runs in {res['wall_s']:.1f} s = "
                          f"{res['runs'] / res['wall_s']:.2f} runs/s (group join {res['join_s']:.1f} s, "
                          f"load average {load:.1f})", flush=True)
            local = []
            if not args.skip_local:
                for j in (1, 2):
                    load = os.getloadavg()[0]
                    res = local_sweep(j, design, args.duration, work)
                    local.append(res)
                    print(f"local: --jobs {j}: {res['runs']} runs in {res['wall_s']:.1f} s = "
                          f"{res['runs'] / res['wall_s']:.2f} runs/s (load average {load:.1f})", flush=True)
        finally:
            if broker is not None:
                broker.stop()
    one = sum(r["wall_s"] for r in rows if r["workers"] == 1)
    two = sum(r["wall_s"] for r in rows if r["workers"] == 2)
    print(f"speed-up with 2 workers: {one / two:.2f}x (target >= 1.6x); load average now "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if local:
        print(f"local --jobs 2 vs 1: {local[0]['wall_s'] / local[1]['wall_s']:.2f}x; kafka 1 worker vs local "
              f"--jobs 1: {local[0]['wall_s'] / (one / args.repeat):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
