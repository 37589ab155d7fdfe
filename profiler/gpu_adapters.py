#!/usr/bin/env python3
"""Price adapter families with torch: one transformer layer's adapter cost for a batch that mixes k adapters.

A stand-alone script (standard library, numpy and torch only; no adaptwin imports) so it runs on a GPU machine that
has torch but neither vLLM nor this package; ``adaptwin profile adapters`` drives the same functions. For one decoder
layer of Llama-3.1-8B or Qwen-2.5-7B (random weights, vLLM's fused ``qkv_proj`` / ``gate_up_proj`` layouts) and a
batch of B tokens sorted into k equal adapter segments (vLLM/punica compute that segment metadata once per step), it
times five variants of the layer's dense part (projections, RMSNorms, SiLU-and-mul, residual adds; attention over
the KV cache is the same for every family and left out):

* ``base``: no adapter;
* ``lora``: gathered LoRA on q/k/v/o/gate/up/down as vLLM wraps them: per module one segmented shrink
  (``bmm`` of each segment with its slot's A, all slices at once) and one segmented expand per slice added in place
  (punica SGMV-like);
* ``parallel``: a bottleneck adapter in parallel to the FFN (He et al. 2022), ``d += up(relu(down(h)))`` on the FFN's
  input ``h``, per-request weights gathered the same way;
* ``series``: Houlsby bottleneck adapters after the attention output and after the FFN, ``y += up(relu(down(y)))``;
* ``fused``: LoRA with the shrink folded into the base GEMM: one matmul of ``x`` with ``[W; A_1 … A_k]`` gives the base
  output and every slot's shrink, each segment keeps its own block (a strided view) and one segmented expand per slice
  adds it. Its output is checked against ``lora`` before anything is timed.

"Rank" is the LoRA rank (padded to max_lora_rank, as vLLM does) or the bottleneck width. Overhead = median(variant)
− median(base). The adapter-family table multiplies the twin's LoRA step-time terms:
``multiplier[family](k, rank) = Σ_B overhead_family / Σ_B overhead_lora`` over the measured batch sizes.

    python profiler/gpu_adapters.py --out DIR [--device cuda|cpu] [--size full|cpu|tiny] [--quick] [--budget-s 280]

It writes ``adapters.csv`` (one row per variant and point, appended as measured), ``adapter_family__<model>.json``
(the table a twin profile carries under ``adapter_family``) and ``gpu_adapters.log``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger("gpu_adapters")

FAMILIES = ("lora", "parallel", "series", "fused")
VARIANTS = ("base",) + FAMILIES
TABLE_FORMAT = "adaptwin.adapter-family"
TABLE_VERSION = 1
CSV_COLUMNS = ("model", "size", "device", "dtype", "mode", "rank", "distinct", "batch", "variant", "median_ms",
               "p10_ms", "p90_ms", "n_repeats", "overhead_ms", "overhead_pct", "equiv_rel_err")
#: relative error (‖fused − lora‖ / ‖lora‖) accepted per dtype: the two sum in different orders
EQUIV_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


# ----------------------------------------------------------------------------------------------------------------------
# Shapes and grids
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One decoder layer's sizes (HF config names)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def q_size(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.kv_heads * self.head_dim


#: ``full``: the models' true shapes; ``cpu``: a quarter of the width (same head_dim and head grouping) so that a
#: CPU run takes minutes; ``tiny``: seconds, for tests.
SHAPES: dict[str, dict[str, LayerShape]] = {
    "full": {"llama-3.1-8b-instruct": LayerShape(4096, 32, 8, 128, 14336),
             "qwen-2.5-7b-instruct": LayerShape(3584, 28, 4, 128, 18944)},
    "cpu": {"llama-3.1-8b-instruct": LayerShape(1024, 8, 2, 128, 3584),
            "qwen-2.5-7b-instruct": LayerShape(896, 7, 1, 128, 4736)},
    "tiny": {"llama-3.1-8b-instruct": LayerShape(64, 4, 1, 16, 96),
             "qwen-2.5-7b-instruct": LayerShape(112, 7, 1, 16, 160)},
}


@dataclasses.dataclass(frozen=True)
class Grid:
    """Points to measure: every (rank, distinct, batch) with distinct ≤ batch and batch divisible by distinct."""

    ranks: tuple[int, ...]
    distinct: tuple[int, ...]
    batches: tuple[int, ...]
    warmup: int = 3
    repeats: int = 25
    inner: int = 1  # calls per timed sample (more for very short calls)

    def points(self) -> list[tuple[int, int, int]]:
        return [(r, k, b) for r in self.ranks for k in self.distinct for b in self.batches if k <= b and b % k == 0]

    def check(self) -> None:
        for name in ("ranks", "distinct", "batches"):
            vals = getattr(self, name)
            if not vals or any(v < 1 for v in vals) or list(vals) != sorted(set(vals)):
                raise ValueError(f"{name} must be increasing positive integers, got {vals}")
        missing = [k for k in self.distinct if not any(k <= b and b % k == 0 for b in self.batches)]
        if missing:
            raise ValueError(f"no batch size is a multiple of distinct adapters {missing}: add a larger batch")


GRIDS: dict[str, Grid] = {
    "full": Grid((8, 16, 32, 64), (1, 2, 4, 8, 16, 32, 64, 128), (64, 256, 1024), warmup=3, repeats=20, inner=3),
    "cpu": Grid((8, 16, 32, 64), (1, 2, 4, 8, 16, 32), (32, 128), warmup=2, repeats=11),
    "tiny": Grid((8, 16), (1, 2, 4), (8, 16), warmup=2, repeats=15, inner=5),
}


# ----------------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------------


def _randn(gen: torch.Generator, shape: Sequence[int], device: torch.device, dtype: torch.dtype,
           std: float = 0.02) -> torch.Tensor:
    t = torch.empty(*shape, device=device, dtype=dtype)
    return t.normal_(0.0, std, generator=gen)


class LayerWeights:
    """Base weights of one layer (vLLM's fused layouts) and ``slots`` adapters of one rank of every family.

    LoRA slots use vLLM's stacked layout: A [slots, slices·r, in], B [slots, out, r] per slice. Bottleneck adapters:
    down [slots, r, hidden], up [slots, hidden, r] per site (the scale s is folded into ``up``).
    """

    def __init__(self, shape: LayerShape, slots: int, rank: int, device: torch.device, dtype: torch.dtype,
                 seed: int = 0):
        self.shape, self.slots, self.rank, self.device, self.dtype = shape, slots, rank, device, dtype
        gen = torch.Generator(device=device)  # generated where it is used: GB of slots at full size
        gen.manual_seed(seed)
        h, q, kv, i, r, s = shape.hidden, shape.q_size, shape.kv_size, shape.intermediate, rank, slots

        def w(*dims: int, std: float = 0.02) -> torch.Tensor:
            return _randn(gen, dims, device, dtype, std)

        self.ln1 = (1.0 + w(h, std=0.1)).contiguous()
        self.ln2 = (1.0 + w(h, std=0.1)).contiguous()
        self.w_qkv, self.w_o = w(q + 2 * kv, h), w(h, q)
        self.w_gate_up, self.w_down = w(2 * i, h), w(h, i)
        # LoRA: (A, [(B, output column), ...]) per wrapped module; B small so that deltas stay O(base)
        self.lora = {
            "qkv": (w(s, 3 * r, h), [(w(s, q, r), 0), (w(s, kv, r), q), (w(s, kv, r), q + kv)]),
            "o": (w(s, r, q), [(w(s, h, r), 0)]),
            "gate_up": (w(s, 2 * r, h), [(w(s, i, r), 0), (w(s, i, r), i)]),
            "down": (w(s, r, i), [(w(s, h, r), 0)]),
        }
        self.parallel = (w(s, r, h, std=0.05), w(s, h, r, std=0.05))
        self.series_attn = (w(s, r, h, std=0.05), w(s, h, r, std=0.05))
        self.series_ffn = (w(s, r, h, std=0.05), w(s, h, r, std=0.05))
        self._fused: dict[int, dict[str, torch.Tensor]] = {}

    def base_weight(self, module: str) -> torch.Tensor:
        return {"qkv": self.w_qkv, "o": self.w_o, "gate_up": self.w_gate_up, "down": self.w_down}[module]

    def fused(self, k: int) -> dict[str, torch.Tensor]:
        """``[W; A_slot0; …; A_slot(k-1)]`` per module: the base GEMM also computes every active slot's shrink."""
        if k not in self._fused:
            self._fused = {k: {m: torch.cat([self.base_weight(m), a[:k].reshape(-1, a.shape[2])], 0).contiguous()
                               for m, (a, _) in self.lora.items()}}  # one k at a time: these are big
        return self._fused[k]

    def nbytes(self) -> int:
        ts = [self.w_qkv, self.w_o, self.w_gate_up, self.w_down, *self.parallel, *self.series_attn, *self.series_ffn]
        for a, bs in self.lora.values():
            ts += [a] + [b for b, _ in bs]
        return sum(t.numel() * t.element_size() for t in ts)


# ----------------------------------------------------------------------------------------------------------------------
# The layer and its adapter variants
# ----------------------------------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _seg(x: torch.Tensor, k: int) -> torch.Tensor:
    """[B, n] -> [k, B/k, n]: the batch's k adapter segments (a view)."""
    return x.view(k, x.shape[0] // k, x.shape[1])


def lora_expand_(y: torch.Tensor, t: torch.Tensor, bs: list[tuple[torch.Tensor, int]], rank: int, k: int) -> None:
    """Segmented expand, added in place: y[:, col:col+out] += t_slice @ B[slot]^T for every slice."""
    y3 = _seg(y, k)
    for j, (b, col) in enumerate(bs):
        y3[..., col:col + b.shape[1]] += torch.bmm(t[..., j * rank:(j + 1) * rank], b[:k].transpose(1, 2))


def lora_linear(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, bs: list[tuple[torch.Tensor, int]], rank: int,
                k: int) -> torch.Tensor:
    """Base projection plus gathered LoRA: shrink per segment with its slot's A (all slices at once), then expand."""
    y = F.linear(x, w)
    t = torch.bmm(_seg(x, k), a[:k].transpose(1, 2))  # [k, B/k, slices·r]
    lora_expand_(y, t, bs, rank, k)
    return y


def fused_linear(x: torch.Tensor, w_cat: torch.Tensor, out: int, bs: list[tuple[torch.Tensor, int]], rank: int,
                 k: int) -> torch.Tensor:
    """One GEMM against [W; A_0 … A_(k-1)], then each segment's own shrink block is expanded (same result as
    :func:`lora_linear`, the shrink of every slot for every token computed in the base matmul)."""
    z = F.linear(x, w_cat)  # [B, out + k·slices·r]
    y = z[:, :out]
    width = (w_cat.shape[0] - out) // k
    blocks = z[:, out:].reshape(k, x.shape[0] // k, k, width)  # [segment, token, slot, slices·r]
    t = torch.diagonal(blocks, dim1=0, dim2=2).permute(2, 0, 1)  # [k, B/k, slices·r]: each segment's own slot
    lora_expand_(y, t, bs, rank, k)
    return y


def bottleneck(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, k: int) -> torch.Tensor:
    """Per-request bottleneck adapter up(relu(down(x))), segments gathered as for LoRA."""
    mid = torch.relu(torch.bmm(_seg(x, k), down[:k].transpose(1, 2)))
    return torch.bmm(mid, up[:k].transpose(1, 2)).view(x.shape[0], -1)


def layer_forward(x: torch.Tensor, w: LayerWeights, variant: str, k: int) -> torch.Tensor:
    """The layer's dense part for tokens ``x`` [B, hidden] sorted into ``k`` equal adapter segments."""
    q, i, r = w.shape.q_size, w.shape.intermediate, w.rank

    def proj(m: str, inp: torch.Tensor) -> torch.Tensor:
        if variant == "lora":
            a, bs = w.lora[m]
            return lora_linear(inp, w.base_weight(m), a, bs, r, k)
        if variant == "fused":
            _, bs = w.lora[m]
            return fused_linear(inp, w.fused(k)[m], w.base_weight(m).shape[0], bs, r, k)
        return F.linear(inp, w.base_weight(m))

    h1 = rms_norm(x, w.ln1)
    qkv = proj("qkv", h1)
    attn = qkv[:, :q].contiguous()  # stand-in for attention (the same for every family)
    o = proj("o", attn)
    if variant == "series":
        o = o + bottleneck(o, *w.series_attn, k)
    x2 = x + o
    h2 = rms_norm(x2, w.ln2)
    gu = proj("gate_up", h2)
    d = proj("down", F.silu(gu[:, :i]) * gu[:, i:])
    if variant == "parallel":
        d = d + bottleneck(h2, *w.parallel, k)
    elif variant == "series":
        d = d + bottleneck(d, *w.series_ffn, k)
    return x2 + d


def reference_forward(x: torch.Tensor, w: LayerWeights, variant: str, k: int) -> torch.Tensor:
    """The same layer computed token by token in float64 with plain matmuls (for the tests): token t belongs to
    adapter slot t // (B/k)."""
    sh, r = w.shape, w.rank
    q, i = sh.q_size, sh.intermediate
    d64 = lambda t: t.detach().to("cpu", torch.float64)  # noqa: E731
    seg_len = x.shape[0] // k
    outs = []

    def rms(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return v / torch.sqrt((v * v).mean() + 1e-6) * d64(g)

    def lin(m: str, v: torch.Tensor, slot: int) -> torch.Tensor:
        y = d64(w.base_weight(m)) @ v
        if variant in ("lora", "fused"):
            a, bs = w.lora[m]
            t = d64(a[slot]) @ v
            for j, (b, col) in enumerate(bs):
                y[col:col + b.shape[1]] += d64(b[slot]) @ t[j * r:(j + 1) * r]
        return y

    def adapter(pair: tuple[torch.Tensor, torch.Tensor], v: torch.Tensor, slot: int) -> torch.Tensor:
        return d64(pair[1][slot]) @ torch.relu(d64(pair[0][slot]) @ v)

    for t in range(x.shape[0]):
        slot = t // seg_len
        xt = d64(x[t])
        h1 = rms(xt, w.ln1)
        o = lin("o", lin("qkv", h1, slot)[:q], slot)
        if variant == "series":
            o = o + adapter(w.series_attn, o, slot)
        x2 = xt + o
        h2 = rms(x2, w.ln2)
        gu = lin("gate_up", h2, slot)
        d = lin("down", torch.nn.functional.silu(gu[:i]) * gu[i:], slot)
        if variant == "parallel":
            d = d + adapter(w.parallel, h2, slot)
        elif variant == "series":
            d = d + adapter(w.series_ffn, d, slot)
        outs.append(x2 + d)
    return torch.stack(outs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    return float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64).clamp_min(1e-30))


class EquivalenceError(AssertionError):
    """The fused variant does not compute what the unfused one does: its timings would mean nothing."""


def check_fused_equivalence(x: torch.Tensor, w: LayerWeights, k: int) -> float:
    """‖fused − lora‖/‖lora‖ on this input; raises :class:`EquivalenceError` above the dtype's tolerance."""
    with torch.no_grad():  # not inference_mode: the fused weights it builds stay ordinary tensors
        err = rel_err(layer_forward(x, w, "fused", k), layer_forward(x, w, "lora", k))
    tol = EQUIV_TOL.get(x.dtype, 3e-2)
    if not err <= tol:
        raise EquivalenceError(f"fused and unfused LoRA differ: relative error {err:.3g} > {tol:g} "
                               f"(rank {w.rank}, {k} adapters, batch {x.shape[0]}, {x.dtype})")
    return err


# ----------------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def capture_graph(fn: Callable[[], Any], device: torch.device) -> "torch.cuda.CUDAGraph":
    """Capture ``fn`` (static shapes and buffers) into a CUDA graph after warm-up on a side stream."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def time_variants(fns: dict[str, Callable[[], Any]], device: torch.device, grid: Grid,
                  use_graphs: bool) -> tuple[dict[str, list[float]], str]:
    """Per-call times (ms) of each function, interleaved round by round (the order rotates) so that drift and
    load spikes hit every variant alike. On a GPU each function is replayed as a CUDA graph (vLLM captures decode
    steps too) unless capture fails or ``use_graphs`` is off; returns the times and the mode used."""
    mode = "eager"
    calls = dict(fns)
    graphs = []
    if device.type == "cuda" and use_graphs:
        try:
            for name, fn in fns.items():
                g = capture_graph(fn, device)
                graphs.append(g)
                calls[name] = g.replay
            mode = "cudagraph"
        except RuntimeError as err:  # an op that cannot be captured: time eagerly instead, and say so
            log.warning("CUDA graph capture failed (%s); timing eagerly", str(err).splitlines()[0])
            calls, graphs = dict(fns), []
    names = list(calls)
    for name in names:
        for _ in range(grid.warmup):
            calls[name]()
    _sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(grid.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            fn = calls[name]
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(grid.inner):
                    fn()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / grid.inner)
            else:
                t0 = time.perf_counter()
                for _ in range(grid.inner):
                    fn()
                times[name].append((time.perf_counter() - t0) * 1000.0 / grid.inner)
    del graphs
    return times, mode


# ----------------------------------------------------------------------------------------------------------------------
# Measurement driver
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RunConfig:
    """What one run measures."""

    models: tuple[str, ...] = ("llama-3.1-8b-instruct", "qwen-2.5-7b-instruct")
    size: str = "full"
    grid: Grid = GRIDS["full"]
    device: str = "cuda"
    dtype: str = "bfloat16"
    use_graphs: bool = True
    budget_s: float = 280.0
    seed: int = 0
    threads: int = 1  # CPU only: OpenMP workers spin-wait, so on a shared, loaded machine 1 thread is 1000x steadier


class CsvSink:
    """Rows appended and flushed as they are measured, so a timeout still leaves data."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: list[dict[str, Any]] = []
        with open(path, "w", newline="") as f:
            csv.writer(f).writerow(CSV_COLUMNS)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(c, "")) for c in CSV_COLUMNS])


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def measure_model(model: str, cfg: RunConfig, sink: CsvSink, deadline: float,
                  progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Measure every grid point of one model; returns its rows (also appended to ``sink``)."""
    shape = SHAPES[cfg.size][model]
    device, dtype = torch.device(cfg.device), getattr(torch, cfg.dtype)
    grid = cfg.grid
    rows: list[dict[str, Any]] = []
    for rank in grid.ranks:
        kmax = max(grid.distinct)
        if time.monotonic() > deadline:
            log.warning("%s: time budget spent before rank %d; stopping", model, rank)
            break
        w = LayerWeights(shape, kmax, rank, device, dtype, seed=cfg.seed + rank)
        log.info("%s rank %d: %.0f MB of weights on %s", model, rank, w.nbytes() / 1e6, device)
        for k in grid.distinct:
            batches = [b for b in grid.batches if k <= b and b % k == 0]
            if not batches:
                continue
            gen = torch.Generator(device=device)
            gen.manual_seed(cfg.seed + 1000 * rank + k)
            xs = {b: _randn(gen, (b, shape.hidden), device, dtype, 1.0) for b in batches}
            err = check_fused_equivalence(xs[batches[0]], w, k)  # before any timing of this (rank, k)
            for b in batches:
                if time.monotonic() > deadline:
                    log.warning("%s: time budget spent at rank %d, %d adapters; stopping", model, rank, k)
                    return rows
                x = xs[b]
                fns = {v: (lambda v=v, x=x, w=w, k=k: layer_forward(x, w, v, k)) for v in VARIANTS}
                with torch.inference_mode():
                    times, mode = time_variants(fns, device, grid, cfg.use_graphs)
                base = np.asarray(times["base"])
                for v in VARIANTS:
                    a = np.asarray(times[v])
                    # overhead from paired samples of the same round (adjacent in time): machine-speed drift
                    # between rounds cancels, which a difference of medians would keep
                    row = {"model": model, "size": cfg.size, "device": device.type, "dtype": cfg.dtype,
                           "mode": mode, "rank": rank, "distinct": k, "batch": b, "variant": v,
                           "median_ms": float(np.median(a)), "p10_ms": float(np.percentile(a, 10)),
                           "p90_ms": float(np.percentile(a, 90)), "n_repeats": int(a.size),
                           "overhead_ms": float(np.median(a - base)),
                           "overhead_pct": float(np.median(100.0 * (a - base) / base)),
                           "equiv_rel_err": err if v == "fused" else ""}
                    sink.add(row)
                    rows.append(row)
                if progress:
                    progress(1)
        del w
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# The adapter-family table
# ----------------------------------------------------------------------------------------------------------------------


def _as_num(v: Any) -> float:
    return float(v) if v not in ("", None) else float("nan")


#: floor of the fitted LoRA overhead (% of the layer) a multiplier divides by: below it LoRA's cost is noise
LORA_FLOOR_PCT = 0.5


def _line_fit(ks: list[int], ys: list[float]) -> Callable[[int], float]:
    """Least-squares line y = a + c·k (a constant for a single k): the twin's LoRA terms are linear in k, and a
    fit across k smooths the timing noise of single points."""
    if len(set(ks)) < 2:
        m = float(np.mean(ys))
        return lambda k: m
    c, a = np.polyfit(np.asarray(ks, float), np.asarray(ys, float), 1)
    return lambda k: float(a + c * k)


def build_table(rows: Iterable[dict[str, Any]], model: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``adapter_family`` table of one model from its measured rows (dicts as written to the CSV, strings ok).

    Per (family, rank, batch) the overhead in % of the layer is fitted as a line in k (distinct adapters); then
    ``multiplier[family][i][j]`` at ``ranks[i]``, ``distinct[j]`` = Σ_B max(fit_family, 0) / Σ_B max(fit_lora,
    0.5 %) over the batch sizes where k was measured; ``lora`` is 1 by definition.
    """
    pts: dict[tuple[int, int, str], list[tuple[int, float]]] = {}  # (rank, batch, variant) -> [(k, pct)]
    seen: dict[tuple[int, int], set[str]] = {}
    pct: dict[tuple[int, int], dict[str, list[float]]] = {}
    info: dict[str, Any] = {}
    for row in rows:
        if row["model"] != model:
            continue
        key = (int(row["rank"]), int(row["distinct"]))
        v = row["variant"]
        seen.setdefault(key, set()).add(v)
        pts.setdefault((key[0], int(row["batch"]), v), []).append((key[1], _as_num(row["overhead_pct"])))
        pct.setdefault(key, {}).setdefault(v, []).append(_as_num(row["overhead_pct"]))
        for f in ("size", "device", "dtype", "mode"):
            info.setdefault(f, row[f])
        if v == "fused" and row.get("equiv_rel_err") not in ("", None):
            info["max_equiv_rel_err"] = max(info.get("max_equiv_rel_err", 0.0), _as_num(row["equiv_rel_err"]))
    if not seen:
        raise ValueError(f"no measured rows for model {model!r}")
    ranks = sorted({r for r, _ in seen})
    distinct = sorted({k for _, k in seen})
    missing = [(r, k) for r in ranks for k in distinct if not set(VARIANTS) <= seen.get((r, k), set())]
    if missing:  # a run cut short by its time budget: keep the ranks measured in full
        ranks = [r for r in ranks if not any(m[0] == r for m in missing)]
        if not ranks:
            raise ValueError(f"model {model!r}: points {missing} were not measured for every variant "
                             "(a run cut short by its time budget?); measure a full grid")
        log.warning("%s: ranks with missing points dropped from the table: %s", model, missing)
    batches = sorted({b for _, b, _ in pts})
    fits = {(r, b, f): (_line_fit([k for k, _ in p], [y for _, y in p]), {k for k, _ in p})
            for (r, b, f), p in pts.items() if f in FAMILIES}
    mult: dict[str, list[list[float]]] = {f: [] for f in FAMILIES}
    over: dict[str, list[list[float]]] = {f: [] for f in FAMILIES}
    for r in ranks:
        for f in FAMILIES:
            mult[f].append([])
            over[f].append([])
        for k in distinct:
            bs = [b for b in batches if (r, b, "lora") in fits and k in fits[(r, b, "lora")][1]]
            denom = sum(max(fits[(r, b, "lora")][0](k), LORA_FLOOR_PCT) for b in bs)
            for f in FAMILIES:
                num = sum(max(fits[(r, b, f)][0](k), 0.0) for b in bs)
                mult[f][-1].append(1.0 if f == "lora" else round(num / denom, 4))
                over[f][-1].append(round(float(np.mean(pct[(r, k)][f])), 2))
    table = {
        "format": TABLE_FORMAT, "version": TABLE_VERSION, "model": model,
        "measured_on": info.get("device", "?"), "reference": "lora",
        "ranks": ranks, "distinct": distinct, "multiplier": mult, "overhead_pct": over,
        "meta": {**info, **(metadata or {}),
                 "model": "step LoRA terms of family f = LoRA terms x multiplier[f](distinct adapters in the step, "
                          "max_lora_rank), bilinear in log2, clamped to the measured grid; multiplier = sum over "
                          "batch sizes of the family's overhead % (line fitted in k) / LoRA's (floored at 0.5 %); "
                          "overhead_pct = measured mean over batch sizes of (variant - base) / base of one layer's "
                          "dense part"},
    }
    return table


def device_metadata(device: torch.device) -> dict[str, Any]:
    md: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(), "numpy": np.__version__,
                          "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        md.update(gpu_name=p.name, capability=f"{p.major}.{p.minor}", torch_cuda=torch.version.cuda)
    else:
        md.update(gpu_name="cpu", cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads())
    return md


def run(cfg: RunConfig, out: Path, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Measure ``cfg`` into ``out``: ``adapters.csv`` and one ``adapter_family__<model>.json`` per model."""
    cfg.grid.check()
    for m in cfg.models:
        if m not in SHAPES[cfg.size]:
            raise ValueError(f"unknown model {m!r}; known: {', '.join(SHAPES[cfg.size])}")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    if device.type == "cpu" and cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t0 = time.monotonic()
    deadline = t0 + cfg.budget_s
    sink = CsvSink(out / "adapters.csv")
    md = device_metadata(device)
    tables: dict[str, Any] = {}
    for n, model in enumerate(cfg.models):
        # each model gets an equal share of what is left, so a slow first model cannot starve the next
        share = time.monotonic() + (deadline - time.monotonic()) / (len(cfg.models) - n)
        rows = measure_model(model, cfg, sink, share, progress)
        try:
            table = build_table(rows, model, {**md, "shape": dataclasses.asdict(SHAPES[cfg.size][model]),
                                              "batches": list(cfg.grid.batches)})
        except ValueError as err:
            log.error("%s", err)
            continue
        path = out / f"adapter_family__{model}.json"
        path.write_text(json.dumps(table, indent=1) + "\n")
        tables[model] = table
    return {"rows": len(sink.rows), "tables": sorted(tables), "wall_s": round(time.monotonic() - t0, 2),
            "csv": str(out / "adapters.csv"), "out": str(out), "_tables": tables}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for adapters.csv and adapter_family__<model>.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    p.add_argument("--size", default=None, choices=tuple(SHAPES), help="layer shapes (default full on cuda, cpu on cpu)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and grid (seconds; what the tests run)")
    p.add_argument("--models", default=",".join(SHAPES["full"]))
    p.add_argument("--budget-s", type=float, default=280.0, help="stop measuring after this many seconds")
    p.add_argument("--no-cuda-graph", action="store_true", help="time eagerly (every kernel launched from Python)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch (default 1; 0 = torch's default)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(out / "gpu_adapters.log")]
    for h in handlers:  # on this script's logger, not the root: it may run inside another program (the tests)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        return _main(args, out)
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.propagate = True


def _main(args: argparse.Namespace, out: Path) -> int:
    size = "tiny" if args.quick else (args.size or ("full" if args.device == "cuda" else "cpu"))
    if args.device == "cuda" and not torch.cuda.is_available():
        log.error("--device cuda but torch sees no GPU; use --device cpu")
        return 2
    cfg = RunConfig(models=tuple(m for m in args.models.split(",") if m), size=size, grid=GRIDS[size],
                    device=args.device, dtype="bfloat16" if args.device == "cuda" else "float32",
                    use_graphs=not args.no_cuda_graph, budget_s=args.budget_s, threads=args.threads)
    log.info("measuring %s at %s size on %s (%s), budget %.0f s", ",".join(cfg.models), size, cfg.device, cfg.dtype,
             cfg.budget_s)
    res = run(cfg, out)
    for model, table in res.pop("_tables").items():
        log.info("%s multipliers vs lora (rows: ranks %s, cols: distinct %s)", model, table["ranks"], table["distinct"])
        for f in FAMILIES:
            log.info("  %-8s %s", f, table["multiplier"][f])
    print(json.dumps(res))
    return 0 if res["tables"] else 1


if __name__ == "__main__":
    sys.exit(main())
