"""Realistic lake data for the dashboard's tests and benchmark, written through ``ingest/lake.py``.

Fast, seeded stand-ins for the replay and the learner, for the AppTest page tests and the render
benchmark (the browser test uses the real ``adaptwin replay`` and takes only ``recommendations`` from here,
because the streaming learner does not exist yet). It replays a trace (generated, or ``requests`` rows read
back from a lake) through a small fluid-queue model of a vLLM server and writes what replay and learner
write, with exactly the schemas of ``adaptwin/schemas.py``:

- ``telemetry``: one row per request (TTFT grows with the queue, cold adapters pay a load, a few errors);
- ``windows``: per window aggregates computed *from that telemetry* (so the pages' numbers can be checked
  against the telemetry), with the per-adapter list, plus one ``scope = 'run'`` row per run;
- ``recommendations``: one prediction per window with an interval whose error shrinks as the learner
  learns, a few configuration changes, and ``drift`` events;
- ``deadletter``: refused rows with the reasons the real stages give.

The twin and the "real" backend differ by a few per cent in capacity and latency, as the paper's twin does.
"""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from adaptwin import schemas
from adaptwin.ingest import lake

_OFFSETS = itertools.count()  # distinct file names within one process (p<part>-<first>-<last>.parquet)


@dataclass
class Trace:
    request_id: np.ndarray  # str
    ts: np.ndarray  # float64, seconds since trace start, sorted
    adapter: np.ndarray  # int adapter index (popularity rank)
    prompt: np.ndarray
    output: np.ndarray
    duration: float

    @property
    def adapter_ids(self) -> np.ndarray:
        return np.char.add("lora-", self.adapter.astype(str))


def make_trace(n: int, duration: float, adapters: int = 64, seed: int = 0, prefix: str = "req") -> Trace:
    rng = np.random.default_rng(seed)
    # a burst in the middle third makes the queue (and starvation) visible
    base = rng.uniform(0, duration, int(n * 0.8))
    burst = rng.uniform(duration / 3, duration / 2, n - len(base))
    ts = np.sort(np.concatenate([base, burst]))
    adapter = (rng.zipf(1.4, n) - 1) % adapters
    prompt = np.clip(rng.lognormal(5.2, 0.8, n), 4, 2000).astype(np.int32)
    output = np.clip(rng.lognormal(4.9, 0.7, n), 4, 1500).astype(np.int32)
    rid = np.char.add(f"{prefix}-", np.arange(n).astype(str))
    return Trace(rid, ts, adapter, prompt, output, duration)


def trace_from_requests(requests: pa.Table, duration: float | None = None) -> Trace:
    """The trace a real ingest wrote (a ``requests`` table, e.g. read back from the lake)."""
    order = pc.sort_indices(requests, [("ts", "ascending")])
    r = requests.take(order)
    ids = r["adapter_id"].to_numpy(zero_copy_only=False)
    uniq, counts = np.unique(ids, return_counts=True)
    rank = {a: i for i, a in enumerate(uniq[np.argsort(-counts, kind="stable")])}  # popularity rank
    ts = r["ts"].to_numpy()
    ts = ts - ts.min() if len(ts) else ts
    return Trace(r["request_id"].to_numpy(zero_copy_only=False), ts, np.array([rank[a] for a in ids]),
                 r["prompt_tokens"].to_numpy(), r["output_tokens"].to_numpy(),
                 float(duration or (np.ceil(ts.max() + 1) if len(ts) else 60)))


@dataclass
class Replay:
    telemetry: pa.Table
    windows: pa.Table


def simulate(trace: Trace, run_id: str, backend: str, served: int, max_loras: int, window_s: float = 10.0,
             capacity_scale: float = 1.6, seed: int = 0, adapter_names: np.ndarray | None = None) -> Replay:
    """Replay ``trace`` on a fluid-queue server; telemetry per request and windows computed from it."""
    rng = np.random.default_rng(seed + (0 if backend == "twin" else 7919))
    n, dur = len(trace.ts), trace.duration
    tokens = (trace.prompt + trace.output).astype(np.float64)
    slots = 0.75 + 0.25 * min(1.0, max_loras / 32)  # more adapters per batch -> bigger batches
    cap = max(1.0, tokens.sum() / dur * capacity_scale * slots * (1.0 if backend == "twin" else 0.96))
    bins = int(np.ceil(dur)) + 1
    sec = np.minimum(trace.ts.astype(int), bins - 1)
    arrived = np.bincount(sec, weights=tokens, minlength=bins)
    backlog = np.zeros(bins)
    level = 0.0
    for b in range(bins):  # fluid queue: tokens wait when the second's arrivals exceed capacity
        level = max(0.0, level + arrived[b] - cap)
        backlog[b] = level
    util = np.minimum(1.0, arrived / cap)
    delay_s = backlog[sec] / cap
    cold = trace.adapter >= served  # not resident: loaded from disk first
    over = trace.adapter >= max_loras
    jitter = 1.0 if backend == "twin" else rng.normal(1.03, 0.04, n)
    ttft = (rng.gamma(2.0, 22.0, n) + 0.04 * trace.prompt + 1000 * delay_s + 35.0 * cold + 8.0 * over) * jitter
    itl = rng.gamma(6.0, 2.6, n) * (1 + 0.35 * util[sec]) * (1.0 if backend == "twin" else rng.normal(1.04, 0.03, n))
    e2e = ttft + trace.output * itl
    end = trace.ts + e2e / 1000
    err = rng.random(n) < 0.002
    finished = (end <= dur) & ~err
    preempted = rng.poisson(0.01 + 0.25 * util[sec] ** 4).astype(np.int32)
    names = adapter_names if adapter_names is not None else trace.adapter_ids
    telemetry = pa.table({
        "v": pa.array(np.ones(n, np.int16)),
        "request_id": pa.array(trace.request_id.astype(str)),
        "run_id": pa.array([run_id] * n),
        "backend": pa.array([backend] * n),
        "served": pa.array(np.full(n, served, np.int32)),
        "max_loras": pa.array(np.full(n, max_loras, np.int32)),
        "adapter_id": pa.array(names.astype(str)),
        "ts": pa.array(trace.ts.astype(np.float64)),
        "prompt_tokens": pa.array(trace.prompt.astype(np.int32)),
        "output_tokens": pa.array(trace.output.astype(np.int32)),
        "ttft_ms": pa.array(np.where(err, np.nan, ttft), mask=err),
        "itl_ms": pa.array(np.where(err, np.nan, itl), mask=err),
        "e2e_ms": pa.array(np.where(err | ~finished, np.nan, e2e), mask=err | ~finished),
        "finished": pa.array(finished),
        "preempted": pa.array(preempted),
        "error": pa.array(np.where(err, "backend error: HTTP 500", None).tolist(), pa.string()),
    }).cast(schemas.TELEMETRY)
    windows = _windows(trace, run_id, backend, served, max_loras, window_s, names, tokens, finished, end,
                       ttft, itl, backlog, err)
    return Replay(telemetry, windows)


def _windows(trace, run_id, backend, served, max_loras, window_s, names, tokens, finished, end, ttft, itl,
             backlog, err) -> pa.Table:
    dur = trace.duration
    nw = int(np.ceil(dur / window_s))
    arr_w = np.minimum((trace.ts // window_s).astype(int), nw - 1)
    fin_w = np.minimum((end // window_s).astype(int), nw - 1)
    fin_mask = finished
    # running requests: a difference array over seconds, averaged per window
    bins = int(np.ceil(dur)) + 1
    conc = np.zeros(bins + 1)
    np.add.at(conc, np.minimum(trace.ts.astype(int), bins), 1)
    np.add.at(conc, np.minimum(end.astype(int) + 1, bins), -1)
    conc = np.cumsum(conc)[:bins]
    mean_tok = tokens.mean() if len(tokens) else 1.0
    rows = []
    prev_active: set = set()
    for w in range(nw):
        lo, hi = w * window_s, min(dur, (w + 1) * window_s)
        a = arr_w == w
        f = fin_mask & (fin_w == w)
        offered = int(tokens[a].sum())
        completed = int(tokens[f].sum())
        sec = slice(int(lo), max(int(lo) + 1, int(hi)))
        running = float(conc[sec].mean())
        waiting = float(backlog[sec].mean() / mean_tok)
        active = set(np.unique(trace.adapter[a]).tolist())
        loads = len(active - prev_active) if w else len(active)
        prev_active = active
        per = {}
        for name, tok in zip(names[a], tokens[a]):
            per.setdefault(name, [0, 0])[0] += int(tok)
        for name, tok in zip(names[f], tokens[f]):
            per.setdefault(name, [0, 0])[1] += int(tok)
        ratio = max(0.0, 1 - completed / offered) if offered else 0.0
        rows.append({
            "v": 1, "run_id": run_id, "backend": backend, "scope": "window", "window_start": float(lo),
            "window_end": float(hi), "served": served, "max_loras": max_loras,
            "max_lora_rank": 16, "arrivals": int(a.sum()), "finished": int(f.sum()), "offered_tokens": offered,
            "completed_tokens": completed, "throughput": completed / (hi - lo), "starvation_ratio": ratio,
            "starved": int(ratio >= 0.1), "running": running, "waiting": waiting,
            "kv_usage": float(min(0.97, running * mean_tok / 60_000)), "adapter_loads": loads,
            "mean_ttft_ms": float(ttft[f].mean()) if f.any() else None,
            "mean_itl_ms": float(itl[f].mean()) if f.any() else None,
            "adapters": [{"adapter_id": str(k), "offered_tokens": o, "completed_tokens": c,
                          "starvation_ratio": max(0.0, 1 - c / o) if o else 0.0}
                         for k, (o, c) in sorted(per.items())],
        })
    offered = int(tokens.sum())
    completed = int(tokens[fin_mask].sum())
    ratio = max(0.0, 1 - completed / offered) if offered else 0.0
    rows.append({
        "v": 1, "run_id": run_id, "backend": backend, "scope": "run", "window_start": 0.0, "window_end": dur,
        "served": served, "max_loras": max_loras, "max_lora_rank": 16, "arrivals": len(tokens),
        "finished": int(fin_mask.sum()), "offered_tokens": offered, "completed_tokens": completed,
        "throughput": completed / dur, "starvation_ratio": ratio, "starved": int(ratio >= 0.1),
        "running": float(conc.mean()), "waiting": float(backlog.mean() / mean_tok),
        "kv_usage": float(min(0.97, conc.mean() * mean_tok / 60_000)), "adapter_loads": int(len(set(trace.adapter))),
        "mean_ttft_ms": float(ttft[fin_mask].mean()) if fin_mask.any() else None,
        "mean_itl_ms": float(itl[fin_mask].mean()) if fin_mask.any() else None, "adapters": [],
    })
    return pa.Table.from_pylist(rows, schema=schemas.WINDOW)


def recommendations(windows: pa.Table, seed: int = 0, drift_at: tuple[float, ...] = (0.4, 0.75)) -> pa.Table:
    """The learner's output for one run's windows: a prediction per window (its error shrinking over
    time), an occasional configuration change, and drift events at the given fractions of the run."""
    rng = np.random.default_rng(seed)
    w = windows.filter(pc.equal(windows["scope"], "window")).sort_by("window_end").to_pylist()
    rows = []
    if not w:
        return pa.Table.from_pylist([], schema=schemas.RECOMMENDATION)
    run_id = w[0]["run_id"]
    for k, cur in enumerate(w):
        nxt = w[min(k + 1, len(w) - 1)]
        sd = 0.03 + 0.12 * np.exp(-k / 8)
        change = k % 9 == 4
        served = cur["served"] * (2 if change else 1)
        max_loras = cur["max_loras"] if not change else max(1, cur["max_loras"] // 2)
        pred = max(0.0, nxt["throughput"] * (1 + rng.normal(0, sd)) * (1.08 if change else 1.0))
        rows.append({
            "v": 1, "run_id": run_id, "kind": "recommendation", "window_end": cur["window_end"], "served": served,
            "max_loras": max_loras, "predicted_throughput": pred, "interval_low": pred * (1 - 1.64 * sd),
            "interval_high": pred * (1 + 1.64 * sd), "starvation_prob": float(min(1, cur["starvation_ratio"] * 3)),
            "model": "river.forest.ARFRegressor", "model_version": k + 1, "changed": change,
            "asked_twin": change, "reason": "higher predicted throughput" if change else "keep: best predicted"})
    span = w[-1]["window_end"]
    for i, frac in enumerate(drift_at):
        rows.append({
            "v": 1, "run_id": run_id, "kind": "drift", "window_end": float(round(span * frac)), "served": None,
            "max_loras": None, "predicted_throughput": None, "interval_low": None, "interval_high": None,
            "starvation_prob": None, "model": "river.drift.ADWIN", "model_version": i + 1, "changed": None,
            "asked_twin": None, "reason": "ADWIN: mean throughput error shifted"})
    return pa.Table.from_pylist(rows, schema=schemas.RECOMMENDATION)


DEAD_REASONS = [
    ("ingest", "field 'prompt_tokens' must be an integer, got 'abc'"),
    ("ingest", "field 'output_tokens' must be finite, got nan"),
    ("ingest", "unknown record version v=7 (this build reads v=1)"),
    ("replay", "prompt longer than max_model_len (8192 > 4096)"),
    ("sink", "not valid JSON: Expecting value: line 1 column 1 (char 0)"),
]


def deadletters(run_id: str, n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(DEAD_REASONS), n)
    return pa.Table.from_pylist([
        {"v": 1, "run_id": run_id, "stage": DEAD_REASONS[p][0], "source": "trace.csv", "line": int(i + 2),
         "reason": DEAD_REASONS[p][1], "payload": f"row {i}"} for i, p in enumerate(pick)],
        schema=schemas.DEADLETTER)


def write(root: Path, table: str, rows: pa.Table, run_id: str, max_rows: int = 200_000) -> list[Path]:
    """Publish ``rows`` of one run into the lake as the sink would (atomic files, offsets in the name)."""
    paths = []
    for start in range(0, max(rows.num_rows, 1), max_rows):
        part = rows.slice(start, max_rows)
        if not part.num_rows:
            break
        first = next(_OFFSETS) * 10_000_000
        path = lake.file_path(root, table, run_id, dt.date.today(), 0, first, first + part.num_rows - 1)
        lake.write_atomic(part, path)
        paths.append(path)
    return paths


@dataclass
class Sample:
    twin_run: str
    real_run: str
    requests: int
    windows: int


def write_sample_lake(root: Path, n: int = 3000, duration: float = 300.0, adapters: int = 48, seed: int = 0,
                      trace: Trace | None = None, run_prefix: str = "conv", served: int = 32,
                      max_loras: int = 8, window_s: float = 10.0, deadletter: bool = True) -> Sample:
    """A small, coherent lake: the same trace replayed on the twin and on vLLM, windows, recommendations,
    drift and dead letters. Pass ``trace`` to replay real ingested requests instead of a generated trace."""
    trace = trace or make_trace(n, duration, adapters, seed)
    twin_run, real_run = f"{run_prefix}-twin", f"{run_prefix}-vllm"
    twin = simulate(trace, twin_run, "twin", served, max_loras, window_s, seed=seed)
    real = simulate(trace, real_run, "vllm", served, max_loras, window_s, seed=seed)
    for run, rep in ((twin_run, twin), (real_run, real)):
        write(root, "telemetry", rep.telemetry, run)
        write(root, "windows", rep.windows, run)
    write(root, "recommendations", recommendations(twin.windows, seed), twin_run)
    if deadletter:
        write(root, "deadletter", deadletters(f"{run_prefix}-ingest", 25, seed), f"{run_prefix}-ingest")
    return Sample(twin_run, real_run, len(trace.ts), twin.windows.num_rows - 1)


def corrupt(root: Path, table: str = "telemetry", run_id: str = "corrupt") -> Path:
    """A torn Parquet file where the sink never writes one (what a crashed foreign writer leaves)."""
    path = lake.file_path(root, table, run_id, dt.date.today(), 0, 999_000_000, 999_000_001)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PAR1" + b"\0" * 300)
    return path
