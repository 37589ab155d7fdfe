"""Helpers each part's ``cli.py`` uses to declare its commands in the same way."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


class UserError(Exception):
    """A mistake the user can fix: printed as one line (no traceback), exit status 2."""


def add_kafka_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bootstrap", default=None,
                        help="Kafka broker (default $ADAPTWIN_BOOTSTRAP or 127.0.0.1:9092)")


def add_lake_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lake", default=None, help="lake root (default $ADAPTWIN_LAKE or ./lake)")


def int_list(text: str) -> list[int]:
    """Parse '8,16,32' (also ';'-separated) into ints."""
    try:
        return [int(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None


def float_list(text: str) -> list[float]:
    """Parse '0.1,0.05' (also ';'-separated) into floats."""
    try:
        return [float(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of numbers, got {text!r}") from None


def print_json(obj: dict[str, Any]) -> None:
    """The `--json` contract: exactly one JSON object on one line, the last line of stdout."""
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n")
    sys.stdout.flush()


def render_table(table, max_rows: int = 50) -> str:
    """An Arrow table as plain text (no extra dependency), with a row count footer."""
    rows = table.slice(0, max_rows).to_pylist()
    names = table.schema.names
    cells = [[_fmt(r[n]) for n in names] for r in rows]
    widths = [max([len(n)] + [len(c[i]) for c in cells]) for i, n in enumerate(names)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(n.ljust(w) for n, w in zip(names, widths)), line]
    out += ["  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    more = f" (showing {max_rows})" if table.num_rows > max_rows else ""
    out.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''}{more})")
    return "\n".join(out)


def _fmt(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _numeric(text: str) -> bool:
    return text.replace(".", "", 1).replace("-", "", 1).replace("e", "", 1).isdigit()
