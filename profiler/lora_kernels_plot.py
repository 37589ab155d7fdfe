"""SVG charts of ``profiler/gpu_lora_kernels.py``'s measurements: what a max_lora_rank above 16 costs, by step size.

    python -m adaptwin.profiler.lora_kernels_plot CSV [CSV ...] --out DIR [--rank 32]

One chart per model (``rank32_vs_16__<model>.svg``), one panel per max_loras, x = tokens in the step (log2 axis), one
line per number of distinct adapters: the step's LoRA kernel time at the given rank over rank 16 at the same point.
vLLM 0.8.5's kernels change tiling at 128 tokens (split-K 64 -> 8), which shows as the drop there (docs/gpu-profile.md).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Sequence

from adaptwin.profiler.adapters_plot import Panel, small_multiples, write_svg

__all__ = ["rank_ratios", "read_rows", "write_plots"]


def rank_ratios(rows: list[dict], model: str, rank: int = 32) -> dict[int, dict[int, list[tuple[int, float]]]]:
    """``{max_loras: {distinct: [(tokens, ms at rank / ms at 16), ...]}}`` of ``model``, over the points measured
    at both ranks (a later row of the same point replaces an earlier one, as when two runs overlap)."""
    ms = {(int(r["max_loras"]), int(r["distinct"]), int(r["tokens"]), int(r["max_lora_rank"])): float(r["ms"])
          for r in rows if r["model"] == model}
    out: dict[int, dict[int, list[tuple[int, float]]]] = {}
    for (ml, d, t, r), v in sorted(ms.items()):
        if r == rank and (ml, d, t, 16) in ms:
            out.setdefault(ml, {}).setdefault(d, []).append((t, v / ms[(ml, d, t, 16)]))
    return out


def write_plots(rows: list[dict], out: str | Path, rank: int = 32) -> list[Path]:
    """One SVG per model with measurements at ``rank`` and 16; returns the paths written."""
    paths = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ratios = rank_ratios(rows, model, rank)
        panels = [Panel(f"max_loras {ml}", {f"{d} adapter{'s' if d > 1 else ''}": pts for d, pts in by_d.items()
                                            if len(pts) > 1})
                  for ml, by_d in sorted(ratios.items())]
        if panels:
            paths.append(write_svg(Path(out) / f"rank{rank}_vs_16__{model}.svg", small_multiples(
                panels, "tokens in the step", f"kernel time, rank {rank} / 16",
                f"{model}: LoRA kernels at max_lora_rank {rank} against 16 (H100)")))
    return paths


def read_rows(paths: Sequence[Path]) -> list[dict]:
    """The rows of ``lora_kernels.csv`` files, in order (a later file's point replaces an earlier one's)."""
    rows: list[dict] = []
    for path in paths:
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+", type=Path, help="lora_kernels*.csv of gpu_lora_kernels.py runs")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--rank", type=int, default=32)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"plots": [str(p) for p in write_plots(read_rows(args.csv), args.out, args.rank)]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
