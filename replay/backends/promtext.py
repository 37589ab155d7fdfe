"""A parser for the Prometheus text exposition format (0.0.4, and the OpenMetrics text that vLLM may serve).

Small and strict where it matters: metric and label names per the spec (colons allowed in metric names),
label values with ``\\\\``, ``\\"`` and ``\\n`` escapes, ``+Inf``/``-Inf``/``NaN`` values, optional timestamps,
``# HELP``/``# TYPE`` lines, other comments and ``# EOF`` ignored. A malformed line raises :class:`PromParseError`
naming the line, never yields a wrong sample.

>>> fams = parse('# TYPE vllm:num_requests_running gauge\\n'
...              'vllm:num_requests_running{engine="0",model_name="m"} 3.0\\n')
>>> fams["vllm:num_requests_running"].type, fams["vllm:num_requests_running"].samples[0].value
('gauge', 3.0)
>>> next(iter_samples('x{a="b\\\\"c",} +Inf 1700000000000')).labels
{'a': 'b"c'}
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterator

__all__ = ["Sample", "Family", "PromParseError", "parse", "iter_samples"]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_SUFFIXES = ("_total", "_created", "_bucket", "_count", "_sum", "_gcount", "_gsum", "_info")


class PromParseError(ValueError):
    """A line that is not valid exposition text."""


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict
    value: float
    timestamp: float | None = None


@dataclass
class Family:
    name: str
    type: str = "untyped"
    help: str = ""
    samples: list = field(default_factory=list)


def _unescape_help(text: str) -> str:
    return text.replace("\\\\", "\x00").replace("\\n", "\n").replace("\x00", "\\")


def _value(text: str, line: str) -> float:
    t = text.strip()
    low = t.lower()
    if low in ("+inf", "inf"):
        return math.inf
    if low == "-inf":
        return -math.inf
    if low == "nan":
        return math.nan
    try:
        return float(t)
    except ValueError:
        raise PromParseError(f"bad sample value {text!r} in line {line!r}") from None


def _parse_sample(line: str) -> Sample:
    m = _NAME.match(line)
    if not m:
        raise PromParseError(f"bad metric name in line {line!r}")
    name = m.group(0)
    i = m.end()
    labels: dict[str, str] = {}
    n = len(line)
    if i < n and line[i] == "{":
        i += 1
        while True:
            while i < n and line[i] in " \t":
                i += 1
            if i < n and line[i] == "}":
                i += 1
                break
            lm = _LABEL.match(line, i)
            if not lm:
                raise PromParseError(f"bad label name at column {i} in line {line!r}")
            key = lm.group(0)
            i = lm.end()
            while i < n and line[i] in " \t":
                i += 1
            if line[i:i + 2] != '="':
                raise PromParseError(f"expected =\" after label {key!r} in line {line!r}")
            i += 2
            buf = []
            while True:
                if i >= n:
                    raise PromParseError(f"unterminated label value in line {line!r}")
                c = line[i]
                if c == "\\":
                    nxt = line[i + 1:i + 2]
                    buf.append({"n": "\n", "\\": "\\", '"': '"'}.get(nxt, "\\" + nxt))
                    i += 2
                elif c == '"':
                    i += 1
                    break
                else:
                    buf.append(c)
                    i += 1
            if key in labels:
                raise PromParseError(f"label {key!r} repeated in line {line!r}")
            labels[key] = "".join(buf)
            while i < n and line[i] in " \t":
                i += 1
            if i < n and line[i] == ",":
                i += 1
            elif i < n and line[i] == "}":
                i += 1
                break
            else:
                raise PromParseError(f"expected , or }} after label {key!r} in line {line!r}")
    rest = line[i:].split()
    if not rest or len(rest) > 2 or (i < n and line[i] not in " \t"):
        raise PromParseError(f"expected a value (and optional timestamp) after the labels in line {line!r}")
    value = _value(rest[0], line)
    ts = None
    if len(rest) == 2:
        try:
            ts = float(rest[1])
        except ValueError:
            raise PromParseError(f"bad timestamp {rest[1]!r} in line {line!r}") from None
    return Sample(name, labels, value, ts)


def iter_samples(text: str) -> Iterator[Sample]:
    """Every sample in ``text``, in order (comments skipped)."""
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            yield _parse_sample(line)


def _family_of(name: str, families: dict[str, Family]) -> str:
    if name in families:
        return name
    for suf in _SUFFIXES:
        if name.endswith(suf) and name[: -len(suf)] in families:
            return name[: -len(suf)]
    return name


def parse(text: str) -> dict[str, Family]:
    """Families by name (``# TYPE`` name; ``x_total``, ``x_bucket`` … belong to family ``x``)."""
    families: dict[str, Family] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            parts = line[1:].strip().split(None, 2)
            if len(parts) >= 2 and parts[0] in ("HELP", "TYPE"):
                if not _NAME.fullmatch(parts[1]):
                    raise PromParseError(f"bad metric name in line {line!r}")
                fam = families.setdefault(parts[1], Family(parts[1]))
                arg = parts[2] if len(parts) > 2 else ""
                if parts[0] == "TYPE":
                    fam.type = arg.strip()
                else:
                    fam.help = _unescape_help(arg)
            continue
        s = _parse_sample(line)
        fname = _family_of(s.name, families)
        families.setdefault(fname, Family(fname)).samples.append(s)
    return families
