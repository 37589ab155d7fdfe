"""Mooncake traces: JSON lines ``{"timestamp": ms, "input_length", "output_length", "hash_ids": [...]}``.

``hash_ids`` (prefix blocks) is not part of a request record and is not checked. Other JSONL traces
work too with a ``--columns`` mapping (e.g. ``adapter_id=model``); their ``ts`` is read as milliseconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

from adaptwin.ingest.readers.base import RawRow, ReaderOptions, Reason, TraceFormatError, TsUnit, present_fields
from adaptwin.ingest.readers.lines import LineError, decode, first_lines, iter_lines, sniff

COLUMNS = {"ts": "timestamp", "prompt_tokens": "input_length", "output_tokens": "output_length"}
# The shipped traces' exact line shape (as json.dumps writes it). A line that matches is valid JSON, so
# its three numbers can be taken without json.loads, which costs ~10 us on a line with a long hash_ids
# list; the match costs ~1.3 us (possessive quantifiers: no backtracking). Anything else: json.loads.
_INT = rb"(?:[1-9][0-9]*+|0)"
_CANONICAL = re.compile(
    rb'\{"timestamp": (' + _INT + rb'), "input_length": (' + _INT + rb'), "output_length": (' + _INT
    + rb'), "hash_ids": \[(?:' + _INT + rb'(?:, ' + _INT + rb')*+)?+\]\}')


def canonical_values(raw: bytes) -> tuple[int, int, int] | None:
    """(timestamp, input_length, output_length) of a canonical line, else None."""
    m = _CANONICAL.fullmatch(raw)
    if m is None:
        return None
    ts, prompt, output = m.groups()
    return int(ts), int(prompt), int(output)


_EXPECTED = 'JSON lines like {"timestamp": 0, "input_length": 100, "output_length": 20}'


def looks_like(line: str, columns: dict[str, str]) -> bool:
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and all(c in obj for c in columns.values())


class MooncakeReader:
    """Rows of a JSONL trace; a line that is not a JSON object with the fields is dead-lettered."""

    ts_unit = TsUnit.MILLISECONDS
    adapter_names = None

    def __init__(self, path: Path, options: ReaderOptions):
        self.path = path
        self.max_line_bytes = options.max_line_bytes
        self.columns = {**COLUMNS, **options.columns}
        self.fields = present_fields(lambda name: name in self.columns)
        self.has_adapters = "adapter_id" in self.fields
        sniff(path)
        sample = first_lines(path, 20, options.max_line_bytes)
        if not any(looks_like(line, self.columns) for line in sample):
            keys = ", ".join(repr(c) for c in self.columns.values())
            raise TraceFormatError(path, f"none of its first lines is a JSON object with {keys}", _EXPECTED)

    def rows(self) -> Iterator[RawRow]:
        fast = self.columns == COLUMNS
        keys = [self.columns[name] for name in self.fields]
        limit = self.max_line_bytes
        for line, raw in iter_lines(self.path, limit):
            if fast and len(raw) <= limit and (values := canonical_values(raw)) is not None:
                yield RawRow(line, raw, values)
                continue
            try:
                text = decode(raw, limit)
            except LineError as err:
                yield RawRow(line, raw, None, (err.reason, str(err)))
                continue
            if not text or text.isspace():
                continue
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError) as err:
                yield RawRow(line, raw, None, (Reason.UNPARSABLE, f"not valid JSON ({str(err)[:80]})"))
                continue
            if not isinstance(obj, dict):
                yield RawRow(line, raw, None, (Reason.UNPARSABLE, f"a JSON {type(obj).__name__}, not an object"))
                continue
            yield RawRow(line, raw, tuple(obj.get(key) for key in keys))
