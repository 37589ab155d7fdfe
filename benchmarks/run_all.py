"""Run the benchmarks one after the other and summarise (``make bench``).

    python -m benchmarks.run_all [--all] [--only NAME,NAME]

By default the quick set (each a few minutes at most, 8 min in all on this 2-core machine); ``--all`` adds the
long ones (the twin's fidelity and seed noise, the learner's evaluation, the 10 M-row lake, the reliability loops:
hours). Each runs as ``python -m benchmarks.NAME`` with its defaults and prints its own numbers; the tables that
go into RESULTS.md are made from those outputs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

QUICK = ["twin_speed", "replay_e2e", "vllm_backend", "ttft_breakdown", "ingest_sink", "learner_stream",
         "search_agreement", "lake_compact"]
LONG = ["learner_policy", "learner_eval", "twin_fidelity", "twin_seed_noise", "lake_query", "dashboard_render",
        "sweep_scale", "reliability"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--all", action="store_true", help="the long benchmarks too")
    ap.add_argument("--only", default=None, help="comma-separated benchmark names")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else QUICK + (LONG if args.all else [])
    unknown = sorted(set(names) - set(QUICK + LONG))
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(QUICK + LONG)}")
    results = []
    for i, name in enumerate(names, 1):
        print(f"\n=== [{i}/{len(names)}] benchmarks.{name}", flush=True)
        t = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.{name}"])
        results.append((name, rc, time.perf_counter() - t))
    print("\n| benchmark | exit | wall s |\n|---|---|---|")
    for name, rc, wall in results:
        print(f"| {name} | {rc} | {wall:.0f} |")
    return 1 if any(rc for _, rc, _ in results) else 0


if __name__ == "__main__":
    sys.exit(main())
