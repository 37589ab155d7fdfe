"""``adaptwin profile adapters``: torch micro-benchmarks of adapter families -> CSV, plots, twin tables.

Standard library only at import time; torch is imported when the command runs (docs/adapters.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adaptwin.cliutil import UserError, int_list

__all__ = ["register_profile_adapters"]

MODELS = ("llama-3.1-8b-instruct", "qwen-2.5-7b-instruct")


def register_profile_adapters(profile_sub) -> None:
    p = profile_sub.add_parser(
        "adapters", help="price adapter families (LoRA, parallel, series, fused) with torch micro-benchmarks",
        description="Times one transformer layer of each model with a batch that mixes k distinct adapters, for "
                    "gathered LoRA, parallel and series bottleneck adapters and a fused LoRA variant (checked "
                    "equal to the unfused one first), across ranks, batch sizes and k. Writes adapters.csv, "
                    "adapter_family__<model>.json (the table twin profiles carry) and SVG plots into --out. "
                    "--install-from DIR puts a run's tables into profile files instead. See docs/adapters.md.")
    p.add_argument("--out", default="adapter-profile", help="output folder (default ./adapter-profile)")
    p.add_argument("--model", action="append", choices=MODELS, help="model(s) to measure (default both)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if present")
    p.add_argument("--size", default=None, choices=("full", "cpu", "tiny"),
                   help="layer shapes: full (true), cpu (a quarter of the width), tiny (default full on cuda, cpu on cpu)")
    p.add_argument("--quick", action="store_true", help="tiny shapes and grid (seconds; what CI runs)")
    p.add_argument("--ranks", type=int_list, default=None, help="override the size's ranks, e.g. 8,16,32")
    p.add_argument("--distinct", type=int_list, default=None, help="override distinct-adapter counts, e.g. 1,4,16")
    p.add_argument("--batches", type=int_list, default=None, help="override batch sizes (tokens), e.g. 32,128")
    p.add_argument("--budget-s", type=float, default=1800.0, help="stop measuring after this many seconds")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steady on a shared host)")
    p.add_argument("--no-cuda-graph", action="store_true", help="time eagerly on a GPU")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--install-from", default=None, metavar="DIR",
                   help="do not measure: write DIR/adapter_family__<model>.json into --profiles")
    p.add_argument("--plots-from", default=None, metavar="DIR",
                   help="do not measure: draw the SVG plots of DIR/adapters.csv (e.g. a GPU run's) into DIR")
    p.add_argument("--profiles", nargs="*", default=None,
                   help="profile files for --install-from (default: the shipped ones)")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary last")
    p.set_defaults(func=_adapters)


def _install(args: argparse.Namespace) -> int:
    from adaptwin.profiler.adapters import install_tables

    if args.profiles:
        profiles = [Path(p) for p in args.profiles]
    else:
        from importlib import resources

        folder = resources.files("adaptwin.twin").joinpath("profiles")
        profiles = sorted(Path(str(folder.joinpath(n.name))) for n in folder.iterdir() if n.name.endswith(".json"))
    done = install_tables(args.install_from, profiles)
    summary = {"installed": [str(p) for p in done]}
    if args.json:
        print(json.dumps(summary))
    else:
        print("\n".join(f"updated {p}" for p in done) or "no profile updated")
    return 0 if done else 1


def _plots(args: argparse.Namespace) -> int:
    from adaptwin.profiler.adapters import read_rows, write_plots

    rows = read_rows(Path(args.plots_from) / "adapters.csv")
    plots = [str(p) for m in dict.fromkeys(r["model"] for r in rows) for p in write_plots(rows, m, args.plots_from)]
    if args.json:
        print(json.dumps({"plots": plots}))
    else:
        print("\n".join(f"wrote {p}" for p in plots))
    return 0


def _adapters(args: argparse.Namespace) -> int:
    if args.install_from:
        return _install(args)
    if args.plots_from:
        return _plots(args)
    try:
        import torch
    except ImportError:
        raise UserError("`profile adapters` needs torch: pip install 'adaptwin[profile]'") from None
    from dataclasses import replace

    from tqdm import tqdm

    from adaptwin.profiler import gpu_adapters as ga
    from adaptwin.profiler.adapters import write_plots

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no GPU; use --device cpu")
    size = "tiny" if args.quick else (args.size or ("full" if device == "cuda" else "cpu"))
    grid = ga.GRIDS[size]
    grid = replace(grid, **{k: tuple(v) for k, v in (("ranks", args.ranks), ("distinct", args.distinct),
                                                     ("batches", args.batches)) if v})
    try:
        grid.check()
    except ValueError as err:
        raise UserError(f"bad grid: {err}") from None
    models = tuple(args.model or MODELS)
    cfg = ga.RunConfig(models=models, size=size, grid=grid, device=device,
                       dtype="bfloat16" if device == "cuda" else "float32", use_graphs=not args.no_cuda_graph,
                       budget_s=args.budget_s, threads=args.threads)
    out = Path(args.out)
    total = len(grid.points()) * len(models)
    with tqdm(total=total, desc="profile adapters", unit="pt", file=sys.stderr) as bar:
        try:
            res = ga.run(cfg, out, progress=bar.update)
        except ga.EquivalenceError as err:
            raise UserError(f"{err}; nothing was timed for that point (see docs/adapters.md)") from None
    tables = res.pop("_tables")
    plots: list[str] = []
    if not args.no_plots:
        from adaptwin.profiler.adapters import read_rows

        rows = read_rows(out / "adapters.csv")
        for model in tables:
            plots += [str(p) for p in write_plots(rows, model, out)]
    summary = {**res, "plots": plots, "size": size, "device": device}
    for model, table in tables.items():
        print(f"{model} ({size} shapes, {device}): LoRA-term multiplier vs gathered LoRA "
              f"(rows rank {table['ranks']}, columns k {table['distinct']})")
        for fam, rows_ in table["multiplier"].items():
            print(f"  {fam:9s}" + "  ".join("[" + " ".join(f"{v:.2f}" for v in r) + "]" for r in rows_))
    if args.json:
        print(json.dumps(summary))
    if not tables:
        raise UserError(f"no complete table measured (budget {args.budget_s:.0f} s too short?); rows are in "
                        f"{res['csv']}")
    return 0
