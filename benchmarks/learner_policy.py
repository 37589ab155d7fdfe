"""Quality of the streaming learner's recommendations (issue 7): stability, twin agreement, distance to the optimum.

    .venv/bin/python -m benchmarks.learner_policy [--json]

Streams (real twin replays, 60 s windows, run in-process as `adaptwin demo` runs them through Kafka):

* ``demo``: what `adaptwin demo --limit 6000` replays — azure-conv, 64 adapters, zipf:1.1 popularity, ranks 8/16/32,
  served 64 / max_loras 16 (21 windows);
* ``shift``: tests/learner/streamdata.shift_trace — 24 adapters, rates ×2, 8 new adapters and reversed skew at 15 min
  (served 32 / max_loras 16, 30 windows).

Variants, all in the same run: ``model_only`` (no twin: warm start from 2,000 sweep rows, the model decides once it
has learned 5 windows), ``twin_questions`` (the twin asked ≤ 2 configurations per window, no boundary search: the
policy as it was, with the twin's answers now kept per workload signature), ``full`` (``--warm-start twin
--twin-budget 20`` as the demo passes it: a starvation-boundary search, then per-window questions).

Per variant: recommendation changes after the first, windows whose recommendation the twin (600 s what-if on that
window's recent traffic) finds starving, and the regret of the final recommendation against the best non-starving
grid configuration on the last 3 windows' traffic (all 45 grid points run by the twin). Twin runs are counted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

MODEL = "llama-3.1-8b-instruct"
ROOT = Path(__file__).resolve().parents[1]


def _replay(source_cfg, served: int, max_loras: int, ranks: tuple[int, ...], run_id: str) -> list[dict]:
    from adaptwin.replay.backends.twin import TwinBackend
    from adaptwin.replay.engine import Replay, ReplayOptions
    from adaptwin.replay.source import FileSource
    from adaptwin.replay.telemetry import MemoryEmitter
    from adaptwin.twin.profile import load_profile

    emitter = MemoryEmitter()
    options = ReplayOptions(run_id=run_id, served=served, max_loras=max_loras, model=MODEL, ranks=ranks,
                            window_s=60.0, discover_s=0.0, source_name=str(source_cfg.trace))
    source = FileSource(source_cfg)
    try:
        Replay(options, source, TwinBackend(profile=load_profile(MODEL), window_s=60.0), emitter,
               progress=False).run()
    finally:
        source.close()
    return [w for w in emitter.windows if w["scope"] == "window"]


def streams() -> dict[str, tuple[list[dict], tuple[int, ...]]]:
    from adaptwin.ingest.source import IngestConfig

    sys.path.insert(0, str(ROOT / "tests" / "learner"))
    from streamdata import shift_trace  # noqa: E402

    demo = IngestConfig(trace="azure-conv", adapters=64, popularity="zipf:1.1", ranks=(8, 16, 32), seed=0,
                        run_id="bench-demo", max_rows=6000)
    out = {"demo": (_replay(demo, 64, 16, (8, 16, 32), "bench-demo"), (8, 16, 32))}
    with tempfile.TemporaryDirectory() as tmp:
        trace = shift_trace(Path(tmp) / "shift.csv", rate=0.09, shift_s=900.0)
        shift = IngestConfig(trace=str(trace), format="csv", ranks=(8, 16), run_id="bench-shift")
        out["shift"] = (_replay(shift, 32, 16, (8, 16), "bench-shift"), (8, 16))
    return out


def run_variant(windows: list[dict], ranks: tuple[int, ...], variant: str, warm: list) -> dict:
    from adaptwin.learner.policy import PolicyConfig, twin_what_if
    from adaptwin.learner.stream import StreamConfig, StreamLearner
    from adaptwin.learner.workload import Workload

    calls = [0]

    def ask(wl, s, m, d):
        calls[0] += 1
        return twin_what_if(wl, s, m, d)

    explore = 5.0 if variant == "full" else 0.0
    sl = StreamLearner(StreamConfig(ranks=ranks, policy=PolicyConfig(explore_budget_s=explore)))
    sl.warm(warm, "ml")
    if variant == "full":
        sl.twin_warm_pending = 20.0
    t0 = time.perf_counter()
    recs = [r for w in windows for r in sl.process(w, ask if variant != "model_only" else None)
            if r["kind"] == "recommendation"]
    wall = time.perf_counter() - t0
    configs = [(r["served"], r["max_loras"]) for r in recs]
    # ground truth per window: the twin on that window's recent traffic (the learner's own 3-window memory)
    starving = 0
    for i, cfg in enumerate(configs):
        wl = Workload.from_windows(windows[max(0, i - 2): i + 1], MODEL, ranks)
        answer = twin_what_if(wl, *cfg, 600.0)
        starving += answer is None or answer[1]
    wl = Workload.from_windows(windows[-4:-1], MODEL, ranks)  # the last full windows (the final one is partial)
    grid = {c: twin_what_if(wl, *c, 600.0) for c in PolicyConfig().candidates()}
    ok = {c: a[0] for c, a in grid.items() if a is not None and not a[1]}
    best = max(ok.values()) if ok else 0.0
    final = grid.get(configs[-2]) if len(configs) > 1 else None  # the recommendation standing before the tail
    regret = (100.0 * (best - final[0]) / best if final and not final[1] and best else None)
    return {"windows": len(windows), "changes": sum(a != b for a, b in zip(configs, configs[1:])),
            "first": list(configs[0]), "final": list(configs[-2]) if len(configs) > 1 else None,
            "windows_recommending_a_starving_config": starving, "final_regret_pct": regret,
            "twin_optimum": list(max(ok, key=ok.get)) if ok else None, "twin_asks": calls[0],
            "warm_twin_runs": sl.model.n_warm - len(warm), "wall_s": round(wall, 2)}


def main(argv=None) -> dict:
    from adaptwin.learner.dataset import read_runs
    from adaptwin.learner.online import warm_runs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    shared = Path(os.environ.get("ADAPTWIN_SHARED", "/work/shared"))
    warm = warm_runs(read_runs(str(shared / "data" / "validation" / "ml_train_sim.csv.gz")), MODEL, 2000)
    report: dict = {"load_avg_before": os.getloadavg()[0]}
    for name, (windows, ranks) in streams().items():
        report[name] = {v: run_variant(windows, ranks, v, warm) for v in ("model_only", "twin_questions", "full")}
    report["load_avg_after"] = os.getloadavg()[0]
    if args.json:
        print(json.dumps(report, separators=(",", ":")))
        return report
    for name in ("demo", "shift"):
        print(f"== {name}")
        for v, r in report[name].items():
            print(f"  {v:15s} changes {r['changes']:2d}  first {r['first']}  final {r['final']}  windows recommending "
                  f"a starving config {r['windows_recommending_a_starving_config']:2d}/{r['windows']}  final regret "
                  f"{r['final_regret_pct'] if r['final_regret_pct'] is None else round(r['final_regret_pct'], 2)} % "
                  f"(optimum {r['twin_optimum']})  twin asks {r['twin_asks']}  {r['wall_s']} s")
    print(f"load average {report['load_avg_before']:.1f} → {report['load_avg_after']:.1f}")
    return report


if __name__ == "__main__":
    main()
