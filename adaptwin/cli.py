"""The ``adaptwin`` command line (DESIGN.md §CLI contract).

Each part declares its own commands in its ``cli`` module (``register(sub, twin)``: ``sub`` holds the
top-level commands, ``twin`` the ``adaptwin twin …`` group) and imports its heavy dependencies only when
a command runs, so ``adaptwin --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from adaptwin import __version__, log
from adaptwin.cliutil import UserError, add_kafka_args, add_lake_args

PARTS = (
    "adaptwin.ingest.cli",
    "adaptwin.twin.cli",
    "adaptwin.replay.cli",
    "adaptwin.learner.cli",
    "adaptwin.dashboard.cli",
    "adaptwin.profiler.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptwin", description="Workload replay, digital twin and online configuration learning for "
                                     "multi-LoRA vLLM serving.")
    parser.add_argument("--version", action="version", version=f"adaptwin {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (stderr)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    twin_parser = sub.add_parser("twin", help="the digital twin: run, validate, serve, fit, worker")
    twin = twin_parser.add_subparsers(dest="twin_command", required=True, metavar="TWIN_COMMAND")
    for name in PARTS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:  # a part's cli must import only the standard library and adaptwin
                raise
            continue  # that part has no commands yet
        module.register(sub, twin)
    demo = sub.add_parser("demo", help="the pipeline end to end on a real trace: summary, then the dashboard until Ctrl-C")
    demo.add_argument("--trace", default="azure-conv", help="shipped trace name or file (default azure-conv)")
    demo.add_argument("--adapters", type=int, default=64)
    demo.add_argument("--limit", type=int, default=None, help="only the first N requests")
    demo.add_argument("--port", type=int, default=8501, help="dashboard port (default 8501)")
    demo.add_argument("--no-dashboard", action="store_true", help="print the summary and exit")
    add_kafka_args(demo)
    add_lake_args(demo)
    demo.set_defaults(func=_demo)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from adaptwin import config, demo

    demo.run(demo.DemoConfig(bootstrap=config.bootstrap(args.bootstrap), lake=config.lake(args.lake),
                             trace=args.trace, adapters=args.adapters, limit=args.limit,
                             dashboard=not args.no_dashboard, port=args.port))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.setup(args.verbose)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"adaptwin: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("adaptwin").warning("interrupted")
        return 130
    except Exception as err:
        if type(err).__module__.split(".")[0] != "kafka":
            raise
        from adaptwin.kafka import EXIT_BROKER_STALLED

        print(f"adaptwin: error: the Kafka broker failed or stopped answering ({type(err).__name__}: {err}); "
              "what was committed is kept: replay, learn, sink and twin worker, run again, resume from their last "
              "commit", file=sys.stderr)
        return EXIT_BROKER_STALLED
