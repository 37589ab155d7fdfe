"""Twin speed benchmark: requests/s and simulated seconds per wall second for a fixed scenario set (one core).

    .venv/bin/python -m benchmarks.twin_speed [--quick] [--json]

Each scenario is one simulated hour of the paper's workload (seed 0, shipped length table); the workload is built
before the clock starts, so the time is the simulator's alone. Wall and CPU time are both printed, with the load
average: on a shared machine the CPU time is the figure to compare with the one-core target. ``peak MB`` is the
process's peak RSS so far (the last scenario holds about 1.3 M requests).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

SCENARIOS = [
    # name, model, rates, ranks, served, max_loras, target speed-up
    ("saturated", "llama-3.1-8b-instruct", [3.2, 1.6, 0.8], [8, 8, 8], 16, 16, 1_000),
    ("light", "llama-3.1-8b-instruct", [0.1, 0.05, 0.025], [8, 16], 64, 32, 10_000),
    ("light-qwen", "qwen-2.5-7b-instruct", [0.1, 0.05, 0.025], [8, 16, 32], 32, 16, 10_000),
    ("overloaded", "llama-3.1-8b-instruct", [0.8, 0.4, 0.1], [8, 8, 8], 64, 32, 1_000),
    ("table1-heavy", "llama-3.1-8b-instruct", [1.6, 0.8, 0.4], [8, 16], 384, 8, 1_000),
]


def run(name, model, rates, ranks, served, max_loras, target, duration=3600.0):
    from adaptwin.twin import ServerConfig, paper_workload, simulate
    from adaptwin.twin.lengths import load_lengths

    arr, adapter_ranks = paper_workload(rates, ranks, served, duration, 0, load_lengths(model))
    cfg = ServerConfig(model=model, served=served, max_loras=max_loras, adapter_ranks=adapter_ranks)
    t0, c0 = time.perf_counter(), time.process_time()
    res = simulate(cfg, arr, duration)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    s = res.summary()
    return {"scenario": name, "model": model, "rates": rates, "served": served, "max_loras": max_loras,
            "requests": len(arr), "finished": s["finished"], "steps": res.steps, "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3), "requests_per_s": round(len(arr) / wall), "speedup": round(duration / wall),
            "cpu_speedup": round(duration / max(cpu, 1e-9)), "target_speedup": target,
            "meets_target": duration / wall >= target,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the saturated scenario")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    load = os.getloadavg()
    rows = [run(*sc) for sc in (SCENARIOS[:1] if args.quick else SCENARIOS)]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        print(json.dumps({"load_avg": load, "peak_rss_mb": peak_mb, "rows": rows}))
        return 0
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}   cores: {os.cpu_count()}")
    print(f"{'scenario':14s} {'requests':>9s} {'wall s':>8s} {'cpu s':>7s} {'req/s':>9s} {'sim s/wall s':>12s} "
          f"{'sim s/cpu s':>11s} {'target':>7s} {'peak MB':>8s}")
    for r in rows:
        print(f"{r['scenario']:14s} {r['requests']:9d} {r['wall_s']:8.2f} {r['cpu_s']:7.2f} {r['requests_per_s']:9d} "
              f"{r['speedup']:12d} {r['cpu_speedup']:11d} {r['target_speedup']:7d} {r['peak_rss_mb']:8d} "
              f"{'ok' if r['meets_target'] else 'MISS (wall)'}")
    print(f"peak RSS {peak_mb:.0f} MB; load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
