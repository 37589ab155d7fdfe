"""``adaptwin dashboard``: the Streamlit dashboard over the lake, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import ipaddress

from adaptwin.cliutil import UserError, add_kafka_args, add_lake_args

LOOPBACK = "127.0.0.1"


def register(sub: argparse._SubParsersAction, twin: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="live Streamlit dashboard over the Parquet lake (127.0.0.1:8501)",
                       description="Pages: Live, Adapters, Recommendations, Twin vs real, Query, Pipeline. "
                                   "Reads the lake through DuckDB, read-only; Kafka only for consumer lag.")
    p.add_argument("--port", type=int, default=8501, help="port (default 8501)")
    p.add_argument("--address", default=LOOPBACK,
                   help="address to bind (default 127.0.0.1). Anything else, such as 0.0.0.0, exposes the "
                        "dashboard and its SQL page to the network and needs --allow-remote")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow --address to be a non-loopback address")
    p.add_argument("--refresh", type=float, default=5.0, metavar="S",
                   help="live pages rerun every S seconds (default 5; 0 = no auto-refresh)")
    p.add_argument("--cache-ttl", type=float, default=2.0, metavar="S",
                   help="query results are cached this long (default 2)")
    p.add_argument("--groups", default=None,
                   help="comma-separated consumer groups for the lag table (default: every group)")
    add_kafka_args(p)
    add_lake_args(p)
    p.set_defaults(func=_dashboard)


def streamlit_argv(address: str, port: int) -> list[str]:
    from pathlib import Path

    app = Path(__file__).with_name("app.py")
    return ["-m", "streamlit", "run", str(app), "--server.headless", "true", "--server.address", address,
            "--server.port", str(port), "--browser.gatherUsageStats", "false",
            "--server.fileWatcherType", "none", "--global.developmentMode", "false",
            "--server.runOnSave", "false", "--client.toolbarMode", "viewer"]


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _dashboard(args: argparse.Namespace) -> int:
    import os
    import sys

    from adaptwin import config
    from adaptwin.dashboard import settings

    if not _is_loopback(args.address) and not args.allow_remote:
        raise UserError(f"--address {args.address} would expose the dashboard (and its SQL page) beyond this "
                        "machine; add --allow-remote if that is what you want")
    if not 0 < args.port < 65536:
        raise UserError(f"--port must be 1..65535, got {args.port}")
    if args.refresh < 0 or args.cache_ttl < 0:
        raise UserError("--refresh and --cache-ttl must be ≥ 0")
    lake = config.lake(args.lake).resolve()
    if lake.exists() and not lake.is_dir():
        raise UserError(f"the lake {lake} is a file, not a directory")
    env = dict(os.environ, ADAPTWIN_LAKE=str(lake), ADAPTWIN_BOOTSTRAP=config.bootstrap(args.bootstrap))
    env[settings.ENV_REFRESH] = str(args.refresh)
    env[settings.ENV_TTL] = str(args.cache_ttl)
    if args.groups:
        env[settings.ENV_GROUPS] = args.groups
    print(f"adaptwin dashboard: http://{args.address}:{args.port}  (lake {lake})", file=sys.stderr, flush=True)
    argv = [sys.executable, *streamlit_argv(args.address, args.port)]
    os.execve(sys.executable, argv, env)  # the dashboard *is* the streamlit process: signals reach it directly
    return 0  # not reached
