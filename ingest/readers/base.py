"""What every trace reader shares: the raw row it yields, dead-letter reasons, options and its one error.

A reader knows a file format and nothing else: it turns bytes into :class:`RawRow` values (the row's
fields as found, not yet checked) or, for generated arrivals (ServeGen windows), into
:class:`ArrivalChunk` arrays. Checking values, numbering requests and dead-lettering is
``adaptwin.ingest.validate``'s job.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Protocol

import numpy as np

from adaptwin.cliutil import UserError

FORMATS = ("azure", "mooncake", "servegen", "parquet", "csv")
"""The ``--format`` choices."""

REQUIRED_FIELDS = ("ts", "prompt_tokens", "output_tokens")
OPTIONAL_FIELDS = ("adapter_id", "adapter_rank")  # in this order: a rank is read only with an adapter_id


class TraceFormatError(UserError):
    """The input is not a trace this build can read (wrong format, not a trace at all, missing columns)."""

    def __init__(self, path: str | Path, problem: str, expected: str = ""):
        hint = f"; expected {expected}" if expected else ""
        super().__init__(
            f"{path}: {problem}{hint}. Give --format one of {', '.join(FORMATS)} "
            "(and --columns for csv/parquet) or pick another file")
        self.path = str(path)


class Reason(enum.StrEnum):
    """Why a row was dead-lettered; the dead-letter ``reason`` is ``"<reason>: <detail>"``."""

    BAD_ENCODING = "bad_encoding"  # bytes that are not UTF-8
    LINE_TOO_LONG = "line_too_long"  # over Limits.max_line_bytes
    UNPARSABLE = "unparsable"  # not JSON / not an object / wrong number of CSV fields / bad window row
    MISSING_FIELD = "missing_field"
    BAD_TYPE = "bad_type"  # text where a number belongs, a float token count, ...
    NOT_FINITE = "not_finite"  # NaN or inf
    OUT_OF_RANGE = "out_of_range"  # negative or absurd token count, negative ts, bad rank
    TIME_BACKWARDS = "time_backwards"  # ts earlier than the latest ts by more than the tolerance
    UNKNOWN_ADAPTER = "unknown_adapter"  # not in the given adapter set


class TsUnit(enum.StrEnum):
    """How a reader's raw ``ts`` values are to be read."""

    SECONDS = "s"  # seconds since trace start
    MILLISECONDS = "ms"  # milliseconds since trace start (Mooncake)
    DATETIME = "datetime"  # wall clock; rebased to the first accepted row (Azure)
    AUTO = "auto"  # seconds or a datetime, fixed by the first row that parses (generic csv/parquet)


class RawRow(NamedTuple):
    """One row as found in the file. ``values`` is None when the row could not be split into fields."""

    line: int  # 1-based line (or row) in ``file``
    raw: bytes | None  # the line as read, for the dead-letter payload (None: render ``values``)
    values: tuple | None  # (ts, prompt_tokens, output_tokens[, adapter_id[, adapter_rank]]) as found
    error: tuple[Reason, str] | None = None  # why the row could not be read
    file: str | None = None  # where the row is, when not the reader's own path (ServeGen chunks)


@dataclass(frozen=True)
class ArrivalChunk:
    """Generated arrivals (already valid, sorted by ts): ServeGen windows, synthetic workloads."""

    ts: np.ndarray  # float64, s since trace start
    adapter: np.ndarray  # int, index into the reader's adapter names
    prompt_tokens: np.ndarray  # int
    output_tokens: np.ndarray  # int
    source: list[str]  # "<file>:<line>" per arrival


@dataclass(frozen=True)
class ReaderOptions:
    """Everything a reader may need besides the path; each reader uses only its part."""

    columns: dict[str, str] = field(default_factory=dict)  # target field -> column in the file
    max_line_bytes: int = 64 * 1024
    seed: int = 0
    adapters: int | None = None  # ServeGen: fold clients onto this many adapters
    lengths: str = "azure-conv"  # ServeGen: shipped trace to draw token lengths from
    start_s: float = 0.0  # ServeGen: first second of the trace to generate
    duration_s: float | None = None  # ServeGen: seconds to generate (None: to the end)
    rate_scale: float = 1.0  # ServeGen: multiply every client's rate


class TraceReader(Protocol):
    """A trace format: ``rows()`` may be called again to read the trace once more (``loop``)."""

    path: Path
    ts_unit: TsUnit
    has_adapters: bool  # rows carry adapter_id (else the popularity law assigns them)
    adapter_names: list[str] | None  # for ArrivalChunk indices

    def rows(self) -> Iterator[RawRow | ArrivalChunk]: ...


def parse_columns(text: str | None) -> dict[str, str]:
    """``'ts=arrival_s,prompt_tokens=in,output_tokens=out,adapter_id=model'`` -> {target: column}."""
    if not text:
        return {}
    mapping: dict[str, str] = {}
    known = REQUIRED_FIELDS + OPTIONAL_FIELDS
    for part in text.split(","):
        target, sep, column = (s.strip() for s in part.partition("="))
        if not sep or not target or not column:
            raise UserError(f"column mapping {text!r}: each entry must be FIELD=COLUMN, got {part!r}")
        if target not in known:
            raise UserError(f"column mapping {text!r}: unknown field {target!r}; fields are {', '.join(known)}")
        mapping[target] = column
    if "adapter_rank" in mapping and "adapter_id" not in mapping:
        raise UserError(f"column mapping {text!r}: adapter_rank needs an adapter_id column too")
    return mapping


def present_fields(available: Callable[[str], bool]) -> list[str]:
    """The fields a trace carries, in values-tuple order (a rank only together with an adapter id)."""
    found = [f for f in REQUIRED_FIELDS]
    if available("adapter_id"):
        found.append("adapter_id")
        if available("adapter_rank"):
            found.append("adapter_rank")
    return found
