"""Learner benchmark: the two prequential targets of issue 7, on the shared validation files.

    .venv/bin/python -m benchmarks.learner_eval [--grid-rows 3000] [--warm-rows 6000] [--models ...]
                                                [--twin-feature [calibration|lowo]] [--twin-budget 3600]
                                                [--jobs 2] [--seed 0]
                                                [--json]

1. *twin grid*: ``ml_train_sim.csv.gz`` (the paper's twin on its ML grid), shuffled (``--seed``, default 0), first
   ``--grid-rows`` rows, cold start.
2. *real runs*: ``scenarios_table1.csv`` shuffled (``--seed``), warm-started from ``ml_train_sim.csv.gz``
   (``--warm-rows``: same-workload rows first, then a random sample), plus the paper twin's own replays of those runs
   (``twin_validation_sim.csv``, lengths rescaled to the real pool, as in docs/learner.md) as "the twin alone".
   Note the paper twin's replays read the real run's arrivals and its observed queue cap (paper-digest §5), so they
   are a reference, never a feature.
3. with ``--twin-feature``: the real runs again, each row also carrying *our* twin's throughput for that scenario
   (``twin_gap``), simulated from the inputs with profiles fitted from ``data/calibration`` alone (no term fitted on
   the real runs). The 294 simulations are cached in ``benchmarks/learner_twin_calibration.jsonl`` (made with the
   twin of 2026-11-26; delete the file to re-simulate with today's twin: ≈ 22 min on 2 busy cores,
   ``--twin-budget`` bounds it). ``--twin-feature lowo``: our twin with the LoRA terms fitted on the real runs of
   the model's *other three* workloads (``benchmarks/twin_fidelity.py --fit``'s leave-one-workload-out rows, shipped
   as ``benchmarks/learner_twin_lowo.csv``): a twin calibrated on past traffic, meeting a workload it never saw.

Fixed seeds; wall time and the load average are recorded with the numbers (the machine is shared).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import time
from pathlib import Path

DATA = Path(os.environ.get("ADAPTWIN_SHARED", "/work/shared")) / "data" / "validation"
CALIBRATION = DATA.parent / "calibration"
TWIN_CACHE = Path(__file__).with_name("learner_twin_calibration.jsonl")
TWIN_LOWO = Path(__file__).with_name("learner_twin_lowo.csv")


def lowo_twin(real) -> dict:
    """Our twin's throughput per real run, each simulated with LoRA terms fitted on the *other three* workloads of its
    model (``twin_fidelity --fit``'s LOWO rows, copied to ``TWIN_LOWO``): a twin calibrated on past workloads,
    meeting a new one. ``real`` in file order (the rows are matched one to one, and checked)."""
    with open(TWIN_LOWO, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if len(rows) != len(real):
        raise SystemExit(f"{TWIN_LOWO} has {len(rows)} rows for {len(real)} real runs: rebuild it")
    twin = {}
    for r, row in zip(real, rows):
        s = r.scenario
        if (s.model, s.served, s.max_loras, s.max_lora_rank) != (row["model"], int(row["served_adapters"]),
                                                                  int(row["max_loras"]), int(row["max_lora_rank"])):
            raise SystemExit(f"{TWIN_LOWO} does not match scenarios_table1.csv row by row: rebuild it")
        twin[s] = float(row["sim_total_throughput"])
    return twin


def paper_twin_alone(order) -> dict:
    """half sMAPE of the paper twin's replays vs the real runs, raw and rescaled by the length means (420/462)."""
    from adaptwin.learner.metrics import half_smape_term

    sim = {}
    with open(DATA / "twin_validation_sim.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            key = (row["model"], row["rates"], int(row["max_lora_rank"]), int(row["max_loras"]),
                   int(row["max_cpu_loras"]))
            sim[key] = float(row["sim_total_throughput"])
    with open(DATA / "scenarios_table1.csv", newline="") as fh:
        real = list(csv.DictReader(fh))
    rows = [real[i] for i in order]
    pairs = [(float(r["total_throughput"]), sim[(r["model"], r["rates"], int(r["max_lora_rank"]),
                                                 int(r["max_loras"]), int(r["served_adapters"]))]) for r in rows]
    scale = {"llama-3.1-8b-instruct": 419.97 / 462.23, "qwen-2.5-7b-instruct": 422.47 / 467.0}
    resc = [(y, p * scale[r["model"]]) for (y, p), r in zip(pairs, rows)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"paper_twin_half_smape": round(mean([half_smape_term(y, p) for y, p in pairs]), 3),
            "paper_twin_rescaled_half_smape": round(mean([half_smape_term(y, p) for y, p in resc]), 3),
            "paper_twin_rescaled_half_smape_after_50": round(mean([half_smape_term(y, p) for y, p in resc[50:]]), 3)}


def speed_alone(name: str, runs, twin=None) -> dict:
    """CPU time per predict / learn of one candidate (with its starvation classifier) running alone, cold, over
    ``runs``: what one window costs the streaming learner, without the other candidates in the cache."""
    from adaptwin.learner.features import features
    from adaptwin.learner.models import ThroughputLearner, make_classifier, make_regressor

    learner = ThroughputLearner(make_regressor(name), make_classifier(0))
    xs = [features(r.scenario, (twin or {}).get(r.scenario)) for r in runs]
    t_pred = t_learn = 0.0
    for x, r in zip(xs, runs):
        t0 = time.thread_time()
        learner.predict_one(x)
        t1 = time.thread_time()
        learner.learn_one(x, r.throughput, r.starved)
        t_learn += time.thread_time() - t1
        t_pred += t1 - t0
    return {"model": name, "rows": len(runs), "predict_ms": round(1000 * t_pred / len(runs), 4),
            "learn_ms": round(1000 * t_learn / len(runs), 4)}


def main(argv=None) -> int:
    from adaptwin.learner.dataset import read_runs
    from adaptwin.learner.models import CANDIDATES
    from adaptwin.learner.prequential import evaluate
    from adaptwin.learner.warmstart import select_warm_runs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid-rows", type=int, default=3000)
    ap.add_argument("--warm-rows", type=int, default=6000)
    ap.add_argument("--models", default=",".join(CANDIDATES))
    ap.add_argument("--twin-feature", nargs="?", const="calibration", choices=("calibration", "lowo"),
                    help="also evaluate the real runs with our twin's prediction per scenario as a feature: the "
                         "twin with profiles from data/calibration only (default), or with LoRA terms fitted on "
                         "the model's other workloads (lowo)")
    ap.add_argument("--twin-budget", type=float, default=3600.0, help="seconds for simulations not in the cache")
    ap.add_argument("--jobs", type=int, default=2, help="processes for the simulations")
    ap.add_argument("--seed", type=int, default=0,
                    help="shuffle seed of the real runs' order and of the grid rows (the warm sample stays seed 0)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    models = args.models.split(",")
    out = {"load_avg_before": os.getloadavg(), "seed": args.seed}

    t0 = time.perf_counter()
    grid = read_runs(DATA / "ml_train_sim.csv.gz")
    shuffled = list(grid)
    random.Random(args.seed).shuffle(shuffled)
    out["twin_grid"] = evaluate(shuffled[: args.grid_rows], candidates=models)
    out["twin_grid"]["wall_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    real = read_runs(DATA / "scenarios_table1.csv")
    twin_lowo = lowo_twin(real) if args.twin_feature == "lowo" else None
    order = list(range(len(real)))
    random.Random(args.seed).shuffle(order)
    real = [real[i] for i in order]
    warm = select_warm_runs(grid, real, args.warm_rows, seed=0)
    out["real"] = evaluate(real, warm, candidates=models, warm_label="ml_train_sim.csv.gz")
    out["real"]["wall_s"] = round(time.perf_counter() - t0, 1)
    out["real"].update(paper_twin_alone(order))
    if args.twin_feature:
        from adaptwin.learner.warmstart import twin_predictions

        t0 = time.perf_counter()
        if twin_lowo is not None:
            twin, label = twin_lowo, "adaptwin twin, LoRA terms fitted on the model's other workloads (LOWO)"
        else:
            twin = twin_predictions(real, budget_s=args.twin_budget, jobs=args.jobs, cache=TWIN_CACHE,
                                    calibration=CALIBRATION)
            label = "adaptwin twin, profiles from data/calibration only"
        out["real_twin"] = evaluate(real, warm, candidates=models, warm_label="ml_train_sim.csv.gz", twin=twin,
                                    twin_label=label)
        out["real_twin"]["wall_s"] = round(time.perf_counter() - t0, 1)
    out["speed_alone_grid"] = [speed_alone(m, shuffled[: args.grid_rows]) for m in models if m.startswith("capacity")]
    out["load_avg_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(out))
        return 0
    for part in ("twin_grid", "real", "real_twin"):
        if part not in out:
            continue
        rep = out[part]
        print(f"== {part}: chosen {rep['model']}, {rep['rows']} rows, warm {rep['warm_rows']}, {rep['wall_s']} s")
        for name, c in rep["candidates"].items():
            print(f"  {name:10s} half-sMAPE {c['throughput_half_smape']:6.2f} %  after-50 "
                  f"{c.get('half_smape_after_50', float('nan')):6.2f}  warm-alone "
                  f"{c.get('prior_half_smape_after_50', float('nan')):6.2f}  F1 {c['starvation_f1']:.4f} online "
                  f"({c['starvation_method'][8:]}; twin {c['starvation_f1_twin']:.4f}, derived "
                  f"{c['starvation_f1_derived']:.4f}, best after the fact {c['starvation_f1_best_after_fact']:.4f})"
                  f"  cover {c.get('interval_coverage', 0):.3f}  regret "
                  f"{c.get('config_regret_pct_mean', float('nan')):.2f}/{c.get('config_regret_pct_max', float('nan')):.2f} %"
                  f"  predict {c['predict_ms']:.3f} ms  learn {c['learn_ms']:.3f} ms")
    print({k: v for k, v in out["real"].items() if k.startswith("paper_twin")})
    if "real_twin" in out:
        print({k: v for k, v in out["real_twin"].items() if k.startswith("twin_")})
    for sp in out["speed_alone_grid"]:
        print(f"alone on the grid: {sp}")
    print(f"load average before {out['load_avg_before']}, after {out['load_avg_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
