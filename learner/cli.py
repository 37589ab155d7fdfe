"""``adaptwin learn``: the online learner's commands (DESIGN.md §CLI contract).

``adaptwin learn evaluate --dataset FILE.csv [--warm-start twin|FILE ...] --json`` scores the learner
prequentially on a scenario CSV. The streaming consumer (``adaptwin learn`` over ``adaptwin.windows``) will be
added as another subcommand of the same group. Heavy modules (river, the twin) are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import logging

from adaptwin.cliutil import UserError, print_json

log = logging.getLogger("adaptwin.learner")


def register(sub, twin) -> None:
    learn = sub.add_parser("learn", help="online learner: river models of throughput and starvation")
    lsub = learn.add_subparsers(dest="learn_command", required=True, metavar="LEARN_COMMAND")
    ev = lsub.add_parser("evaluate", help="prequential evaluation (predict, then learn, row by row) on a scenario CSV",
                         description="Prequential evaluation on a scenario CSV (inputs model, rates, ranks, "
                                     "served_adapters, max_loras, max_lora_rank, duration_s; outcomes "
                                     "total_throughput, starved), in file order unless --shuffle is given.")
    ev.add_argument("--dataset", required=True, help="scenario CSV (or an ML-grid sweep file), .gz allowed")
    ev.add_argument("--warm-start", action="append", default=[], metavar="twin|FILE",
                    help="pre-train on twin runs generated now on the paper's grid ('twin') or on a sweep file "
                         "(e.g. ml_train_sim.csv.gz); may be repeated")
    ev.add_argument("--warm-rows", type=int, default=6000,
                    help="most rows taken from a warm-start file: same-workload rows first, then a random sample "
                         "(default 6000)")
    ev.add_argument("--twin-budget", type=float, default=300.0,
                    help="wall seconds for generating twin runs with --warm-start twin (default 300; cached runs free)")
    ev.add_argument("--twin-cache", default=None, help="cache of generated twin runs (default .cache/learner/...)")
    ev.add_argument("--jobs", type=int, default=1, help="processes for generating twin runs (default 1)")
    ev.add_argument("--models", default=None,
                    help="comma-separated candidate regressors (default all: linear,hoeffding,arf,bagging)")
    ev.add_argument("--shuffle", type=int, default=None, metavar="SEED", help="shuffle the rows with SEED first")
    ev.add_argument("--limit", type=int, default=None, help="only the first N rows (after --shuffle)")
    ev.add_argument("--alpha", type=float, default=0.1, help="miss rate of the conformal interval (default 0.1)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true", help="print one JSON line (the last line of stdout)")
    ev.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> int:
    import random

    from adaptwin.learner.dataset import DatasetError, read_runs
    from adaptwin.learner.models import CANDIDATES
    from adaptwin.learner.prequential import evaluate
    from adaptwin.learner.warmstart import default_cache, select_warm_runs, twin_warm_runs

    models = [m.strip() for m in args.models.split(",")] if args.models else list(CANDIDATES)
    unknown = [m for m in models if m not in CANDIDATES]
    if unknown:
        raise UserError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}")
    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha must be in (0, 1), got {args.alpha}")
    try:
        runs = read_runs(args.dataset)
        if args.shuffle is not None:
            random.Random(args.shuffle).shuffle(runs)
        if args.limit is not None:
            runs = runs[: args.limit]
        if not runs:
            raise UserError(f"dataset {args.dataset} has no rows")
        warm = []
        for source in args.warm_start:
            if source == "twin":
                try:
                    warm += twin_warm_runs(runs, budget_s=args.twin_budget, jobs=args.jobs, seed=args.seed,
                                           cache=args.twin_cache or default_cache())
                except ImportError as err:
                    raise UserError(f"--warm-start twin needs the twin (adaptwin.twin): {err}") from None
            else:
                warm += select_warm_runs(read_runs(source), runs, args.warm_rows, seed=args.seed)
        if len(args.warm_start) > 1:
            random.Random(args.seed).shuffle(warm)
        report = evaluate(runs, warm, models, seed=args.seed, alpha=args.alpha,
                          warm_label=",".join(args.warm_start) or None)
    except DatasetError as err:
        raise UserError(str(err)) from None
    except ValueError as err:
        raise UserError(str(err)) from None
    if args.json:
        print_json(report)
    else:
        for key, value in report.items():
            if key != "candidates":
                print(f"{key:28s} {value}")
        for name, rep in report["candidates"].items():
            print(f"  {name:10s} half-sMAPE {rep['throughput_half_smape']:.2f} %  F1 {rep['starvation_f1']:.3f}  "
                  f"predict {rep['predict_ms']:.3f} ms  learn {rep['learn_ms']:.3f} ms")
    return 0
