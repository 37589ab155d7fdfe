"""Row validation: every raw row becomes a REQUEST record or a DEADLETTER record with a reason.

Checked: missing fields, wrong types, NaN/inf, token counts out of bounds, timestamps going back by
more than a tolerance, adapters outside the given set (plus, in the readers: lines over the size
limit, bytes that are not UTF-8, lines that do not parse). The tolerance default (1 s) was chosen on
the shipped traces: none of them goes back at all (Azure code/conv, both Mooncake traces were measured
row by row), while Mooncake's conversation trace moves in coarse ~3-s steps, so 1 s only ever forgives
small jitter in other traces. A row late by less than the tolerance is kept with its own ``ts``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from adaptwin.ingest.popularity import AdapterAssigner
from adaptwin.ingest.readers.base import OPTIONAL_FIELDS, REQUIRED_FIELDS, RawRow, Reason, TsUnit
from adaptwin.schemas import SCHEMA_VERSION

__all__ = ["Limits", "Reason", "RowValidator", "RowRejected", "dead_letter"]

_EPOCH = datetime(1970, 1, 1)
_PAYLOAD_CHARS = 1024  # an oversized line is kept in the dead letter only up to here


@dataclass(frozen=True)
class Limits:
    """Bounds a row must respect; anything outside is dead-lettered."""

    max_line_bytes: int = 64 * 1024
    min_tokens: int = 1  # a request needs a prompt and at least one output token
    max_prompt_tokens: int = 1_000_000
    max_output_tokens: int = 1_000_000
    max_rank: int = 1024
    ts_tolerance_s: float = 1.0  # how far ts may go back before a row is refused


class RowRejected(Exception):
    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason


def dead_letter(run_id: str, file: str, line: int | None, reason: Reason, detail: str, raw: bytes | None,
                values: tuple | None = None) -> dict:
    """A DEADLETTER record (stage ingest); the payload is the raw line, invalid bytes escaped."""
    if raw is not None:
        payload = raw.decode("utf-8", "backslashreplace")
    else:  # Parquet: the row's values
        payload = json.dumps(dict(zip(REQUIRED_FIELDS + OPTIONAL_FIELDS, values or ())), default=str)
    if len(payload) > _PAYLOAD_CHARS:
        payload = payload[:_PAYLOAD_CHARS] + f"… (truncated, {len(payload)}+ characters)"
    return {"v": SCHEMA_VERSION, "run_id": run_id, "stage": "ingest", "source": file, "line": line,
            "reason": f"{reason}: {detail}", "payload": payload}


def _number(name: str, value: Any) -> float:
    """A finite number from a JSON/Parquet number or CSV text."""
    if type(value) is float or type(value) is int:
        number = float(value)
    elif value is None or value == "" or (isinstance(value, str) and value.isspace()):
        raise RowRejected(Reason.MISSING_FIELD, f"{name} is missing")
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            raise RowRejected(Reason.BAD_TYPE, f"{name} must be a number, got {value[:40]!r}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise RowRejected(Reason.BAD_TYPE, f"{name} must be a number, got {str(value)[:40]!r}")
    if not math.isfinite(number):
        raise RowRejected(Reason.NOT_FINITE, f"{name} must be finite, got {str(value)[:40]!r}")
    return number


def _whole(name: str, value: Any) -> int:
    """A whole number from CSV text like "120" (or "120.0"), or a JSON/Parquet number."""
    if type(value) is int:
        return value
    if type(value) is str:
        try:
            return int(value)
        except ValueError:
            pass
    number = _number(name, value)
    if not number.is_integer():
        raise RowRejected(Reason.BAD_TYPE, f"{name} must be a whole number, got {str(value)[:40]!r}")
    return int(number)


def _seconds_since(name: str, value: Any) -> float:
    """Epoch seconds of a datetime string (naive = UTC) or of a number already in epoch seconds."""
    if type(value) is not str:
        return _number(name, value)
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        if not value.strip():
            raise RowRejected(Reason.MISSING_FIELD, f"{name} is missing") from None
        raise RowRejected(Reason.BAD_TYPE, f"{name} must be a datetime, got {value[:40]!r}") from None
    if dt.tzinfo is not None:
        dt = dt.astimezone(timezone.utc).replace(tzinfo=None)
    return (dt - _EPOCH).total_seconds()


class RowValidator:
    """Checks the rows of one pass over one trace; keeps the time origin and the latest ts.

    ``first_request`` numbers requests (``request_id = f"{run_id}-{n}"``) across passes; ``ts_offset``
    shifts a looped pass; rows whose ts falls outside [start_s, start_s + duration_s) are skipped.
    """

    def __init__(self, *, run_id: str, file: str, ts_unit: TsUnit, limits: Limits, assigner: AdapterAssigner,
                 has_adapters: bool, adapter_set: frozenset[str] | None = None, first_request: int = 0,
                 ts_offset: float = 0.0, start_s: float = 0.0, duration_s: float | None = None):
        self.run_id = run_id
        self.file = file
        self.label = file.replace("\\", "/").rsplit("/", 1)[-1]  # request source "<file name>:<line>"
        self.ts_unit = ts_unit
        self.limits = limits
        self.assigner = assigner
        self.has_adapters = has_adapters
        self.adapter_set = adapter_set
        self.next_request = first_request
        self.ts_offset = ts_offset
        self.start_s = start_s
        self.end_s = math.inf if duration_s is None else start_s + duration_s
        self.origin: float | None = None  # epoch seconds of the first accepted datetime row
        self.origin_dt: datetime | None = None  # the same as a naive UTC datetime
        self.auto_kind: str | None = None  # AUTO ts: "seconds" or "datetime", fixed by the first good row
        self.latest_ts = -math.inf
        self.skipped = 0

    def check(self, row: RawRow, requests: list[dict], dead: list[dict]) -> Reason | None:
        """Append the row's REQUEST to ``requests`` or its DEADLETTER to ``dead`` (skipped rows: neither).
        Returns the dead-letter reason, or None."""
        if row.error is not None:
            reason, detail = row.error
        else:
            try:
                record = self._request(row)
            except RowRejected as err:
                reason, detail = err.reason, str(err)
            else:
                if record is not None:
                    requests.append(record)
                return None
        dead.append(dead_letter(self.run_id, row.file or self.file, row.line, reason, detail, row.raw, row.values))
        return reason

    def _ts(self, value: Any) -> float:
        """Seconds since the trace start (datetimes: epoch seconds until the origin is set), before the
        slice and loop offset."""
        unit = self.ts_unit
        if unit is TsUnit.AUTO:
            unit = self._auto_unit(value)
        if unit is TsUnit.DATETIME:
            epoch = _seconds_since("ts", value)
            return epoch if self.origin is None else epoch - self.origin
        ts = value if type(value) is int else _number("ts", value)
        if unit is TsUnit.MILLISECONDS:
            ts = ts / 1000.0
        if ts < 0:
            raise RowRejected(Reason.OUT_OF_RANGE, f"ts={ts} s is negative")
        return float(ts)

    def _auto_unit(self, value: Any) -> TsUnit:
        """AUTO ts: seconds or a datetime, as the first accepted row had it."""
        kind = "seconds"
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                kind = "datetime" if value.strip() else "seconds"  # empty: _number says it is missing
        if self.auto_kind is None:
            self.auto_kind = kind  # undone in _request when the row is refused
        elif kind != self.auto_kind:
            raise RowRejected(Reason.BAD_TYPE, f"ts {str(value)[:40]!r} is a {kind} but earlier rows' ts "
                              f"are {self.auto_kind}")
        return TsUnit.SECONDS if kind == "seconds" else TsUnit.DATETIME

    def _request(self, row: RawRow) -> dict | None:
        values = row.values
        limits = self.limits
        auto_was_open = self.auto_kind is None
        try:
            ts = values[0]
            if self.ts_unit is TsUnit.DATETIME and type(ts) is str and self.origin is not None:
                try:  # the Azure fast path of _ts
                    ts = (datetime.fromisoformat(ts) - self.origin_dt).total_seconds()
                except (ValueError, TypeError):
                    ts = self._ts(ts)
            else:
                ts = self._ts(ts)
            prompt, output = values[1], values[2]
            if type(prompt) is not int:
                prompt = _whole("prompt_tokens", prompt)
            if type(output) is not int:
                output = _whole("output_tokens", output)
            if not limits.min_tokens <= prompt <= limits.max_prompt_tokens:
                raise RowRejected(Reason.OUT_OF_RANGE, f"prompt_tokens={prompt} is outside "
                                  f"[{limits.min_tokens}, {limits.max_prompt_tokens}]")
            if not limits.min_tokens <= output <= limits.max_output_tokens:
                raise RowRejected(Reason.OUT_OF_RANGE, f"output_tokens={output} is outside "
                                  f"[{limits.min_tokens}, {limits.max_output_tokens}]")
            named = self._named_adapter(values) if self.has_adapters else None
            if ts < self.latest_ts - limits.ts_tolerance_s:
                raise RowRejected(Reason.TIME_BACKWARDS, f"ts={ts:.3f} s is {self.latest_ts - ts:.3f} s before an "
                                  f"earlier row (tolerance {limits.ts_tolerance_s} s)")
        except RowRejected:
            if auto_was_open:
                self.auto_kind = None  # a refused row must not decide how later rows' ts are read
            raise
        # accepted: commit the time origin and the latest ts
        if self.origin is None and (self.ts_unit is TsUnit.DATETIME or self.auto_kind == "datetime"):
            self.origin, ts = ts, 0.0
            self.origin_dt = _EPOCH + timedelta(seconds=self.origin)
        if ts > self.latest_ts:
            self.latest_ts = ts
        if ts < self.start_s or ts >= self.end_s:
            if ts >= 0 or self.start_s > 0:
                self.skipped += 1
                return None
            ts = 0.0  # a row before the first one by less than the tolerance
        adapter, rank = named if named is not None else self.assigner.next()
        n = self.next_request
        self.next_request = n + 1
        return {"v": SCHEMA_VERSION, "request_id": f"{self.run_id}-{n}", "run_id": self.run_id,
                "ts": ts - self.start_s + self.ts_offset, "adapter_id": adapter, "adapter_rank": rank,
                "prompt_tokens": prompt, "output_tokens": output, "source": f"{self.label}:{row.line}"}

    def _named_adapter(self, values: tuple) -> tuple[str, int]:
        """(adapter, rank) of a trace that names its adapters."""
        adapter = values[3]
        if adapter is None or adapter == "":
            raise RowRejected(Reason.MISSING_FIELD, "adapter_id is missing")
        if isinstance(adapter, bool) or not isinstance(adapter, (str, int)):
            raise RowRejected(Reason.BAD_TYPE, f"adapter_id must be a string, got {type(adapter).__name__}")
        adapter = str(adapter).strip()
        if self.adapter_set is not None and adapter not in self.adapter_set:
            raise RowRejected(Reason.UNKNOWN_ADAPTER, f"adapter {adapter[:60]!r} is not one of the "
                              f"{len(self.adapter_set)} adapters given")
        if len(values) < 5 or values[4] is None or values[4] == "":
            return adapter, self.assigner.rank_of(adapter)
        rank = _whole("adapter_rank", values[4])
        if not 1 <= rank <= self.limits.max_rank:
            raise RowRejected(Reason.OUT_OF_RANGE, f"adapter_rank={rank} is outside [1, {self.limits.max_rank}]")
        return adapter, rank
