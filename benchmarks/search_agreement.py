"""Does the fast search choose what the exhaustive grid chooses? 60 workloads of the paper's ML dataset.

    .venv/bin/python -m benchmarks.search_agreement [--jobs 2] [--per-model 30] [--seed 0]
                                                    [--cache benchmarks/search_exhaustive_cache.json]
                                                    [--build-cache-only] [--rebuild] [--cached-only]
                                                    [--out FILE.json]

A seeded sample of ``--per-model`` workloads per model of ``data/validation/ml_dataset_sim.csv`` (the paper's own
twin's optima). For each: the exhaustive walk on the paper grid (every grid point in order, full 3600-s runs, up to the
first starving point after the leading non-starving run: the rest cannot change the walk's choice) — cached in
``--cache``, a committed file computed once (``--jobs`` processes) and reused; then the fast search
(``search(..., grid=PAPER_GRID)``: bisection + early stop), timed on one core, one workload at a time.

Prints agreement %, seconds per workload (mean, p95, max) and twin runs, and the paper's optimum next to ours: how
many of each starve in our twin (the paper's optimum is a grid point, so the exhaustive cache holds its run).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import random
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from adaptwin.twin.search import PAPER_GRID, Evaluator, Workload, search

DATA = Path(os.environ.get("ADAPTWIN_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
DATASET = DATA / "validation" / "ml_dataset_sim.csv"
CACHE = Path(__file__).with_name("search_exhaustive_cache.json")
DURATION = 3600.0

log = logging.getLogger("benchmarks.search_agreement")


def sample_workloads(path: Path = DATASET, per_model: int = 30, seed: int = 0) -> list[dict]:
    """``per_model`` rows per model, drawn with ``seed`` (sorted by row index for a stable order)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for model in sorted({r["model"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["model"] == model]
        pick = sorted(random.Random(f"{seed}:{model}").sample(idx, per_model))
        for i in pick:
            r = rows[i]
            out.append({"row": i, "model": model, "rates": [float(x) for x in r["rates"].split(";")],
                        "ranks": [int(x) for x in r["sizes"].split(";")],
                        "paper_served": int(r["max_served_adapters"]), "paper_max_loras": int(r["max_adapter_slots"]),
                        "paper_total_throughput": float(r["max_total_throughput"])})
    return out


def key(w: dict) -> str:
    return f"{w['model']}|{';'.join(map(str, w['rates']))}|{';'.join(map(str, w['ranks']))}"


def twin_fingerprint() -> str:
    """What the twin answers on two fixed short runs: a twin whose outcomes changed invalidates the cache (a warning
    says so), a refactor that changes nothing does not."""
    from adaptwin.twin.runner import run_scenario

    h = hashlib.sha256()
    for model, served, g in (("llama-3.1-8b-instruct", 64, 16), ("qwen-2.5-7b-instruct", 96, 32)):
        s = run_scenario(model, (0.4, 0.1, 0.025), (8, 16, 32), served, g, duration=300.0, seed=0, window_s=60.0)
        h.update(json.dumps({k: v for k, v in s.summary().items() if k != "wall_s"}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _exhaustive(w: dict) -> dict:
    wl = Workload(w["model"], tuple(w["rates"]), tuple(w["ranks"]), duration=DURATION)
    ev = Evaluator(wl, early_stop=False)
    t0 = time.perf_counter()
    rec = search(wl, grid=PAPER_GRID, exhaustive=True, evaluator=ev)
    if not ev.cannot_start(w["paper_max_loras"]):  # the paper's optimum in our twin (may lie past our walk)
        ev.exact(w["paper_served"], w["paper_max_loras"])
    return {"key": key(w), "served": rec.best.served, "max_loras": rec.best.max_loras,
            "total_throughput": rec.best.total_throughput, "starved": int(rec.best.starved),
            "all_starve": int(rec.all_starve), "runs": ev.runs, "wall_s": round(time.perf_counter() - t0, 2),
            "points": [[e.served, e.max_loras, round(e.total_throughput, 3), round(e.starvation_ratio, 6)]
                       for e in sorted(ev._results.values(), key=lambda e: (e.max_loras, e.served))]}


class StaleCache(Exception):
    """The cache was computed with a twin that answers differently from the one installed now."""


def load_cache(cache_path: Path, rebuild: bool = False) -> dict:
    """The cache, checked against the installed twin (StaleCache unless ``rebuild``, which starts it afresh)."""
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    fp = twin_fingerprint()
    if cache.get("_twin") not in (None, fp):
        if not rebuild:
            raise StaleCache(f"{cache_path} was computed with another twin (fingerprint {cache.get('_twin')}, the "
                             f"installed one gives {fp}): comparing against it would measure the twin's change, not "
                             "the search; rebuild it with --rebuild (about 40 min with --jobs 2)")
        cache = {}
    cache["_twin"] = fp
    return cache


def build_cache(workloads: list[dict], cache_path: Path, jobs: int, rebuild: bool = False) -> dict:
    cache = load_cache(cache_path, rebuild)
    todo = [w for w in workloads if key(w) not in cache]
    if todo:
        from tqdm import tqdm

        with ProcessPoolExecutor(max_workers=jobs) as pool, tqdm(total=len(todo), desc="exhaustive",
                                                                  unit="workload", file=sys.stderr) as bar:
            futs = [pool.submit(_exhaustive, w) for w in todo]
            for fut in as_completed(futs):
                res = fut.result()
                cache[res["key"]] = res
                tmp = cache_path.with_suffix(".tmp")  # written after each workload: an interrupted build resumes
                tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
                tmp.replace(cache_path)
                bar.update(1)
    return cache


def _fast(w: dict, full_points: dict) -> dict:
    """The fast search, timed (wall and this process's CPU seconds); its early verdicts checked against the
    exhaustive walk's full runs where the cache has the same point."""
    wl = Workload(w["model"], tuple(w["rates"]), tuple(w["ranks"]), duration=DURATION)
    t0, c0 = time.perf_counter(), time.process_time()
    ev = Evaluator(wl)
    rec = search(wl, grid=PAPER_GRID, evaluator=ev)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    checked = wrong = 0
    for (s, g), e in ev._results.items():
        if (s, g) in full_points:
            checked += 1
            wrong += int(e.starved != (full_points[(s, g)][1] >= 0.1))
    return {"served": rec.best.served, "max_loras": rec.best.max_loras, "total_throughput": rec.best.total_throughput,
            "starved": int(rec.best.starved), "runs": ev.runs, "early_stopped": ev.early_stopped,
            "simulated_s": ev.simulated_s, "wall_s": wall, "cpu_s": cpu, "verdicts_checked": checked,
            "verdicts_wrong": wrong}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="processes for building the exhaustive cache")
    ap.add_argument("--per-model", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--build-cache-only", action="store_true")
    ap.add_argument("--rebuild", action="store_true", help="recompute the cache (needed after the twin changed)")
    ap.add_argument("--cached-only", action="store_true", help="only the workloads the cache already holds")
    ap.add_argument("--limit", type=int, default=None, help="time the fast search on the first N workloads only")
    ap.add_argument("--out", type=Path, default=None,
                    help="write the per-workload rows as JSON (and reuse the rows already there)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    workloads = sample_workloads(per_model=args.per_model, seed=args.seed)
    try:
        if args.cached_only:  # compare on what the cache holds so far (while it is being built)
            cache = load_cache(args.cache)
            workloads = [w for w in workloads if key(w) in cache]
        else:
            cache = build_cache(workloads, args.cache, args.jobs, args.rebuild)
    except StaleCache as err:
        print(f"search_agreement: {err}", file=sys.stderr)
        return 2
    if args.build_cache_only:
        print(f"cache: {len(workloads)} workloads in {args.cache}")
        return 0
    from tqdm import tqdm

    load0 = os.getloadavg()
    rows = []
    # --out doubles as a resume file: a workload already timed there (against the same cache entry) is not re-run
    earlier = {key(r): r for r in json.loads(args.out.read_text())} if args.out and args.out.exists() else {}
    for w in tqdm(workloads[: args.limit], desc="search", unit="workload", file=sys.stderr):
        exh = cache[key(w)]
        pts = {(s, g): (thr, ratio) for s, g, thr, ratio in exh["points"]}
        old = earlier.get(key(w))
        if old is not None and old.get("exhaustive_points") == exh["points"]:
            rows.append(old)
            continue
        fast = _fast(w, pts)
        paper = pts.get((w["paper_served"], w["paper_max_loras"]))
        rows.append({**w, "exhaustive": {k: exh[k] for k in ("served", "max_loras", "total_throughput", "starved")},
                     "exhaustive_points": exh["points"],
                     "fast": fast, "agree": (fast["served"], fast["max_loras"]) == (exh["served"], exh["max_loras"]),
                     "paper_in_our_twin": None if paper is None else
                     {"total_throughput": paper[0], "starvation_ratio": paper[1], "starved": int(paper[1] >= 0.1)}})
        if args.out:
            args.out.write_text(json.dumps(rows, indent=1))
    load1 = os.getloadavg()
    report(rows, load0, load1)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


def report(rows: list[dict], load0, load1) -> None:
    n = len(rows)
    wall = np.array([r["fast"]["wall_s"] for r in rows])
    cpu = np.array([r["fast"]["cpu_s"] for r in rows])
    agree = sum(r["agree"] for r in rows)
    print(f"workloads {n}; agreement with the exhaustive grid {agree}/{n} = {100 * agree / n:.1f} %")
    print(f"fast search CPU s/workload (one core): mean {cpu.mean():.2f}, p95 {np.percentile(cpu, 95):.2f}, "
          f"max {cpu.max():.2f}; wall s: mean {wall.mean():.2f}, p95 {np.percentile(wall, 95):.2f}, "
          f"max {wall.max():.2f}; load average {load0[0]:.1f} -> {load1[0]:.1f}")
    exh_runs = [len(r["exhaustive_points"]) for r in rows]
    print(f"twin runs per workload: fast {np.mean([r['fast']['runs'] for r in rows]):.1f} (of which stopped early "
          f"{np.mean([r['fast']['early_stopped'] for r in rows]):.1f}; simulated hours "
          f"{np.mean([r['fast']['simulated_s'] for r in rows]) / 3600:.1f}), exhaustive walk {np.mean(exh_runs):.1f} "
          f"full runs; early verdicts checked against full runs {sum(r['fast']['verdicts_checked'] for r in rows)}, "
          f"wrong {sum(r['fast']['verdicts_wrong'] for r in rows)}")
    for r in rows:
        if not r["agree"]:
            e, f = r["exhaustive"], r["fast"]
            print(f"  differs: {r['model']} {r['rates']} {r['ranks']}: exhaustive {e['served']}/{e['max_loras']} "
                  f"{e['total_throughput']:.0f} tok/s, fast {f['served']}/{f['max_loras']} {f['total_throughput']:.0f}")
    ours_starve = sum(r["exhaustive"]["starved"] for r in rows)
    same = sum((r["paper_served"], r["paper_max_loras"]) == (r["exhaustive"]["served"], r["exhaustive"]["max_loras"])
               for r in rows)
    pin = [r["paper_in_our_twin"] for r in rows]
    unstartable = sum(p is None for p in pin)
    paper_starve = sum(1 for p in pin if p is not None and p["starved"])
    print(f"paper's optimum = ours on {same}/{n}; our optimum starves (in our twin) on {ours_starve}/{n}; the "
          f"paper's optimum starves in our twin on {paper_starve}/{n}, cannot start in our twin on {unstartable}/{n}")
    ratio = [r["exhaustive"]["total_throughput"] / r["paper_total_throughput"] for r in rows]
    print(f"our optimum's throughput / the paper's: median {np.median(ratio):.3f} (min {min(ratio):.3f}, "
          f"max {max(ratio):.3f})")
    print("| model | rates | ranks | paper served/slots tok/s | paper's point in our twin (tok/s, starvation) "
          "| ours exhaustive | fast | CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p, e, f = r["paper_in_our_twin"], r["exhaustive"], r["fast"]
        pp = "cannot start" if p is None else f"{p['total_throughput']:.0f}, {p['starvation_ratio']:.3f}"
        print(f"| {r['model'].split('-')[0]} | {';'.join(map(str, r['rates']))} | {';'.join(map(str, r['ranks']))} "
              f"| {r['paper_served']}/{r['paper_max_loras']} {r['paper_total_throughput']:.0f} | {pp} "
              f"| {e['served']}/{e['max_loras']} {e['total_throughput']:.0f}{' S' if e['starved'] else ''} "
              f"| {f['served']}/{f['max_loras']}{'' if r['agree'] else ' ≠'} | {f['cpu_s']:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
