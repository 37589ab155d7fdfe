"""Streaming learner benchmark: predict and learn time per window (issue 7 targets: predict ≤ 0.3 ms, learn ≤ 1 ms
on one core), and the policy's time per window.

    .venv/bin/python -m benchmarks.learner_stream [--seeds 3] [--warm-rows 2000] [--json]

Windows: real twin replays (served 32, max_loras 16, 60 s windows) of 30-minute traces whose traffic shifts halfway
(tests/learner/streamdata.py), one trace per seed. The process is pinned to one core and every time is the thread's
CPU time (``time.thread_time``), so other processes on the shared machine do not inflate it; the policy's wall time
is reported too. Measured, per window:

* per candidate model (warm-started from ``ml_train_sim.csv.gz``): ``predict_one`` and ``learn_one`` of the observed
  window (the model part of the stream);
* the stream as ``adaptwin learn`` runs it (:class:`StreamLearner.process`): predict with the chosen model, learn
  with every candidate (prequential scoring included), and the policy (45 candidate configurations scored, what-if
  twin runs when unsure) — with and without the twin;
* a baseline in the same run: a bare river ``LinearRegression`` predicting and learning the same feature dicts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ADAPTWIN_SHARED", ROOT.parent / "shared"))
WARM = SHARED / "data" / "validation" / "ml_train_sim.csv.gz"


def _windows(seeds: int) -> list[list[dict]]:
    sys.path.insert(0, str(ROOT / "tests" / "learner"))
    from streamdata import replay_windows, shift_trace

    out = []
    with tempfile.TemporaryDirectory() as d:
        for seed in range(seeds):
            trace = shift_trace(Path(d) / f"t{seed}.csv", rate=0.09, seed=seed)
            out.append([w for w in replay_windows(trace, 32, 16, run_id=f"bench-{seed}") if w["scope"] == "window"])
    return out


def _ms(total_s: float, n: int) -> float:
    return 1e3 * total_s / max(1, n)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--warm-rows", type=int, default=2000)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

    from river import linear_model, preprocessing

    from adaptwin.learner.dataset import read_runs
    from adaptwin.learner.features import features
    from adaptwin.learner.models import CANDIDATES, ThroughputLearner, make_regressor
    from adaptwin.learner.online import STREAM_CANDIDATES, warm_runs
    from adaptwin.learner.policy import twin_what_if
    from adaptwin.learner.stream import StreamConfig, StreamLearner, Timings
    from adaptwin.learner.workload import observed

    t0 = time.perf_counter()
    streams = _windows(args.seeds)
    replay_s = time.perf_counter() - t0
    warm = warm_runs(read_runs(str(WARM)), "llama-3.1-8b-instruct", args.warm_rows)
    obs = [o for ws in streams for o in (observed(w, "llama-3.1-8b-instruct", (8, 16)) for w in ws) if o]
    xs = [(features(o.scenario), o) for o in obs]
    report: dict = {"windows": len(xs), "warm_rows": len(warm), "replay_s": round(replay_s, 2),
                    "load_avg": os.getloadavg()[0], "candidates": {}}

    # baseline: the cheapest river regressor on the same feature dicts
    base = preprocessing.StandardScaler() | linear_model.LinearRegression()
    clock = time.thread_time
    tp = tl = 0.0
    for x, o in xs:
        a = clock(); base.predict_one(x); b = clock()
        base.learn_one(x, o.throughput); c = clock()
        tp += b - a; tl += c - b
    report["baseline_river_linear"] = {"predict_ms": _ms(tp, len(xs)), "learn_ms": _ms(tl, len(xs))}

    for name in CANDIDATES:
        lrn = ThroughputLearner(make_regressor(name, 0), None)
        for r in warm:
            lrn.warm_one(features(r.scenario), r.throughput, r.starved)
        tp = tl = 0.0
        for x, o in xs:
            a = clock(); lrn.predict_one(x); b = clock()
            lrn.learn_one(x, o.throughput, o.starved); c = clock()
            tp += b - a; tl += c - b
        report["candidates"][name] = {"predict_ms": _ms(tp, len(xs)), "learn_ms": _ms(tl, len(xs))}

    for label, ask in (("stream_no_twin", None), ("stream_with_twin", twin_what_if)):
        timings, decide_ms, wall = Timings(clock=clock), [], 0.0
        for i, ws in enumerate(streams):
            sl = StreamLearner(StreamConfig(ranks=(8, 16), run_id=f"bench-{i}"))
            sl.warm(warm, "ml")
            for w in ws:
                before = timings.decide_s
                a = time.perf_counter()
                sl.process(w, (lambda wl, s, m, d: ask(wl, s, m, d)) if ask else None, timings)
                wall += time.perf_counter() - a
                decide_ms.append(1e3 * (timings.decide_s - before))
        s = timings.summary()
        s.update({"window_wall_ms": 1e3 * wall / max(1, timings.windows), "decide_p50_ms": statistics.median(decide_ms),
                  "decide_max_ms": max(decide_ms), "candidates": list(STREAM_CANDIDATES)})
        report[label] = s
    base_p = report["baseline_river_linear"]["predict_ms"]
    base_l = report["baseline_river_linear"]["learn_ms"]
    st = report["stream_no_twin"]
    report["ratios_vs_baseline"] = {"stream_predict": st["predict_ms"] / base_p,
                                    "stream_learn": st["learn_ms"] / base_l}
    report["targets"] = {"predict_ms<=0.3": st["predict_ms"] <= 0.3, "learn_ms<=1": st["learn_ms"] <= 1.0}

    if args.json:
        print(json.dumps(report, separators=(",", ":")))
    else:
        print(f"{report['windows']} windows ({args.seeds} replays, {report['replay_s']} s), warm {len(warm)} rows, "
              f"load average {report['load_avg']:.1f}, one core")
        print(f"{'what (CPU time per window)':28s} {'predict ms':>11s} {'learn ms':>9s}")
        print(f"{'baseline river linear':28s} {base_p:11.3f} {base_l:9.3f}")
        for name, r in report["candidates"].items():
            print(f"{'candidate ' + name:28s} {r['predict_ms']:11.3f} {r['learn_ms']:9.3f}")
        for label in ("stream_no_twin", "stream_with_twin"):
            r = report[label]
            print(f"{label:28s} {r['predict_ms']:11.3f} {r['learn_ms']:9.3f}   decide p50 {r['decide_p50_ms']:.1f} ms, "
                  f"max {r['decide_max_ms']:.1f} ms (CPU), whole window {r['window_wall_ms']:.1f} ms (wall)")
        print(f"ratios vs baseline: predict {report['ratios_vs_baseline']['stream_predict']:.1f}x, "
              f"learn {report['ratios_vs_baseline']['stream_learn']:.1f}x; targets {report['targets']}")
    return report


if __name__ == "__main__":
    main()
