"""Alibaba ServeGen per-client rate traces: a directory of ``chunk-<client>-trace.csv`` files.

Each line (no header) is one 600-s window of one client: ``window_start_s, rate_req_per_s, cv,
arrival_pattern (Gamma|Weibull|empty), p1, p2``. ServeGen gives rates, not requests, so arrivals are
generated inside each window as a renewal process whose gaps have mean 1/rate and the window's
coefficient of variation (Gamma or Weibull; exponential when the pattern is empty), with a seeded RNG.
Clients become adapters: ranked by their request count in the generated span, client of rank r is
``lora-(r mod N)`` (N = ``--adapters``, default the number of clients with traffic). ServeGen has no
token lengths: they are drawn from a shipped trace (Azure conv by default).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from adaptwin.ingest.readers.base import ArrivalChunk, RawRow, ReaderOptions, Reason, TraceFormatError, TsUnit
from adaptwin.ingest.readers.lines import LineError, decode, iter_lines, sniff
from adaptwin.ingest.readers.shipped import trace_lengths

WINDOW_S = 600.0
PATTERNS = ("Gamma", "Weibull", "")
_CHUNK = re.compile(r"chunk-(.+)-trace\.csv")
_EXPECTED = "a directory of ServeGen chunk-<client>-trace.csv files (window_start_s,rate,cv,pattern,p1,p2)"


@dataclass(frozen=True)
class ClientTrace:
    """One client's windows (the good lines of its chunk file)."""

    client: str
    file: Path
    line: np.ndarray  # 1-based line of each window
    start: np.ndarray  # window start, s
    rate: np.ndarray  # req/s
    cv: np.ndarray  # coefficient of variation of the gaps
    pattern: list[str]


def chunk_files(path: Path) -> list[Path]:
    """The chunk files of a ServeGen directory (or the one file given), in client order."""
    files = [path] if path.is_file() else sorted(path.glob("chunk-*-trace.csv"))
    if not files:
        raise TraceFormatError(path, "holds no chunk-<client>-trace.csv files", _EXPECTED)

    def order(p: Path) -> tuple[int, str]:
        m = _CHUNK.fullmatch(p.name)
        client = m.group(1) if m else p.stem
        return (int(client) if client.isdigit() else 1 << 62, client)
    return sorted(files, key=order)


def parse_window(text: str) -> tuple[float, float, float, str]:
    """(start, rate, cv, pattern) of one line; ValueError says what is wrong."""
    fields = text.split(",")
    if len(fields) != 6:
        raise ValueError(f"expected 6 fields, got {len(fields)}")
    start, rate, cv = (float(x) for x in fields[:3])
    pattern = fields[3].strip()
    if not all(map(math.isfinite, (start, rate, cv))):
        raise ValueError("window start, rate and cv must be finite")
    if rate < 0 or cv < 0 or start < 0:
        raise ValueError("window start, rate and cv must be >= 0")
    if pattern not in PATTERNS:
        raise ValueError(f"arrival pattern {pattern!r} is not Gamma, Weibull or empty")
    return start, rate, cv, pattern


def read_client(file: Path, max_line_bytes: int) -> tuple[ClientTrace, list[RawRow]]:
    """A client's good windows, and its bad lines as rows with the reason."""
    m = _CHUNK.fullmatch(file.name)
    client = m.group(1) if m else file.stem
    windows: list[tuple[int, float, float, float]] = []  # (line, start, rate, cv)
    patterns: list[str] = []
    bad: list[RawRow] = []
    for line, raw in iter_lines(file, max_line_bytes):
        try:
            text = decode(raw, max_line_bytes)
        except LineError as err:
            bad.append(RawRow(line, raw, None, (err.reason, str(err)), str(file)))
            continue
        if not text.strip():
            continue
        try:
            start, rate, cv, pattern = parse_window(text)
        except ValueError as err:
            reason = Reason.OUT_OF_RANGE if "must be" in str(err) else Reason.UNPARSABLE
            bad.append(RawRow(line, raw, None, (reason, f"bad ServeGen window: {err}"), str(file)))
            continue
        windows.append((line, start, rate, cv))
        patterns.append(pattern)
    cols = np.array(windows, dtype=np.float64).reshape(-1, 4)
    return ClientTrace(client, file, cols[:, 0].astype(np.int64), cols[:, 1], cols[:, 2], cols[:, 3], patterns), bad


def client_request_counts(path: Path, max_line_bytes: int = 64 * 1024) -> dict[str, float]:
    """Expected requests per client over the whole trace (sum of rate x window)."""
    return {c.client: float(c.rate.sum() * WINDOW_S)
            for c in (read_client(f, max_line_bytes)[0] for f in chunk_files(path))}


# Weibull shape from the coefficient of variation: log(1 + cv^2) = lgamma(1+2/k) - 2 lgamma(1+1/k),
# decreasing in k; tabulated once per reader and inverted by interpolation.
def _weibull_table() -> tuple[np.ndarray, np.ndarray]:
    k = np.logspace(np.log10(0.02), np.log10(50.0), 4000)
    lg = np.vectorize(math.lgamma)
    return (lg(1 + 2 / k) - 2 * lg(1 + 1 / k))[::-1], k[::-1]


def _gaps(rng: np.random.Generator, pattern: str, rate: float, cv: float, n: int,
          weibull: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """``n`` inter-arrival gaps with mean 1/rate and the given cv."""
    mean = 1.0 / rate
    if cv < 1e-6:
        return np.full(n, mean)
    if pattern == "Gamma":
        shape = 1.0 / (cv * cv)
        return rng.gamma(shape, mean / shape, size=n)
    if pattern == "Weibull":
        k = float(np.interp(math.log1p(cv * cv), *weibull))
        return rng.weibull(k, size=n) * (mean / math.gamma(1 + 1 / k))
    return rng.exponential(mean, size=n)


def window_arrivals(rng: np.random.Generator, pattern: str, rate: float, cv: float,
                    weibull: tuple[np.ndarray, np.ndarray], length: float = WINDOW_S) -> np.ndarray:
    """Arrival offsets in [0, length): the first after one gap, as in the paper's Poisson client."""
    expected = rate * length
    n = int(expected + 4 * math.sqrt(expected) * max(cv, 1.0) + 16)
    times = np.cumsum(_gaps(rng, pattern, rate, cv, n, weibull))
    while times[-1] < length:  # rare: draw more gaps until the window is covered
        more = np.cumsum(_gaps(rng, pattern, rate, cv, n, weibull)) + times[-1]
        times = np.concatenate([times, more])
    return times[: np.searchsorted(times, length)]


class ServeGenReader:
    ts_unit = TsUnit.SECONDS
    has_adapters = True

    def __init__(self, path: Path, options: ReaderOptions):
        self.path = path
        if path.is_file():
            sniff(path)
        elif not path.is_dir():
            raise TraceFormatError(path, "does not exist", _EXPECTED)
        self.options = options
        self.clients: list[ClientTrace] = []
        self.bad_rows: list[RawRow] = []
        for file in chunk_files(path):
            client, bad = read_client(file, options.max_line_bytes)
            self.clients.append(client)
            self.bad_rows.extend(bad)
        if not any(len(c.line) for c in self.clients):
            raise TraceFormatError(path, "has no readable ServeGen window line", _EXPECTED)
        self.start = options.start_s
        self.end = math.inf if options.duration_s is None else options.start_s + options.duration_s
        counts = np.array([self._requests_in_span(c) for c in self.clients])
        ranked = np.argsort(-counts, kind="stable")  # most requests first
        active = int((counts > 0).sum())
        n_adapters = options.adapters or max(active, 1)
        self.client_adapter = np.empty(len(self.clients), dtype=np.int64)
        self.client_adapter[ranked] = np.arange(len(self.clients)) % n_adapters
        self.adapter_names = [f"lora-{k}" for k in range(n_adapters)]

    def _requests_in_span(self, c: ClientTrace) -> float:
        overlap = np.clip(np.minimum(c.start + WINDOW_S, self.end) - np.maximum(c.start, self.start), 0, None)
        return float((c.rate * overlap).sum())

    def rows(self) -> Iterator[RawRow | ArrivalChunk]:
        yield from self.bad_rows
        seeds = np.random.SeedSequence([self.options.seed, 0x5E27])
        arrivals_rng, lengths_rng = (np.random.default_rng(s) for s in seeds.spawn(2))
        lengths = trace_lengths(self.options.lengths)
        weibull = _weibull_table()
        scale = self.options.rate_scale
        windows = np.unique(np.concatenate([c.start for c in self.clients]))
        windows = windows[(windows + WINDOW_S > self.start) & (windows < self.end)]
        at = [dict(zip(c.start.tolist(), range(len(c.line)))) for c in self.clients]
        for ws in windows.tolist():
            times, adapters, labels, label_of = [], [], [], []
            for ci, c in enumerate(self.clients):
                i = at[ci].get(ws)
                if i is None or c.rate[i] * scale <= 0:
                    continue
                t = ws + window_arrivals(arrivals_rng, c.pattern[i], float(c.rate[i]) * scale, float(c.cv[i]), weibull)
                t = t[(t >= self.start) & (t < self.end)]
                if len(t):
                    times.append(t)
                    adapters.append(np.full(len(t), self.client_adapter[ci]))
                    label_of.append(np.full(len(t), len(labels)))
                    labels.append(f"{c.file.name}:{int(c.line[i])}")
            if not times:
                continue
            ts = np.concatenate(times)
            order = np.argsort(ts, kind="stable")
            prompt, output = lengths.sample(lengths_rng, len(ts))
            yield ArrivalChunk(ts=ts[order] - self.start, adapter=np.concatenate(adapters)[order],
                               prompt_tokens=prompt, output_tokens=output,
                               source=[labels[j] for j in np.concatenate(label_of)[order].tolist()])
