"""Commands of the replay part: ``adaptwin replay`` (this module); ``twin serve``, ``sweep`` and ``twin worker``
register their own parsers next to it (one ``_add_*`` helper per command). Heavy imports happen when a command runs."""

from __future__ import annotations

import argparse
import hashlib
import os
import re

from adaptwin.cliutil import UserError, add_kafka_args, int_list, print_json

_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,120}")


def register(sub, twin) -> None:
    _add_replay(sub)
    try:
        from adaptwin.replay.serve_cli import register_serve  # `twin serve`: its own module
    except ModuleNotFoundError as err:
        if err.name != "adaptwin.replay.serve_cli":
            raise
    else:
        register_serve(twin)
    from adaptwin.replay.sweep_cli import register_sweep, register_worker  # `sweep`, `twin worker`: their own module

    register_sweep(sub)
    register_worker(twin)


# ------------------------------------------------------------------------------------------------------------
# adaptwin replay
def _add_replay(sub) -> None:
    p = sub.add_parser("replay", help="replay requests (Kafka or a trace file) through the twin or a vLLM server",
                       description="Replay one ingest run's requests (from adaptwin.requests) or a trace file "
                                   "through a backend for one configuration; telemetry per request to "
                                   "adaptwin.telemetry, windows and the run record to adaptwin.windows, "
                                   "exactly once (Kafka transactions). See docs/replay.md.")
    p.add_argument("--backend", choices=["twin", "vllm"], default="twin")
    p.add_argument("--url", default=None, help="vLLM server (backend vllm), e.g. http://127.0.0.1:8000")
    p.add_argument("--speedup", type=float, default=None,
                   help="trace seconds per wall second. Backend vllm: each request is sent at ts/SPEEDUP (default "
                        "1). Backend twin: paces the replay to it, e.g. to watch a run live on the dashboard "
                        "(default: as fast as it can; the results do not depend on it)")
    p.add_argument("--token-ids", type=int_list, default=None, metavar="LO,HI",
                   help="backend vllm: prompts are random token ids in [LO, HI) (default 100,500; a small "
                        "vocabulary, e.g. the tiny CPU model's 480, needs a lower HI)")
    src = p.add_argument_group("input (one of)")
    src.add_argument("--run-id-in", default=None, metavar="RUN", help="ingest run id to replay from adaptwin.requests")
    src.add_argument("--source", default=None, metavar="FILE",
                     help="read a trace file (or shipped trace name) directly, with ingest's readers")
    src.add_argument("--format", choices=["azure", "mooncake", "servegen", "parquet", "csv"], default=None,
                     help="--source format (default: detected)")
    src.add_argument("--columns", default=None, help="--source csv/parquet column mapping (see `adaptwin ingest`)")
    src.add_argument("--adapters", type=int, default=None, help="--source: adapters to assign when it has none")
    src.add_argument("--popularity", default="zipf:1.1", help="--source: adapter popularity (see ingest)")
    src.add_argument("--seed", type=int, default=0, help="--source: seed of the adapter assignment")
    src.add_argument("--limit", type=int, default=None, help="--source: only the first N requests")
    cfg = p.add_argument_group("configuration")
    cfg.add_argument("--served", type=int, required=True, help="served adapters (vLLM --max-cpu-loras)")
    cfg.add_argument("--max-loras", type=int, required=True, help="adapter slots (vLLM --max-loras)")
    cfg.add_argument("--max-lora-rank", type=int, default=None, help="default: the largest served adapter rank")
    cfg.add_argument("--ranks", type=int_list, default=None,
                     help="adapter k has ranks[k mod len] (default: learnt from the requests' adapter_rank)")
    cfg.add_argument("--discover", type=float, default=None, metavar="S",
                     help="learn adapter ranks from the requests of the first S trace seconds before starting the "
                          "backend (default 600 for the twin, 0 for vllm, whose server knows its adapters)")
    cfg.add_argument("--model", default="llama-3.1-8b-instruct")
    cfg.add_argument("--profile", default=None, help="twin profile JSON (default: the shipped one for --model)")
    clock = p.add_argument_group("clock and delivery")
    clock.add_argument("--run-id", default=None, help="this replay's id (default: derived from input and config; "
                                                      "the same id resumes a killed replay)")
    clock.add_argument("--window", type=float, default=60.0, metavar="S", help="window length, trace seconds")
    clock.add_argument("--tick", type=float, default=1.0, metavar="S", help="clock step, trace seconds (default 1)")
    clock.add_argument("--duration", type=float, default=None, metavar="S",
                       help="replay [0, S) (default: to the end of the window holding the last request)")
    clock.add_argument("--lateness", type=float, default=2.0, metavar="S",
                       help="out-of-order allowance of the Kafka merge, trace seconds (default 2)")
    clock.add_argument("--max-backlog", type=int, default=100_000, metavar="N",
                       help="most requests buffered by the merge, and most in flight (default 100000)")
    clock.add_argument("--follow", action="store_true",
                       help="keep reading adaptwin.requests (live ingest) until --idle-exit; default: replay what "
                            "the topic holds when the replay starts")
    clock.add_argument("--idle-exit", type=float, default=5.0, metavar="S", help="--follow: stop after S s idle")
    clock.add_argument("--commit-interval", type=float, default=1.0, metavar="S",
                       help="wall seconds between transactions (default 1)")
    clock.add_argument("--flush-records", type=int, default=5000, metavar="N",
                       help="records buffered before they are sent inside the open transaction (default 5000)")
    p.add_argument("--dry-run", action="store_true", help="send nothing to Kafka; print the summary only")
    p.add_argument("--windows-out", default=None, metavar="FILE",
                   help="with --dry-run: also write the window records (adaptwin.windows) as JSON lines to FILE")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line (last line of stdout)")
    add_kafka_args(p)
    p.set_defaults(func=_replay)


def default_run_id(args: argparse.Namespace) -> str:
    """Derived from the input and the configuration, so that re-running the same command resumes the same replay."""
    what = args.run_id_in or os.path.basename(str(args.source)).split(".")[0]
    knobs = [args.backend, args.served, args.max_loras, args.max_lora_rank, args.ranks, args.model, args.profile,
             args.window, args.tick, args.duration, args.url,
             # the twin's results do not depend on its pace: the same replay whatever --speedup
             (args.speedup or 1.0) if args.backend == "vllm" else 1.0, args.source and
             (args.format, args.columns, args.adapters, args.popularity, args.seed, args.limit)]
    digest = hashlib.sha1(repr(knobs).encode()).hexdigest()[:8]
    rid = f"replay-{what}-{args.backend}-s{args.served}-g{args.max_loras}-{digest}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", rid)[:120]


def _replay(args: argparse.Namespace) -> int:
    import logging

    from adaptwin import config
    from adaptwin.replay.engine import Replay, ReplayOptions

    log = logging.getLogger("adaptwin.replay")
    if (args.run_id_in is None) == (args.source is None):
        raise UserError("give exactly one input: --run-id-in RUN (requests of that ingest run from "
                        "adaptwin.requests) or --source FILE")
    run_id = args.run_id or default_run_id(args)
    if not _SAFE_ID.fullmatch(run_id):
        raise UserError(f"--run-id must match [A-Za-z0-9._-]{{1,120}}, got {run_id!r}")
    options = ReplayOptions(
        run_id=run_id, served=args.served, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
        model=args.model, ranks=tuple(args.ranks) if args.ranks else None, window_s=args.window, tick_s=args.tick,
        duration_s=args.duration, max_backlog=args.max_backlog, commit_interval_s=args.commit_interval,
        flush_records=args.flush_records, pace=args.speedup if args.backend == "twin" else None,
        discover_s=args.discover if args.discover is not None else (600.0 if args.backend == "twin" else 0.0),
        source_name=args.source or config.TOPICS.requests)
    bootstrap = config.bootstrap(args.bootstrap)
    backend = _backend(args)
    group_id = f"adaptwin-replay-{run_id}"

    emitter, checkpoint = _emitter(args, bootstrap, run_id, group_id)
    if checkpoint is not None and checkpoint.done:
        log.warning("replay %s is already complete (its records are in Kafka); use another --run-id to replay "
                    "again", run_id)
        summary = dict(checkpoint.summary or {"run_id": run_id}, already_complete=True)
        emitter.close()
        return _report(args, summary)
    source = None
    try:
        source = _source(args, bootstrap, run_id, group_id, checkpoint)
        summary = Replay(options, source, backend, emitter, checkpoint=checkpoint,
                         progress=not args.no_progress).run()
    except BaseException:
        emitter.close()
        raise
    finally:
        if source is not None:
            source.close()
    if args.windows_out:
        if not args.dry_run:
            raise UserError("--windows-out needs --dry-run (otherwise the windows are in adaptwin.windows)")
        import json

        with open(args.windows_out, "w") as f:
            f.writelines(json.dumps(w, default=str) + "\n" for w in emitter.windows)
    return _report(args, summary)


def _report(args: argparse.Namespace, summary: dict) -> int:
    if args.json:
        print_json(summary)
    else:
        print(f"replay {summary.get('run_id')}: {summary.get('arrivals')} requests, {summary.get('finished')} "
              f"finished, {summary.get('refused', 0)} refused; total throughput {summary.get('total_throughput')} "
              f"tok/s of {summary.get('ideal_total_throughput')} offered, starved={summary.get('starved')}")
    return 0


def _backend(args: argparse.Namespace):
    if args.backend == "twin":
        from adaptwin.replay.backends.twin import TwinBackend
        from adaptwin.twin.profile import ProfileError, load_profile

        try:
            profile = load_profile(args.model, path=args.profile)
        except ProfileError as err:
            raise UserError(str(err)) from None
        return TwinBackend(profile=profile, window_s=args.window)
    if not args.url:
        raise UserError("--backend vllm needs --url URL (the server's base URL, e.g. http://127.0.0.1:8000)")
    try:
        from adaptwin.replay.backends.vllm import VllmBackend
    except ModuleNotFoundError as err:
        raise UserError(f"the vllm backend is not available in this build ({err})") from None
    api_key = os.environ.get("ADAPTWIN_API_KEY") or os.environ.get("OPENAI_API_KEY")
    kw = {}
    if args.token_ids is not None:
        if len(args.token_ids) != 2 or not 0 <= args.token_ids[0] < args.token_ids[1]:
            raise UserError(f"--token-ids needs LO,HI with 0 <= LO < HI, got {args.token_ids}")
        kw["token_ids"] = tuple(args.token_ids)
    return VllmBackend(url=args.url, speedup=args.speedup or 1.0, api_key=api_key, **kw)


def _emitter(args: argparse.Namespace, bootstrap: str, run_id: str, group_id: str):
    from adaptwin.replay.telemetry import KafkaEmitter, MemoryEmitter

    if args.dry_run:
        return MemoryEmitter(), None
    from kafka import TopicPartition

    from adaptwin.config import TOPICS
    from adaptwin.kafka import wait_for_broker

    wait_for_broker(bootstrap, 60.0)
    emitter = KafkaEmitter(bootstrap, run_id, group_id, TopicPartition(TOPICS.requests, 0))
    return emitter, emitter.resume()


def _source(args: argparse.Namespace, bootstrap: str, run_id: str, group_id: str, checkpoint):
    if args.source is not None:
        from adaptwin.ingest.source import IngestConfig
        from adaptwin.replay.source import FileSource

        ingest = IngestConfig(trace=args.source, format=args.format, columns=args.columns, adapters=args.adapters,
                              popularity=args.popularity, ranks=tuple(args.ranks or (8,)), seed=args.seed,
                              run_id=run_id, max_rows=args.limit)
        return FileSource(ingest, lateness_s=args.lateness, max_buffer=args.max_backlog)
    from adaptwin.replay.source import KafkaSource

    return KafkaSource(bootstrap, args.run_id_in, group_id, lateness_s=args.lateness, max_buffer=args.max_backlog,
                       follow=args.follow, idle_exit_s=args.idle_exit,
                       start_offsets=checkpoint.start if checkpoint is not None else None)
