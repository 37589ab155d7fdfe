"""Synthetic workloads from a spec string, seeded and vectorised.

Grammar: ``KIND[:KEY=VALUE;KEY=VALUE…]``, lists comma-separated, e.g.
``paper:rates=0.1,0.05,0.025;ranks=8,16,32;adapters=96;duration=3600;model=llama-3.1-8b-instruct;seed=0``.

* ``paper`` — the paper's workload (paper-digest §1.2): each adapter an independent Poisson stream
  (first arrival after one exponential gap); adapter k gets ``rates[k mod len]`` and ``ranks[k mod len]``,
  then which adapter carries which (rate, rank) is shuffled with the seed. Token lengths: the twin's
  ShareGPT table for ``model``.
* ``bursty`` — Markov-modulated Poisson: the total rate alternates between a calm and a burst state
  (``burst`` times higher), sojourns exponential with means ``off`` and ``on`` s; mean rate ``rate``.
* ``diurnal`` — Poisson with rate ``rate·(1 + amplitude·sin(2π t/period + phase))`` (period: the duration).
* ``shifting`` — Poisson at ``rate`` whose popularity ranking rotates by ``step`` adapters every ``shift`` s.

bursty, diurnal and shifting pick adapters by ``popularity`` (see popularity.py) and draw token lengths
from a shipped trace (``lengths``, Azure conv by default); ``lengths=sharegpt`` uses the twin's table,
any kind may name a shipped trace instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np

from adaptwin.cliutil import UserError
from adaptwin.ingest.popularity import AdapterSet, Popularity

KINDS = ("paper", "bursty", "diurnal", "shifting")
_COMMON = {"adapters", "duration", "seed", "ranks", "lengths", "model"}
KEYS = {
    "paper": _COMMON | {"rates"},
    "bursty": _COMMON | {"rate", "popularity", "burst", "on", "off"},
    "diurnal": _COMMON | {"rate", "popularity", "amplitude", "period", "phase"},
    "shifting": _COMMON | {"rate", "popularity", "shift", "step"},
}
SHAREGPT = "sharegpt"


class LengthSource(Protocol):
    """Paired token lengths: ``adaptwin.twin.lengths.load_lengths(model)`` or a shipped trace's pool."""

    def sample(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass(frozen=True)
class SyntheticSpec:
    kind: str
    adapters: int = 32
    duration: float = 3600.0  # s
    seed: int | None = None  # None: the ingest config's seed
    ranks: tuple[int, ...] = (8,)
    lengths: str | None = None  # "sharegpt" or a shipped trace; None: paper -> sharegpt, others -> azure-conv
    model: str = "llama-3.1-8b-instruct"  # whose ShareGPT token counts (lengths=sharegpt)
    rates: tuple[float, ...] = (0.1, 0.05, 0.025)  # paper: req/s per adapter, round-robin
    rate: float = 5.0  # bursty/diurnal/shifting: mean total req/s
    popularity: str = "zipf:1.1"
    burst: float = 4.0  # bursty: burst-state rate / calm-state rate
    on: float = 30.0  # bursty: mean burst length, s
    off: float = 120.0  # bursty: mean calm length, s
    amplitude: float = 0.5  # diurnal: 0..1
    period: float | None = None  # diurnal: s (None: the duration)
    phase: float = 0.0  # diurnal: radians
    shift: float = 600.0  # shifting: s between rotations
    step: int = 1  # shifting: adapters the ranking moves per rotation

    @property
    def length_source(self) -> str:
        return self.lengths or (SHAREGPT if self.kind == "paper" else "azure-conv")

    @classmethod
    def parse(cls, text: str) -> SyntheticSpec:
        kind, _, body = text.strip().partition(":")
        if kind not in KINDS:
            raise UserError(f"synthetic spec {text!r}: unknown kind {kind!r}; use one of {', '.join(KINDS)} "
                            "(e.g. paper:rates=0.1,0.05,0.025;ranks=8,16,32;adapters=96;duration=3600)")
        types = {f.name: f.type for f in fields(cls)}
        values: dict = {"kind": kind}
        for item in filter(None, (p.strip() for p in body.split(";"))):
            key, sep, raw = (s.strip() for s in item.partition("="))
            if not sep or key not in KEYS[kind]:
                raise UserError(f"synthetic spec {text!r}: {item!r} is not KEY=VALUE with a key of {kind} "
                                f"({', '.join(sorted(KEYS[kind]))})")
            values[key] = _convert(text, key, raw, types[key])
        spec = cls(**values)
        spec._check(text)
        return spec

    def _check(self, text: str) -> None:
        problems = []
        if self.adapters < 1:
            problems.append("adapters must be >= 1")
        if not self.duration > 0 or not math.isfinite(self.duration):
            problems.append("duration must be > 0")
        if not self.ranks or min(self.ranks) < 1:
            problems.append("ranks must be positive integers")
        if not self.rates or min(self.rates) < 0 or not all(map(math.isfinite, self.rates)):
            problems.append("rates must be finite and >= 0")
        if not self.rate >= 0 or not math.isfinite(self.rate):
            problems.append("rate must be finite and >= 0")
        if not self.burst >= 1 or not self.on > 0 or not self.off > 0:
            problems.append("burst must be >= 1, on and off > 0")
        if not 0 <= self.amplitude <= 1 or (self.period is not None and not self.period > 0):
            problems.append("amplitude must be in [0, 1], period > 0")
        if not self.shift > 0:
            problems.append("shift must be > 0")
        if problems:
            raise UserError(f"synthetic spec {text!r}: {'; '.join(problems)}")
        Popularity.parse(self.popularity)


def _convert(text: str, key: str, raw: str, type_: str):
    try:
        if "tuple[int" in type_:
            return tuple(int(x) for x in raw.split(","))
        if "tuple[float" in type_:
            return tuple(float(x) for x in raw.split(","))
        if type_.startswith("int"):
            return int(raw)
        if type_.startswith("float"):
            return float(raw)
    except ValueError:
        raise UserError(f"synthetic spec {text!r}: {key}={raw!r} is not a {type_.split(' ')[0]}") from None
    return raw


@dataclass(frozen=True)
class Workload:
    """Generated requests, sorted by ts, plus the adapters they address."""

    ts: np.ndarray  # s since start
    adapter: np.ndarray  # index into adapters.names
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    adapters: AdapterSet
    rates: np.ndarray | None = None  # paper: each adapter's rate after the shuffle


def generate(spec: SyntheticSpec, lengths: LengthSource, seed: int = 0) -> Workload:
    """The workload of ``spec`` (its own seed wins over ``seed``)."""
    root = np.random.SeedSequence(spec.seed if spec.seed is not None else seed)
    assign_rng, arrival_rng, length_rng = (np.random.default_rng(s) for s in root.spawn(3))
    n = spec.adapters
    rates = None
    if spec.kind == "paper":
        rates, adapters = _paper_adapters(spec, assign_rng)
        ts, adapter = _per_adapter_poisson(arrival_rng, rates, spec.duration)
    else:
        adapters = AdapterSet.round_robin(n, spec.ranks)
        weights = Popularity.parse(spec.popularity).weights(n)
        ts = _arrivals(spec, arrival_rng)
        adapter = assign_rng.choice(n, size=len(ts), p=weights)
        if spec.kind == "shifting":
            adapter = (adapter + (ts // spec.shift).astype(np.int64) * spec.step) % n
    prompt, output = lengths.sample(length_rng, len(ts))
    return Workload(ts=ts, adapter=adapter, prompt_tokens=np.asarray(prompt, dtype=np.int64),
                    output_tokens=np.asarray(output, dtype=np.int64), adapters=adapters, rates=rates)


def _paper_adapters(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[np.ndarray, AdapterSet]:
    """Round-robin (rate, rank) per adapter, then shuffled over adapter ids (one permutation for both)."""
    k = np.arange(spec.adapters)
    rates = np.array(spec.rates)[k % len(spec.rates)]
    ranks = np.array(spec.ranks)[k % len(spec.ranks)]
    perm = rng.permutation(spec.adapters)  # adapter perm[k] carries group k's (rate, rank)
    shuffled_rates, shuffled_ranks = np.empty_like(rates), np.empty_like(ranks)
    shuffled_rates[perm], shuffled_ranks[perm] = rates, ranks
    names = tuple(f"lora-{i}" for i in k)
    return shuffled_rates, AdapterSet(names, tuple(int(r) for r in shuffled_ranks))


def _per_adapter_poisson(rng: np.random.Generator, rates: np.ndarray, duration: float) -> tuple[np.ndarray, np.ndarray]:
    """Independent Poisson streams: exponential gaps from 0, the first arrival after one gap."""
    expected = rates * duration
    draws = np.where(rates > 0, np.ceil(expected + 6 * np.sqrt(expected) + 10), 0).astype(np.int64)
    owner = np.repeat(np.arange(len(rates)), draws)
    scale = np.divide(1.0, rates, out=np.zeros_like(rates, dtype=float), where=rates > 0)
    gaps = rng.exponential(1.0, size=int(draws.sum())) * scale[owner]
    times = np.cumsum(gaps)
    seg_end = np.cumsum(draws)
    seg_start = seg_end - draws
    base = np.concatenate([[0.0], times])[seg_start]  # cumulative sum before each adapter's segment
    times -= np.repeat(base, draws)  # per-adapter cumulative sums
    # an adapter whose draws did not reach the end (probability ~1e-9) gets more, one at a time
    ts_parts, owner_parts = [times[times < duration]], [owner[times < duration]]
    for a in np.flatnonzero((draws > 0) & (times[np.maximum(seg_end - 1, 0)] < duration)):
        t = times[seg_end[a] - 1]
        extra = []
        while (t := t + rng.exponential(scale[a])) < duration:
            extra.append(t)
        ts_parts.append(np.array(extra)), owner_parts.append(np.full(len(extra), a))
    ts, owner = np.concatenate(ts_parts), np.concatenate(owner_parts)
    order = np.argsort(ts, kind="stable")
    return ts[order], owner[order]


def _homogeneous(rng: np.random.Generator, rate: float, start: float, end: float) -> np.ndarray:
    """Poisson arrivals in [start, end): a Poisson count placed uniformly (same law as exponential gaps)."""
    return np.sort(rng.uniform(start, end, size=rng.poisson(rate * (end - start))))


def _arrivals(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    """Total arrival times of the bursty, diurnal and shifting kinds."""
    T = spec.duration
    if spec.kind == "diurnal":
        peak = spec.rate * (1 + spec.amplitude)
        t = _homogeneous(rng, peak, 0.0, T)
        period = spec.period or T
        intensity = spec.rate * (1 + spec.amplitude * np.sin(2 * np.pi * t / period + spec.phase))
        return t[rng.uniform(0.0, peak, size=len(t)) < intensity]  # thinning
    if spec.kind == "bursty":
        calm = spec.rate * (spec.on + spec.off) / (spec.off + spec.burst * spec.on)
        n = int(2 * T / (spec.on + spec.off)) + 16
        while True:  # alternate calm/burst sojourns until the duration is covered
            sojourn = rng.exponential(np.tile([spec.off, spec.on], n))
            if sojourn.sum() >= T:
                break
            n *= 2
        ends = np.minimum(np.cumsum(sojourn), T)
        starts = np.concatenate([[0.0], ends[:-1]])
        rate = np.tile([calm, calm * spec.burst], n)
        counts = rng.poisson(rate * (ends - starts))
        t = rng.uniform(np.repeat(starts, counts), np.repeat(ends, counts))
        return np.sort(t)
    return _homogeneous(rng, spec.rate, 0.0, T)  # shifting


def length_source(spec: SyntheticSpec) -> LengthSource:
    """Where the spec's token lengths come from."""
    name = spec.length_source
    if name == SHAREGPT:
        try:
            from adaptwin.twin.lengths import load_lengths
        except ImportError as err:
            raise UserError(f"lengths=sharegpt needs the twin's ShareGPT length table (adaptwin.twin.lengths), "
                            f"which this build lacks ({err}); give lengths=azure-conv instead") from None
        try:
            return load_lengths(spec.model)
        except ValueError as err:  # UnknownModelError: no table ships for that model
            raise UserError(f"lengths=sharegpt: {err}; give model=… of a shipped table or lengths=azure-conv") from None
    from adaptwin.ingest.readers.shipped import trace_lengths

    return trace_lengths(name)
