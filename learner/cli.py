"""``adaptwin learn``: the online learner's commands (DESIGN.md §CLI contract).

``adaptwin learn [run] [options]`` is the streaming learner: it consumes ``adaptwin.windows`` and publishes to
``adaptwin.recommendations`` (docs/learner.md §Streaming); ``run`` may be omitted. ``adaptwin learn evaluate
--dataset FILE.csv [--warm-start twin|FILE ...] --json`` scores the learner prequentially on a scenario CSV.
Heavy modules (river, the twin, Kafka) are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import logging

from adaptwin.cliutil import UserError, add_kafka_args, int_list, print_json

log = logging.getLogger("adaptwin.learner")


_STREAM_DESCRIPTION = (
    "Streaming learner: consume WINDOW records from adaptwin.windows (written by `adaptwin replay`), learn "
    "throughput (with a conformal interval) and starvation online with several river models (the one with the lowest "
    "recent prequential error answers), detect drift, and after each window publish the recommended (served, "
    "max_loras) to adaptwin.recommendations. Exactly once across kills: records and consumed offsets commit in one "
    "Kafka transaction, the model is checkpointed in --checkpoint DIR. `adaptwin learn` and `adaptwin learn run` "
    "are the same command; `adaptwin learn evaluate` scores the models offline on a scenario CSV.")


def _add_stream_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("stream")
    add_kafka_args(src)
    src.add_argument("--group", default=None,
                     help="consumer group of the committed offsets and the transactional id's suffix, one per "
                          "learner configuration (default adaptwin-learner, or adaptwin-learner-<RUN> with "
                          "--run-id-in)")
    src.add_argument("--run-id-in", default=None, metavar="RUN",
                     help="learn only the windows of this replay run (default: every run in the topic)")
    src.add_argument("--run-id", default=None, metavar="ID",
                     help="run_id written on the recommendations (default: the windows' own replay run id, which "
                          "the dashboard joins them to)")
    src.add_argument("--checkpoint", default=None, metavar="DIR",
                     help="checkpoint directory (default $ADAPTWIN_CACHE or .cache, then learner/<group>); a restart "
                          "resumes from it")
    src.add_argument("--checkpoint-every", type=int, default=10, metavar="N", help="windows between checkpoints")
    src.add_argument("--max-windows", type=int, default=None, metavar="N",
                     help="exit once N windows are learned (counted over restarts)")
    src.add_argument("--idle-exit", type=float, default=None, metavar="S", help="exit after S seconds without records")
    src.add_argument("--until-run-end", action="store_true",
                     help="with --run-id-in: exit after that run's final (scope=run) record")
    src.add_argument("--windows-topic", default=None, help="default adaptwin.windows")
    src.add_argument("--recommendations-topic", default=None, help="default adaptwin.recommendations")
    src.add_argument("--deadletter-topic", default=None, help="default adaptwin.deadletter")
    mod = p.add_argument_group("models")
    mod.add_argument("--model", default="llama-3.1-8b-instruct",
                     help="the served base model (default llama-3.1-8b-instruct)")
    mod.add_argument("--ranks", type=int_list, default=None,
                     help="adapter k has ranks[k mod len] (default: every adapter at the window's max_lora_rank)")
    mod.add_argument("--models", default=None,
                     help="candidate regressors, comma-separated (default linear,hoeffding,bagging; also arf)")
    mod.add_argument("--warm-start", action="append", default=[], metavar="twin|FILE",
                     help="pre-train on a sweep file (e.g. ml_train_sim.csv.gz) or on twin runs ('twin': a "
                          "starvation-boundary search of the first windows' traffic); may be repeated")
    mod.add_argument("--warm-rows", type=int, default=2000, help="rows sampled from a warm-start file (default 2000)")
    mod.add_argument("--twin-budget", type=float, default=60.0, help="seconds for --warm-start twin (default 60)")
    mod.add_argument("--workload-windows", type=int, default=3, help="recent windows the policy plans for (default 3)")
    mod.add_argument("--alpha", type=float, default=0.1, help="miss rate of the conformal interval (default 0.1)")
    mod.add_argument("--drift", choices=["page-hinkley", "adwin"], default="page-hinkley",
                     help="drift detector on the prediction error (default page-hinkley)")
    mod.add_argument("--seed", type=int, default=0)
    pol = p.add_argument_group("policy")
    pol.add_argument("--grid", type=int_list, default=None,
                     help="candidate served / max_loras values (default 8,16,32,64,128,192,256,320,384)")
    pol.add_argument("--max-starvation-prob", type=float, default=0.2,
                     help="a candidate is acceptable up to this starvation probability (default 0.2)")
    pol.add_argument("--served-margin", type=float, default=0.02,
                     help="predicted gain needed to change only the served set (default 0.02)")
    pol.add_argument("--restart-margin", type=float, default=0.05,
                     help="predicted gain needed to change max_loras, a vLLM restart (default 0.05)")
    pol.add_argument("--no-twin", action="store_true", help="never ask the twin, even when the model is unsure")
    pol.add_argument("--twin-duration", type=float, default=600.0,
                     help="trace seconds of a what-if twin run (default 600)")
    pol.add_argument("--explore-budget", type=float, default=5.0, metavar="S",
                     help="twin seconds for a starvation-boundary search when the traffic is new (default 5; 0: "
                          "only per-window questions)")
    pol.add_argument("--max-ttft-ms", type=float, default=None, help="optional mean TTFT limit")
    pol.add_argument("--max-itl-ms", type=float, default=None, help="optional mean ITL limit")
    pol.add_argument("--max-adapter-starvation", type=float, default=None, metavar="R",
                     help="optional per-adapter fairness: the most one served adapter may starve (e.g. 0.1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print one JSON summary line (the last line of stdout)")


def register(sub, twin) -> None:
    learn = sub.add_parser("learn", help="online learner: stream windows to recommendations; `learn evaluate` offline",
                           description=_STREAM_DESCRIPTION)
    _add_stream_args(learn)
    learn.set_defaults(func=_stream)
    lsub = learn.add_subparsers(dest="learn_command", required=False, metavar="{run,evaluate}")
    run = lsub.add_parser("run", help="the streaming learner (the default of `adaptwin learn`)",
                          description=_STREAM_DESCRIPTION)
    _add_stream_args(run)
    run.set_defaults(func=_stream)
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
    ev.add_argument("--twin-feature", action="store_true",
                    help="simulate each row's scenario with the twin (inputs only) and give the models its "
                         "throughput as a feature (twin_gap); runs are budgeted by --twin-budget and cached")
    ev.add_argument("--twin-calibration", default=None, metavar="DIR",
                    help="with --twin-feature: fit the twin's profiles from this folder of profiling CSVs (e.g. "
                         "../shared/data/calibration) instead of the shipped ones, which are partly fitted on real runs")
    ev.add_argument("--jobs", type=int, default=1, help="processes for generating twin runs (default 1)")
    ev.add_argument("--models", default=None,
                    help="comma-separated candidate regressors (default all: linear,hoeffding,arf,bagging)")
    ev.add_argument("--shuffle", type=int, default=None, metavar="SEED", help="shuffle the rows with SEED first")
    ev.add_argument("--limit", type=int, default=None, help="only the first N rows (after --shuffle)")
    ev.add_argument("--alpha", type=float, default=0.1, help="miss rate of the conformal interval (default 0.1)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", action="store_true", help="print one JSON line (the last line of stdout)")
    ev.set_defaults(func=_evaluate)


def _stream(args: argparse.Namespace) -> int:
    from pathlib import Path

    from adaptwin import config
    from adaptwin.cliutil import print_json as _print
    from adaptwin.learner.consumer import LearnerConfig, run
    from adaptwin.learner.drift import DriftConfig
    from adaptwin.learner.models import CANDIDATES
    from adaptwin.learner.policy import PolicyConfig
    from adaptwin.learner.stream import StreamConfig

    models = tuple(m.strip() for m in args.models.split(",")) if args.models else None
    if models:
        unknown = [m for m in models if m not in CANDIDATES]
        if unknown:
            raise UserError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(CANDIDATES)}")
    if not 0 < args.alpha < 1:
        raise UserError(f"--alpha must be in (0, 1), got {args.alpha}")
    if args.until_run_end and not args.run_id_in:
        raise UserError("--until-run-end needs --run-id-in (whose run record ends the stream)")
    if args.workload_windows < 1:
        raise UserError(f"--workload-windows must be >= 1, got {args.workload_windows}")
    try:
        policy = PolicyConfig(**({"grid": tuple(args.grid)} if args.grid else {}),
                              max_starvation_prob=args.max_starvation_prob, served_margin=args.served_margin,
                              restart_margin=args.restart_margin, twin_duration_s=args.twin_duration,
                              explore_budget_s=args.explore_budget,
                              max_ttft_ms=args.max_ttft_ms, max_itl_ms=args.max_itl_ms,
                              max_adapter_starvation=args.max_adapter_starvation)
        stream = StreamConfig(model=args.model, ranks=tuple(args.ranks) if args.ranks else None,
                              **({"models": models} if models else {}), run_id=args.run_id_in,
                              output_run_id=args.run_id,
                              workload_windows=args.workload_windows, seed=args.seed, alpha=args.alpha,
                              policy=policy, drift=DriftConfig(method=args.drift))
        from adaptwin.learner.features import model_facts

        model_facts(args.model)
    except ValueError as err:
        raise UserError(str(err)) from None
    group = args.group or ("adaptwin-learner-" + args.run_id_in if args.run_id_in else "adaptwin-learner")
    import os

    cache = Path(os.environ.get("ADAPTWIN_CACHE", ".cache"))
    ckpt = Path(args.checkpoint) if args.checkpoint else cache / "learner" / group
    cfg = LearnerConfig(
        bootstrap=config.bootstrap(args.bootstrap), checkpoint_dir=ckpt, group=group, stream=stream,
        checkpoint_every=args.checkpoint_every, max_windows=args.max_windows, idle_exit_s=args.idle_exit,
        until_run_end=args.until_run_end, warm_start=tuple(args.warm_start), warm_rows=args.warm_rows,
        twin_budget_s=args.twin_budget, ask_twin=not args.no_twin,
        **{k: v for k, v in (("windows_topic", args.windows_topic), ("recommendations_topic",
                                                                     args.recommendations_topic),
                             ("deadletter_topic", args.deadletter_topic)) if v},
        progress=not args.no_progress)
    summary = run(cfg)
    if args.json:
        _print(summary)
    else:
        for key, value in summary.items():
            print(f"{key:30s} {value}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import random

    from adaptwin.learner.dataset import DatasetError, read_runs
    from adaptwin.learner.models import CANDIDATES
    from adaptwin.learner.prequential import evaluate
    from adaptwin.learner.warmstart import default_cache, select_warm_runs, twin_predictions, twin_warm_runs

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
        twin = twin_label = None
        if args.twin_feature:
            twin = twin_predictions(runs, budget_s=args.twin_budget, jobs=args.jobs, seed=args.seed,
                                    cache=args.twin_cache or default_cache(), calibration=args.twin_calibration)
            twin_label = ("adaptwin twin, profiles from " + args.twin_calibration if args.twin_calibration
                          else "adaptwin twin, shipped profiles")
        report = evaluate(runs, warm, models, seed=args.seed, alpha=args.alpha,
                          warm_label=",".join(args.warm_start) or None, twin=twin, twin_label=twin_label)
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
