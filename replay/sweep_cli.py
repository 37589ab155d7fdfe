"""``adaptwin sweep`` and ``adaptwin twin worker`` (docs/search.md §Sweeps). Heavy imports happen when they run."""

from __future__ import annotations

import argparse
import sys

from adaptwin.cliutil import UserError, add_kafka_args, float_list, int_list, print_json

__all__ = ["register_sweep", "register_worker"]


def register_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="simulate a design of workloads x configurations to a Parquet dataset",
                       description="A grid (--rates/--ranks x --served x --max-loras) or random (--random N) design "
                                   "of twin runs, one Parquet row per run (the `twin run --json` fields plus the "
                                   "workload's features) in the folder --out. Resumable: a re-run skips the runs "
                                   "already there. Local processes (--jobs) or Kafka workers (--kafka).")
    p.add_argument("--out", required=True, help="dataset folder (Parquet part files; created if missing)")
    p.add_argument("--model", default="llama-3.1-8b-instruct",
                   help="model(s), comma-separated (default llama-3.1-8b-instruct)")
    p.add_argument("--rates", type=float_list, action="append", default=None,
                   help="per-adapter-group rates of one workload; repeat for more workloads")
    p.add_argument("--ranks", type=int_list, action="append", default=None,
                   help="ranks of the workloads (one --ranks for all, or one per --rates)")
    p.add_argument("--served", type=int_list, default=None, help="served-adapter values (default: the paper grid)")
    p.add_argument("--max-loras", type=int_list, default=None, help="max_loras values (default: the paper grid)")
    p.add_argument("--max-lora-rank", type=int, default=None, help="vLLM --max-lora-rank (default max rank)")
    p.add_argument("--random", type=int, default=None, metavar="N",
                   help="instead of a grid: N runs with paper-like workloads and configurations drawn at random")
    p.add_argument("--seed", type=int, default=0, help="--random: design seed")
    p.add_argument("--seeds", type=int, default=1, help="grid: arrival seeds 0..N-1 per configuration (default 1)")
    p.add_argument("--duration", type=float, default=3600.0, help="simulated window per run, s (default 3600)")
    p.add_argument("--jobs", type=int, default=1, help="local processes (default 1)")
    p.add_argument("--kafka", action="store_true",
                   help="publish the tasks to adaptwin.sweep.tasks and collect adaptwin.sweep.results "
                        "(run `adaptwin twin worker` processes to simulate them)")
    add_kafka_args(p)
    p.add_argument("--tasks-topic", default=None, help=argparse.SUPPRESS)
    p.add_argument("--results-topic", default=None, help=argparse.SUPPRESS)
    p.add_argument("--idle-timeout", type=float, default=300.0, metavar="S",
                   help="--kafka: give up after S s without a result (default 300)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON line")
    p.set_defaults(func=_sweep)


def register_worker(twin) -> None:
    p = twin.add_parser("worker", help="simulate sweep tasks from Kafka (one consumer group, exactly once)",
                        description="Consume adaptwin.sweep.tasks in a consumer group, simulate each task on the "
                                    "twin, send the row to adaptwin.sweep.results and commit the task in one "
                                    "Kafka transaction. Start several for a faster sweep.")
    add_kafka_args(p)
    p.add_argument("--group", default=None, help="consumer group (default adaptwin-sweep-workers)")
    p.add_argument("--worker-id", default=None,
                   help="stable id (transactional id); restart a killed worker with the same id")
    p.add_argument("--idle-exit", type=float, default=None, metavar="S", help="stop after S s without a task")
    p.add_argument("--max-tasks", type=int, default=None, help="stop after N tasks")
    p.add_argument("--assign", default=None, metavar="I/N",
                   help="take task partitions p with p mod N == I yourself instead of the group's rebalancing "
                        "(if group joins stall); a killed worker's partitions then wait for its restart")
    p.add_argument("--tasks-topic", default=None, help=argparse.SUPPRESS)
    p.add_argument("--results-topic", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="print the counts as one JSON line at the end")
    p.set_defaults(func=_worker)


def _design(args: argparse.Namespace) -> list:
    from adaptwin.twin.search import PAPER_GRID
    from adaptwin.twin.sweep import grid_design, random_design

    models = [m.strip() for m in args.model.split(",") if m.strip()]
    if args.random is not None:
        if args.rates or args.ranks:
            raise UserError("give either --random N or --rates/--ranks, not both")
        grid = sorted(set(args.served or []) | set(args.max_loras or [])) or PAPER_GRID
        return random_design(args.random, models, seed=args.seed, grid=grid, duration=args.duration)
    if not args.rates:
        raise UserError("no workload: give --rates (e.g. --rates 0.1,0.05,0.025 --ranks 8,16,32) or --random N")
    ranks = args.ranks or []
    if not ranks:
        raise UserError("no ranks: give --ranks (e.g. --ranks 8,16,32), once for all workloads or once per --rates")
    if len(ranks) not in (1, len(args.rates)):
        raise UserError(f"{len(args.rates)} --rates but {len(ranks)} --ranks: give one --ranks for all workloads "
                        "or one per --rates")
    if any(not r for r in args.rates) or any(not k for k in ranks):
        raise UserError("empty --rates or --ranks: give at least one value each")
    workloads = [(m, tuple(r), tuple(ranks[i if len(ranks) > 1 else 0]))
                 for m in models for i, r in enumerate(args.rates)]
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    return grid_design(workloads, args.served if args.served is not None else PAPER_GRID,
                       args.max_loras if args.max_loras is not None else PAPER_GRID, duration=args.duration,
                       seeds=range(args.seeds), max_lora_rank=args.max_lora_rank)


def _sweep(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from adaptwin.twin.config import ConfigError
    from adaptwin.twin.sweep import SweepDataset, check_design, run_local

    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    try:
        tasks = _design(args)
        check_design(tasks)
        dataset = SweepDataset(args.out)
        done = dataset.done_ids()
    except ConfigError as err:
        raise UserError(str(err)) from None
    t0 = time.perf_counter()
    todo = [t for t in {t.task_id: t for t in tasks}.values() if t.task_id not in done]
    bar = tqdm(total=len(todo), desc="sweep", unit="run", file=sys.stderr, disable=args.no_progress)
    try:
        if args.kafka:
            stats = _sweep_kafka(args, tasks, todo, dataset, bar)
        else:
            stats = run_local(tasks, dataset, jobs=args.jobs, on_row=lambda _row: bar.update(1))
    except KeyboardInterrupt:
        bar.close()
        print("adaptwin sweep: interrupted; the finished runs are in the dataset, run the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        bar.close()
    stats.update(out=str(dataset.path), rows=dataset.read().num_rows, wall_s=round(time.perf_counter() - t0, 3))
    if args.json:
        print_json(stats)
    else:
        print(f"sweep: {stats['run']} run(s) simulated, {stats['skipped']} already done, {stats['errors']} with an "
              f"error (cannot start); {stats['rows']} rows in {stats['out']} ({stats['wall_s']:.1f} s)")
    return 0


def _sweep_kafka(args, tasks, todo, dataset, bar) -> dict:
    from adaptwin.config import TOPICS, bootstrap
    from adaptwin.kafka import ensure_topics, wait_for_broker
    from adaptwin.replay.worker import collect_results, publish_tasks

    boot = bootstrap(args.bootstrap)
    tasks_topic = args.tasks_topic or TOPICS.sweep_tasks
    results_topic = args.results_topic or TOPICS.sweep_results
    wait_for_broker(boot, timeout_s=30)
    ensure_topics(boot, [tasks_topic, results_topic])
    stats = {"planned": len({t.task_id for t in tasks}), "skipped": len({t.task_id for t in tasks}) - len(todo),
             "run": 0, "errors": 0, "published": 0}
    if not todo:
        return stats
    stats["published"] = publish_tasks(boot, todo, tasks_topic)

    def take(rows: list[dict]) -> None:
        dataset.append(rows)  # durable before the next poll: a killed sweep resumes from the dataset
        stats["run"] += len(rows)
        stats["errors"] += sum(1 for r in rows if r.get("error"))
        bar.update(len(rows))

    collect_results(boot, {t.task_id for t in todo}, take, topic=results_topic, idle_timeout_s=args.idle_timeout)
    return stats


def _worker(args: argparse.Namespace) -> int:
    from adaptwin.config import TOPICS, bootstrap
    from adaptwin.kafka import ensure_topics, wait_for_broker
    from adaptwin.replay.worker import DEFAULT_GROUP, WorkerConfig, run_worker

    boot = bootstrap(args.bootstrap)
    assign = None
    if args.assign is not None:
        try:
            i, n = (int(x) for x in args.assign.split("/"))
        except ValueError:
            raise UserError(f"--assign takes I/N (e.g. 0/2), got {args.assign!r}") from None
        if not 0 <= i < n:
            raise UserError(f"--assign {args.assign}: need 0 <= I < N")
        assign = (i, n)
    cfg = WorkerConfig(bootstrap=boot, group=args.group or DEFAULT_GROUP, worker_id=args.worker_id or "",
                       assign=assign,
                       tasks_topic=args.tasks_topic or TOPICS.sweep_tasks,
                       results_topic=args.results_topic or TOPICS.sweep_results,
                       idle_exit_s=args.idle_exit, max_tasks=args.max_tasks)
    wait_for_broker(boot, timeout_s=30)
    ensure_topics(boot, [cfg.tasks_topic, cfg.results_topic, TOPICS.deadletter])
    out = run_worker(cfg)
    if args.json:
        print_json(out)
    else:
        print(f"worker {out['worker_id']}: {out['tasks']} task(s), {out['dead_letters']} dead letter(s)")
    return 0
