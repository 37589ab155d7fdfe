#!/usr/bin/env python3
"""Time LoRA shrink/expand kernels tiled as vLLM 0.8.5 V1 tiles them, at the true shapes of Llama-3.1-8B and Qwen-2.5-7B.

Why: the real runs show that a server started with ``--max-lora-rank 32`` spends ≈ 10 % more per step than one with 16
at the same batch, mostly per distinct adapter (benchmarks/RESULTS.md §"Where max_lora_rank acts"), and the twin
cannot fit that from the runs alone. vLLM's LoRA kernels are Triton kernels whose launch geometry depends on the rank:

* shrink (x·Aᵀ, hidden → rank): ``SPLIT_K·⌈M/32⌉·⌈R/16⌉`` programs per slice and per GPU adapter slot (``max_loras + 1``
  slots; an empty slot's programs, and those past an adapter's tokens, exit at once), split-K partial sums added
  atomically (``SPLIT_K`` 64 and ``BLOCK_K`` 256 below 128 tokens, else 8 and 32);
* expand (t·Bᵀ, rank → output): ``⌈M/BLOCK_M⌉·⌈N/128⌉`` programs per slice and slot, a loop over the rank in steps of 16.

So ranks 8 and 16 launch the same work; at 32 the shrink launches twice the programs per adapter and each expand
program walks twice the rank steps (at most twice the per-adapter work); how much of the step that is depends on what
else a program costs. torch's batched GEMMs (profiler/gpu_measure.py) have no such tiling. The kernels here are written
from that geometry (tokens sorted by adapter, the padded per-slot weight stacks vLLM keeps), not copied from vLLM; the
script needs only the standard library, torch and triton, as the lent GPU machine has no vLLM.

For each model, max_lora_rank, max_loras, distinct adapters A and tokens M it times one engine step's LoRA work (every
layer: q/k/v, o, gate/up, down; shrink + expand) as a CUDA graph (vLLM V1 replays graphs for decode batches), median of
repeats, and writes ``lora_kernels.csv`` (rows as they are measured, so a timeout still leaves data) and
``lora_kernels.json`` (per model and rank: ms = c0 + c_tok·M + c_adapter·A + c_slot·(max_loras + 1), least squares,
and each rank's per-adapter cost relative to rank 16).

    python profiler/gpu_lora_kernels.py --out DIR [--device cuda|cpu] [--quick] [--budget-s 240]

``--quick --device cpu`` runs tiny shapes through Triton's interpreter (seconds; what the tests run): the script sets
``TRITON_INTERPRET=1`` itself, before its kernels are defined, for ``--device cpu`` or when there is no GPU.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

# Triton reads this when a kernel is defined: a CPU run (asked for, or no GPU) goes through its interpreter
_asked = sys.argv[sys.argv.index("--device") + 1:][:1] if "--device" in sys.argv else []
if _asked == ["cpu"] or (not _asked and not torch.cuda.is_available()):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

FORMAT = "adaptwin.gpu-lora-kernels"


@dataclasses.dataclass(frozen=True)
class Shapes:
    """One model's LoRA-wrapped projections: (input, [output per slice]) for q/k/v, o, gate/up, down."""

    name: str
    layers: int
    hidden: int
    q: int
    kv: int
    intermediate: int

    def projections(self) -> list[tuple[int, list[int]]]:
        return [(self.hidden, [self.q, self.kv, self.kv]), (self.q, [self.hidden]),
                (self.hidden, [self.intermediate, self.intermediate]), (self.intermediate, [self.hidden])]


MODELS = {
    "llama-3.1-8b-instruct": Shapes("llama-3.1-8b-instruct", 32, 4096, 4096, 1024, 14336),
    "qwen-2.5-7b-instruct": Shapes("qwen-2.5-7b-instruct", 28, 3584, 3584, 512, 18944),
}
TINY = Shapes("tiny", 2, 64, 64, 32, 96)


@triton.jit
def _shrink(x_ptr, w_ptr, out_ptr, tok_ptr, count_ptr, start_ptr, slot_ptr, R, K,
            sw_s, sw_l, sw_r, so_s, so_m,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """out[s, tok, :R] += x[tok, :] · w[s, slot]ᵀ for the tokens of one adapter slot (program axis 2)."""
    pid, s, z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slot_ptr + z)
    if slot == -1:
        return
    n_tok = tl.load(count_ptr + z)
    blocks_n = tl.cdiv(R, BLOCK_N)
    pid_k, pid_mn = pid % SPLIT_K, pid // SPLIT_K
    pid_m, pid_n = pid_mn // blocks_n, pid_mn % blocks_n
    if pid_m * BLOCK_M >= n_tok:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(tok_ptr + tl.load(start_ptr + z) + offs_m, mask=offs_m < n_tok, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :],
                    mask=(offs_m[:, None] < n_tok) & (offs_k[None, :] < K), other=0.0)
        b = tl.load(w_ptr + s * sw_s + slot * sw_l + offs_n[:, None] * sw_r + offs_k[None, :],
                    mask=(offs_n[:, None] < R) & (offs_k[None, :] < K), other=0.0)
        acc += tl.dot(a, tl.trans(b))
    mask = (offs_m[:, None] < n_tok) & (offs_n[None, :] < R)
    tl.atomic_add(out_ptr + s * so_s + rows[:, None] * so_m + offs_n[None, :], acc, mask=mask)


@triton.jit
def _expand(t_ptr, w_ptr, y_ptr, tok_ptr, count_ptr, start_ptr, slot_ptr, n_ptr, off_ptr, R, N_MAX, Y_COLS,
            st_s, st_m, sw_s, sw_l, sw_n,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[tok, off_s + n] += t[s, tok, :R] · w[s, slot, n, :R]ᵀ, the rank walked in steps of BLOCK_K."""
    pid, s, z = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    slot = tl.load(slot_ptr + z)
    if slot == -1:
        return
    n_tok = tl.load(count_ptr + z)
    n_size = tl.load(n_ptr + s)
    blocks_n = tl.cdiv(N_MAX, BLOCK_N)
    pid_m, pid_n = pid // blocks_n, pid % blocks_n
    if pid_m * BLOCK_M >= n_tok:
        return
    if pid_n * BLOCK_N >= n_size:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = tl.load(tok_ptr + tl.load(start_ptr + z) + offs_m, mask=offs_m < n_tok, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(t_ptr + s * st_s + rows[:, None] * st_m + offs_k[None, :],
                    mask=(offs_m[:, None] < n_tok) & (offs_k[None, :] < R), other=0.0)
        b = tl.load(w_ptr + s * sw_s + slot * sw_l + offs_n[:, None] * sw_n + offs_k[None, :],
                    mask=(offs_n[:, None] < n_size) & (offs_k[None, :] < R), other=0.0)
        acc += tl.dot(a.to(b.dtype), tl.trans(b))
    mask = (offs_m[:, None] < n_tok) & (offs_n[None, :] < n_size)
    ptr = y_ptr + rows[:, None] * Y_COLS + tl.load(off_ptr + s) + offs_n[None, :]
    tl.store(ptr, (tl.load(ptr, mask=mask, other=0.0) + acc).to(y_ptr.dtype.element_ty), mask=mask)


@dataclasses.dataclass
class Batch:
    """One step's LoRA metadata: tokens sorted by adapter, one entry per GPU slot (``max_loras + 1``; -1 = empty)."""

    tokens: torch.Tensor
    counts: torch.Tensor
    starts: torch.Tensor
    slots: torch.Tensor

    @classmethod
    def make(cls, m: int, distinct: int, max_loras: int, device: str) -> "Batch":
        per = [m // distinct + (1 if i < m % distinct else 0) for i in range(distinct)]
        n = max_loras + 1
        counts = per + [0] * (n - distinct)
        starts = [sum(per[:i]) for i in range(distinct)] + [m] * (n - distinct)
        slots = list(range(distinct)) + [-1] * (n - distinct)
        i32 = dict(dtype=torch.int32, device=device)
        return cls(torch.randperm(m, device=device).to(torch.int32), torch.tensor(counts, **i32),
                   torch.tensor(starts, **i32), torch.tensor(slots, **i32))


class Projection:
    """One LoRA-wrapped projection group: stacked A (slices, max_loras, R, K) and B (slices, max_loras, N_max, R)."""

    def __init__(self, k: int, outs: list[int], max_loras: int, rank: int, dtype: torch.dtype, device: str):
        self.k, self.outs, self.rank = k, outs, rank
        s, n_max = len(outs), max(outs)
        self.a = torch.randn(s, max_loras, rank, k, dtype=dtype, device=device) * 0.02
        self.b = torch.randn(s, max_loras, n_max, rank, dtype=dtype, device=device) * 0.02
        self.n = torch.tensor(outs, dtype=torch.int32, device=device)
        self.off = torch.tensor([sum(outs[:i]) for i in range(s)], dtype=torch.int32, device=device)

    def apply(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, batch: Batch, split_k: int | None = None) -> None:
        """y += LoRA(x) with vLLM 0.8.5's tile sizes (``split_k`` overrides its split for the interpreter's tests);
        ``t`` (slices, M, rank) fp32 scratch."""
        m, s, slots = x.shape[0], len(self.outs), batch.slots.shape[0]
        t.zero_()
        split_k, block_k = (split_k or (64 if m < 128 else 8)), (256 if m < 128 else 32)
        grid = (split_k * triton.cdiv(m, 32) * triton.cdiv(self.rank, 16), s, slots)
        _shrink[grid](x, self.a, t, batch.tokens, batch.counts, batch.starts, batch.slots, self.rank, self.k,
                      self.a.stride(0), self.a.stride(1), self.a.stride(2), t.stride(0), t.stride(1),
                      BLOCK_M=32, BLOCK_N=16, BLOCK_K=block_k, SPLIT_K=split_k)
        block_m = 16 if m <= 16 else 32 if m <= 32 else 64
        grid = (triton.cdiv(m, block_m) * triton.cdiv(self.b.shape[2], 128), s, slots)
        _expand[grid](t, self.b, y, batch.tokens, batch.counts, batch.starts, batch.slots, self.n, self.off,
                      self.rank, self.b.shape[2], y.shape[1], t.stride(0), t.stride(1),
                      self.b.stride(0), self.b.stride(1), self.b.stride(2),
                      BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=16)


def reference(x: torch.Tensor, proj: Projection, batch: Batch, token_slot: torch.Tensor) -> torch.Tensor:
    """The same LoRA output from gathered matmuls, fp32 (checks the kernels)."""
    a = proj.a.float()[:, token_slot.long()]          # slices, M, R, K
    b = proj.b.float()[:, token_slot.long()]          # slices, M, N_max, R
    t = torch.einsum("mk,smrk->smr", x.float(), a)
    outs = [torch.einsum("smr,smnr->smn", t, b)[i, :, :n] for i, n in enumerate(proj.outs)]
    return torch.cat(outs, dim=1)


def token_slots(batch: Batch, m: int) -> torch.Tensor:
    """Slot of each token (inverse of the sorted token list)."""
    slot = torch.empty(m, dtype=torch.int32, device=batch.tokens.device)
    for z in range(batch.slots.shape[0]):
        c, s0 = int(batch.counts[z]), int(batch.starts[z])
        if c:
            slot[batch.tokens[s0:s0 + c].long()] = batch.slots[z]
    return slot


def check(device: str, dtype: torch.dtype) -> float:
    """Largest relative error of the kernels against :func:`reference` over ranks 8/16/32, one and three adapters
    (tiny shapes, empty slots included)."""
    worst = 0.0
    for rank in (8, 16, 32):
        for distinct in (1, 3):
            m = 20
            batch = Batch.make(m, distinct, 4, device)
            slot = token_slots(batch, m)
            for k, outs in TINY.projections():
                proj = Projection(k, outs, 4, rank, dtype, device)
                x = torch.randn(m, k, dtype=dtype, device=device)
                y = torch.zeros(m, sum(outs), dtype=dtype, device=device)
                t = torch.zeros(len(outs), m, rank, dtype=torch.float32, device=device)
                proj.apply(x, y, t, batch, split_k=2 if device == "cpu" else None)  # the interpreter is slow
                ref = reference(x, proj, batch, slot)
                worst = max(worst, float((y.float() - ref).abs().max() / ref.abs().max()))
    return worst


def step_runner(shapes: Shapes, m: int, distinct: int, max_loras: int, rank: int, dtype: torch.dtype,
                device: str, split_k: int | None = None) -> Callable[[], None]:
    """A closure doing one engine step's LoRA work: every layer, every projection group (weights shared by the
    layers: one layer's stacks of 64 adapters are far larger than L2, so reuse does not flatter the timing)."""
    batch = Batch.make(m, distinct, max_loras, device)
    projs = [Projection(k, outs, max_loras, rank, dtype, device) for k, outs in shapes.projections()]
    xs = [torch.randn(m, p.k, dtype=dtype, device=device) for p in projs]
    ys = [torch.zeros(m, sum(p.outs), dtype=dtype, device=device) for p in projs]
    ts = [torch.zeros(len(p.outs), m, rank, dtype=torch.float32, device=device) for p in projs]

    def run() -> None:
        for _ in range(shapes.layers):
            for p, x, y, t in zip(projs, xs, ys, ts):
                p.apply(x, y, t, batch, split_k)
    return run


def time_ms(run: Callable[[], None], device: str, repeats: int, graphs: bool) -> tuple[float, str]:
    """Median ms of ``run`` (CUDA graph replay when possible, as vLLM V1 replays decode steps)."""
    if device != "cuda":
        run()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples), "cpu"
    run(); torch.cuda.synchronize()  # compile, warm up
    mode = "eager"
    if graphs:
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                run()
            torch.cuda.current_stream().wait_stream(s)
            with torch.cuda.graph(g):
                run()
            run, mode = g.replay, "graph"
        except RuntimeError as err:  # a capture failure is a finding, not a crash: fall back to eager
            print(f"graph capture failed ({err}); timing eager", file=sys.stderr)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record(); run(); end.record(); end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples), mode


def fit(rows: list[dict]) -> dict:
    """Per model and rank: ms = c0 + c_tok·M + c_adapter·A + c_slot·(max_loras + 1) (least squares over that rank's
    rows; minimum-norm where a column does not vary); per-adapter cost relative to rank 16."""
    out: dict = {}
    for model in sorted({r["model"] for r in rows}):
        per_rank = {}
        for rank in sorted({r["max_lora_rank"] for r in rows if r["model"] == model}):
            rs = [r for r in rows if r["model"] == model and r["max_lora_rank"] == rank]
            if len(rs) < 3:
                continue
            x = torch.tensor([[1.0, r["tokens"], r["distinct"], r["max_loras"] + 1] for r in rs], dtype=torch.float64)
            y = torch.tensor([r["ms"] for r in rs], dtype=torch.float64)
            c = torch.linalg.lstsq(x, y[:, None]).solution[:, 0].tolist()
            rmse = float(((x @ torch.tensor(c, dtype=torch.float64) - y) ** 2).mean().sqrt())
            per_rank[str(rank)] = {"c0_ms": c[0], "ms_per_token": c[1], "ms_per_adapter": c[2], "ms_per_slot": c[3],
                                   "rmse_ms": rmse,
                                   "points": len(rs)}
        ref = per_rank.get("16")
        for v in per_rank.values():
            if ref and ref["ms_per_adapter"] > 0:
                v["adapter_cost_vs_rank16"] = v["ms_per_adapter"] / ref["ms_per_adapter"]
        out[model] = per_rank
    return out


SPLIT_TOKENS = 128  # vLLM 0.8.5's LoRA kernels switch tiling (split-K 64 -> 8) at this many tokens


def rank_kernel(rows: list[dict]) -> dict:
    """Per model, what each 16-wide rank block beyond the first adds to a step (the profile's ``lora_rank_block_*``
    terms): ms(rank) − ms(16) at the same point = blocks × (slot·S + adapter·A + slot_ktoken·S·M/1000), S = max_loras
    + 1, least squares with every term >= 0, separately below and from SPLIT_TOKENS tokens."""
    out: dict = {}
    for model in sorted({r["model"] for r in rows}):
        at = {(r["max_loras"], r["tokens"], r["distinct"], r["max_lora_rank"]): r["ms"] for r in rows
              if r["model"] == model}
        terms: dict = {"lora_rank_block_split_tokens": float(SPLIT_TOKENS)}
        for suffix, below in (("", True), ("_large", False)):
            x, y = [], []
            for (ml, m, d, rank), ms in at.items():
                b = -(-rank // 16) - 1  # adaptwin.twin.profile.rank_blocks (the script runs without the package)
                if b >= 1 and (ml, m, d, 16) in at and (m < SPLIT_TOKENS) == below:
                    x.append([b * (ml + 1), b * d, b * (ml + 1) * m / 1000])
                    y.append(ms - at[(ml, m, d, 16)])
            coef = [0.0, 0.0, 0.0]
            active = [0, 1, 2]
            while x and active:
                xt = torch.tensor([[row[j] for j in active] for row in x], dtype=torch.float64)
                c = torch.linalg.lstsq(xt, torch.tensor(y, dtype=torch.float64)[:, None]).solution[:, 0].tolist()
                if min(c) >= 0:
                    for j, v in zip(active, c):
                        coef[j] = v
                    break
                active.pop(c.index(min(c)))
            for name, v in zip(("per_slot", "per_adapter", "per_slot_ktoken"), coef):
                terms[f"lora_rank_block_ms_{name}{suffix}"] = v
            terms[f"points{suffix}"] = len(y)
        out[model] = terms
    return out


def read_rows(paths: Sequence[Path]) -> list[dict]:
    """Rows of earlier runs' ``lora_kernels.csv`` files (for ``--refit``)."""
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                rows.append({**r, **{k: int(r[k]) for k in ("max_lora_rank", "max_loras", "distinct", "tokens")},
                             "ms": float(r["ms"])})
    return rows


def write_fits(out: Path, meta: dict, rows: list[dict]) -> None:
    """``OUT/lora_kernels.json``: ``meta``, the per-rank fits and the per-rank-block fit the twin reads."""
    doc = {"meta": meta, "fits": fit(rows), "rank_kernel": rank_kernel(rows)}
    (out / "lora_kernels.json").write_text(json.dumps(doc, indent=1) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    p.add_argument("--quick", action="store_true", help="tiny shapes, short grid (Triton's interpreter on a CPU)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--ranks", default="8,16,32,64")
    p.add_argument("--max-loras", default="8,64")
    p.add_argument("--distinct", default="1,8,32,64")
    p.add_argument("--tokens", default="16,128,512")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--budget-s", type=float, default=240.0, help="stop starting new points after this long")
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--check", action="store_true", help="first compare the kernels with gathered matmuls; exit 1 if off")
    p.add_argument("--refit", nargs="+", type=Path, metavar="CSV",
                   help="measure nothing: write OUT/lora_kernels.json from these lora_kernels.csv files")
    args = p.parse_args(argv)
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(MODELS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.refit:
        rows = read_rows(args.refit)
        args.out.mkdir(parents=True, exist_ok=True)
        write_fits(args.out, {"format": FORMAT, "refit_of": [str(p) for p in args.refit], "points": len(rows)}, rows)
        return 0
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    if args.quick:
        shapes_list, ranks, mls, ds, ms, repeats = [TINY], [8, 16, 32], [3], [1, 3], [16, 20], 1
        dtype, split_k = torch.float32, 2
    else:
        shapes_list = [MODELS[m] for m in args.models.split(",")]
        ranks, mls, ds, ms, repeats = ints(args.ranks), ints(args.max_loras), ints(args.distinct), ints(args.tokens), \
            args.repeats
        dtype, split_k = (torch.bfloat16 if args.device == "cuda" else torch.float32), None
    args.out.mkdir(parents=True, exist_ok=True)
    meta: dict = {}
    if args.check:
        meta["check_max_rel_error"] = err = check(args.device, dtype)
        print(f"kernels vs gathered matmuls: max relative error {err:.2e}", file=sys.stderr)
        if err > (2e-2 if dtype == torch.bfloat16 else 1e-4):
            return 1
    meta |= {"format": FORMAT, "device": args.device, "torch": torch.__version__, "triton": triton.__version__,
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
            "interpreter": os.environ.get("TRITON_INTERPRET") == "1", "dtype": str(dtype).replace("torch.", ""),
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())}
    # ranks, then models innermost: a run cut short by its budget still compares the ranks, for every model, at
    # every point it reached
    points = [(sh, r, ml, d, m) for ml in mls for d in ds for m in ms for sh in shapes_list for r in ranks
              if d <= ml and d <= m]
    fields = ["model", "max_lora_rank", "max_loras", "distinct", "tokens", "ms", "mode"]
    rows: list[dict] = []
    t0 = time.monotonic()
    with open(args.out / "lora_kernels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for i, (sh, rank, ml, d, m) in enumerate(points):
            if time.monotonic() - t0 > args.budget_s:
                print(f"budget reached after {i} of {len(points)} points", file=sys.stderr)
                break
            run = step_runner(sh, m, d, ml, rank, dtype, args.device, split_k)
            ms_, mode = time_ms(run, args.device, repeats, not args.no_graphs)
            row = dict(model=sh.name, max_lora_rank=rank, max_loras=ml, distinct=d, tokens=m, ms=round(ms_, 4),
                       mode=mode)
            rows.append(row)
            w.writerow(row)
            f.flush()
            print(f"[{i + 1}/{len(points)}] {row}", file=sys.stderr)
            if args.device == "cuda":
                del run
                torch.cuda.empty_cache()
    meta["elapsed_s"] = round(time.monotonic() - t0, 1)
    meta["points"] = f"{len(rows)}/{len(points)}"
    write_fits(args.out, meta, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
