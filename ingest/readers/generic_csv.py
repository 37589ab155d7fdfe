"""Generic CSV traces: a header row, then one request per line, columns chosen by a mapping.

``--columns ts=arrival_s,prompt_tokens=in,output_tokens=out,adapter_id=model``; a field without an
entry is looked for under its own name. ``ts`` may be seconds since the trace start or a datetime.
A row is one line: quoted fields are understood, newlines inside quotes are not.
"""

from __future__ import annotations

import csv
from operator import itemgetter
from pathlib import Path
from typing import Iterator

from adaptwin.ingest.readers.base import (
    OPTIONAL_FIELDS, REQUIRED_FIELDS, RawRow, ReaderOptions, Reason, TraceFormatError, TsUnit, present_fields,
)
from adaptwin.ingest.readers.lines import LineError, decode, iter_lines, sniff


def split_csv_line(text: str) -> list[str]:
    """One CSV line's fields; the quote-aware parser only when the line has quotes (it is 10x slower)."""
    if '"' in text:
        return next(csv.reader([text]), [])
    return text.split(",")


def read_header(path: Path, max_line_bytes: int) -> list[str]:
    """The header fields, stripped (and without a UTF-8 byte-order mark)."""
    sniff(path)
    for _, raw in iter_lines(path, max_line_bytes):
        try:
            text = decode(raw, max_line_bytes)
        except LineError as err:
            raise TraceFormatError(path, f"its header line is unreadable ({err})") from None
        return [c.strip() for c in split_csv_line(text.lstrip("\ufeff"))]
    raise TraceFormatError(path, "is empty", "a header line")


class CsvReader:
    """Rows of a CSV file whose header names the columns in ``columns`` (field -> column)."""

    def __init__(self, path: Path, options: ReaderOptions, *, columns: dict[str, str] | None = None,
                 ts_unit: TsUnit = TsUnit.AUTO, expected: str = ""):
        self.path = path
        self.ts_unit = ts_unit
        self.adapter_names = None
        self.max_line_bytes = options.max_line_bytes
        mapping = dict(options.columns if columns is None else columns)
        header = read_header(path, options.max_line_bytes)
        self.width = len(header)
        missing = []
        for name in REQUIRED_FIELDS + OPTIONAL_FIELDS:
            column = mapping.get(name, name)
            if column not in header and (name in REQUIRED_FIELDS or name in mapping):
                missing.append(f"{column!r} (for {name})" if column != name else repr(column))
        if missing:
            raise TraceFormatError(
                path, f"missing column(s) {', '.join(missing)}; its header is {','.join(header)[:200]!r}",
                expected or "a header with ts,prompt_tokens,output_tokens[,adapter_id] or a --columns mapping "
                "such as ts=arrival_s,prompt_tokens=in,output_tokens=out")
        self.fields = present_fields(lambda name: mapping.get(name, name) in header)
        self.index = [header.index(mapping.get(name, name)) for name in self.fields]
        self.has_adapters = "adapter_id" in self.fields

    def rows(self) -> Iterator[RawRow]:
        pick = itemgetter(*self.index)  # the fields, as a tuple, in one C call
        width, limit = self.width, self.max_line_bytes
        lines = iter_lines(self.path, limit)
        next(lines, None)  # the header
        for line, raw in lines:
            try:
                if len(raw) > limit:
                    raise UnicodeError
                text = raw.decode()  # inline fast path of lines.decode()
            except UnicodeError:
                try:
                    decode(raw, limit)
                except LineError as err:
                    yield RawRow(line, raw, None, (err.reason, str(err)))
                continue
            if '"' in text:
                fields = next(csv.reader([text]), [])
            else:
                fields = text.split(",")
            if len(fields) != width:
                if not text or text.isspace():
                    continue  # blank lines are not rows
                yield RawRow(line, raw, None, (Reason.UNPARSABLE, f"expected {width} fields, got {len(fields)}"))
                continue
            yield RawRow(line, raw, pick(fields))
