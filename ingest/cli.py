"""Commands of the ingest part: ``ingest``, ``sink``, ``query``, ``topics``, ``lake compact|retention``.

Only argparse and adaptwin's light modules are imported here; each handler imports what it needs.
"""

from __future__ import annotations

import argparse
import re
import sys

from adaptwin.cliutil import UserError, add_kafka_args, add_lake_args, int_list, print_json, render_table

_SAFE_ID = re.compile(r"[A-Za-z0-9._-]{1,120}")


def register(sub: argparse._SubParsersAction, twin: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ingest", help="read a trace (or generate one) and publish its requests to Kafka",
                       description="Validate every row of a trace and publish the requests to adaptwin.requests; "
                                   "bad rows go to adaptwin.deadletter with the reason.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", help="trace file, or a shipped trace: azure-conv, azure-code, mooncake-conversation, "
                                     "mooncake-synthetic, servegen-m-small, servegen-deepseek-r1")
    src.add_argument("--synthetic", metavar="SPEC",
                     help="generated workload, e.g. 'paper:rates=0.1,0.05;ranks=8,16;adapters=32;duration=600'")
    p.add_argument("--format", choices=["azure", "mooncake", "servegen", "parquet", "csv"],
                   help="trace format (default: detected from the file)")
    p.add_argument("--columns", help="column mapping for csv/parquet, e.g. 'ts=arrival,prompt_tokens=in,"
                                     "output_tokens=out,adapter_id=model'")
    p.add_argument("--adapters", type=int, default=None, help="adapters to assign when the trace has none")
    p.add_argument("--popularity", default="zipf:1.1",
                   help="adapter popularity for traces without adapter ids: zipf:S, uniform or servegen[:NAME] "
                        "(default zipf:1.1)")
    p.add_argument("--ranks", type=int_list, default=[8], help="adapter ranks, round-robin (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-id", default=None, help="ingest job id (default: derived from the source and time)")
    p.add_argument("--speedup", type=float, default=None,
                   help="replay in scaled wall time (2 = twice as fast as the trace); default: as fast as possible")
    p.add_argument("--limit", type=int, default=None, help="stop after this many requests")
    p.add_argument("--start", type=float, default=0.0, metavar="S", help="skip the trace's first S seconds")
    p.add_argument("--duration", type=float, default=None, metavar="S", help="keep S seconds of trace")
    p.add_argument("--rate-scale", type=float, default=1.0, help="ServeGen: scale every client's rate")
    p.add_argument("--lengths", default="azure-conv",
                   help="ServeGen: shipped trace to draw token lengths from (default azure-conv)")
    p.add_argument("--loop", type=int, default=1, help="repeat the trace this many times (shifted in time)")
    p.add_argument("--batch-size", type=int, default=20_000, help="rows per validation batch")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON line")
    add_kafka_args(p)
    add_lake_args(p)
    p.set_defaults(func=_ingest)

    p = sub.add_parser("sink", help="write Kafka topics to the Parquet lake (exactly once)")
    p.add_argument("--group", default="adaptwin-sink", help="group id its offsets are committed under")
    p.add_argument("--topics", default=None, help="comma-separated topics (default: every lake topic)")
    p.add_argument("--idle-exit", type=float, default=None, metavar="S",
                   help="exit after S seconds without new messages (default: run until stopped)")
    p.add_argument("--max-age", type=float, default=2.0, metavar="S", help="publish buffered rows at least every S s")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON line at exit")
    add_kafka_args(p)
    add_lake_args(p)
    p.set_defaults(func=_sink)

    p = sub.add_parser("query", help="read-only DuckDB SQL over the lake",
                       description="Views: requests, telemetry, windows, recommendations, deadletter.")
    p.add_argument("sql")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table")
    p.add_argument("--max-rows", type=int, default=50, help="rows shown by --format table")
    add_lake_args(p)
    p.set_defaults(func=_query)

    _register_lake(sub)

    p = sub.add_parser("topics", help="create (idempotently) or list the project's Kafka topics")
    p.add_argument("action", choices=["create", "list"])
    add_kafka_args(p)
    p.set_defaults(func=_topics)


def _ingest(args: argparse.Namespace) -> int:
    import time

    from adaptwin import config
    from adaptwin.ingest import producer, source

    run_id = args.run_id or f"ingest-{time.strftime('%Y%m%dT%H%M%S')}"
    if not _SAFE_ID.fullmatch(run_id):
        raise UserError(f"--run-id must match [A-Za-z0-9._-]{{1,120}}, got {run_id!r}")
    ingest_config = source.IngestConfig(
        trace=args.trace, synthetic=args.synthetic, format=args.format, columns=args.columns,
        adapters=args.adapters, popularity=args.popularity, ranks=tuple(args.ranks), seed=args.seed,
        run_id=run_id, max_rows=args.limit, loop=args.loop, start_s=args.start, duration_s=args.duration,
        rate_scale=args.rate_scale, lengths=args.lengths)
    report = producer.produce(ingest_config, config.bootstrap(args.bootstrap), batch_size=args.batch_size,
                              speedup=args.speedup)
    summary = report.as_dict()
    if args.json:
        print_json(summary)
    else:
        print(f"run {run_id}: {report.accepted} requests published, {report.dead_lettered} dead-lettered "
              f"in {report.wall_s:.1f} s ({report.requests_per_s:,.0f} req/s)")
        for reason, n in report.dead_by_reason.most_common():
            print(f"  dead-lettered {n:>7}  {reason}")
    return 0


def _sink(args: argparse.Namespace) -> int:
    from adaptwin import config
    from adaptwin.ingest.lake import TABLES
    from adaptwin.ingest.sink import LakeSink, SinkConfig

    topics = tuple(t for t in args.topics.split(",") if t) if args.topics else tuple(t for t, _ in TABLES.values())
    unknown = [t for t in topics if t not in {t for t, _ in TABLES.values()}]
    if unknown:
        raise UserError(f"no lake table for topic(s) {unknown}; known: {[t for t, _ in TABLES.values()]}")
    sink = LakeSink(SinkConfig(bootstrap=config.bootstrap(args.bootstrap), lake=config.lake(args.lake),
                               topics=topics, group_id=args.group, max_age_s=args.max_age,
                               idle_exit_s=args.idle_exit))
    stats = sink.run()
    if args.json:
        print_json(stats.__dict__)
    else:
        print(f"sink: {stats.rows} rows in {stats.files} files from {stats.messages} messages; "
              f"{stats.dead_lettered} dead-lettered", file=sys.stderr)
    return 0


def _query(args: argparse.Namespace) -> int:
    from adaptwin import config
    from adaptwin.ingest import catalog

    table = catalog.query(config.lake(args.lake), args.sql)
    if args.format == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, sys.stdout.buffer)
    elif args.format == "json":
        import json

        for row in table.to_pylist():
            sys.stdout.write(json.dumps(row, default=str) + "\n")
    else:
        print(render_table(table, args.max_rows))
    return 0


def _topics(args: argparse.Namespace) -> int:
    from adaptwin import config, kafka

    bootstrap = config.bootstrap(args.bootstrap)
    if args.action == "create":
        created = kafka.ensure_topics(bootstrap)
        print(f"topics ready on {bootstrap} ({len(created)} created)")
    else:
        with kafka.admin_client(bootstrap) as admin:
            for t in sorted(admin.describe_topics(), key=lambda t: t["name"]):
                print(f"{t['name']}\t{len(t.get('partitions') or [])} partition(s)")
    return 0


def _register_lake(sub: argparse._SubParsersAction) -> None:
    lake_parser = sub.add_parser("lake", help="lake maintenance: compact small files, drop old partitions",
                                 description="Both are safe while `adaptwin sink` runs (docs/e2e.md).")
    lake_sub = lake_parser.add_subparsers(dest="lake_command", required=True, metavar="LAKE_COMMAND")
    tables = "comma-separated tables (default: all: requests,telemetry,windows,recommendations,deadletter)"

    p = lake_sub.add_parser("compact", help="merge small files the sink has committed, without changing any result",
                            description="Merges, per run/date directory and Kafka partition, files whose offsets "
                                        "are below the sink group's committed offsets into one file per offset "
                                        "range; query results do not change.")
    p.add_argument("--group", default=None, help="the sink's group id, whose committed offsets bound what is merged "
                                                 "(default: the group the lake's sink is bound to, else adaptwin-sink)")
    p.add_argument("--tables", default=None, help=tables)
    p.add_argument("--max-rows", type=int, default=2_000_000, help="rows per merged file (default 2,000,000)")
    p.add_argument("--every", type=float, default=None, metavar="S",
                   help="run again every S seconds until stopped (a service); a pass that fails is logged and retried")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON line")
    add_kafka_args(p)
    add_lake_args(p)
    p.set_defaults(func=_lake_compact)

    p = lake_sub.add_parser("retention", help="delete date partitions older than a limit",
                            description="Deletes every date=YYYY-MM-DD partition older than today (UTC) minus "
                                        "DAYS; today's partition, the only one the sink writes, is always kept.")
    p.add_argument("--older-than", "--keep-days", dest="older_than", type=int, required=True, metavar="DAYS",
                   help="keep the last DAYS days besides today")
    p.add_argument("--tables", default=None, help=tables)
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    p.add_argument("--every", type=float, default=None, metavar="S",
                   help="run again every S seconds until stopped (a service); a pass that fails is logged and retried")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON line")
    add_lake_args(p)
    p.set_defaults(func=_lake_retention)


def _tables(text: str | None) -> tuple[str, ...]:
    from adaptwin.ingest.lake import TABLES

    names = tuple(t for t in (text or "").split(",") if t) or tuple(TABLES)
    unknown = [t for t in names if t not in TABLES]
    if unknown:
        raise UserError(f"unknown lake table(s) {unknown}; known: {list(TABLES)}")
    return names


def _repeat(every: float | None, json_out: bool, one_pass) -> int:
    """Run ``one_pass`` once, or every ``every`` seconds until stopped; both jobs are safe to kill any time."""
    import logging
    import time

    if every is None:
        return one_pass()
    if every <= 0:
        raise UserError(f"--every must be a positive number of seconds, got {every:g}")
    if json_out:
        raise UserError("--json prints one summary and exits; with --every the passes are reported as text")
    log = logging.getLogger("adaptwin.ingest.maintenance")
    while True:
        try:
            one_pass()
            sys.stdout.flush()
        except UserError as err:  # e.g. the broker is restarting: try again next time
            log.warning("lake maintenance pass failed, retrying in %g s: %s", every, err)
        time.sleep(every)


def _lake_compact(args: argparse.Namespace) -> int:
    if args.max_rows < 1:
        raise UserError(f"--max-rows must be at least 1, got {args.max_rows}")
    return _repeat(args.every, args.json, lambda: _compact_pass(args))


def _compact_pass(args: argparse.Namespace) -> int:
    from adaptwin import config
    from adaptwin.ingest import maintenance

    report = maintenance.compact(maintenance.CompactConfig(
        lake=config.lake(args.lake), bootstrap=config.bootstrap(args.bootstrap), group_id=args.group,
        tables=_tables(args.tables), max_rows=args.max_rows))
    if args.json:
        print_json(report.__dict__)
    else:
        print(f"compacted {report.merged_files} files into {report.written_files} "
              f"({report.rows_merged:,} rows); lake files {report.files_before} -> {report.files_after}; "
              f"{report.skipped_uncommitted} not yet committed by the sink left alone"
              + (f"; {report.covered_removed} leftovers of an interrupted compaction removed"
                 if report.covered_removed else ""))
    return 0


def _lake_retention(args: argparse.Namespace) -> int:
    return _repeat(args.every, args.json, lambda: _retention_pass(args))


def _retention_pass(args: argparse.Namespace) -> int:
    from adaptwin import config
    from adaptwin.ingest import maintenance

    report = maintenance.retention(config.lake(args.lake), args.older_than, tables=_tables(args.tables),
                                   dry_run=args.dry_run)
    if args.json:
        print_json(report.__dict__)
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {report.partitions_removed} partition(s) older than {report.cutoff} "
              f"({report.files_removed} files, {report.bytes_removed / 1e6:.1f} MB)")
        for path in report.removed:
            print(f"  {path}")
    return 0
