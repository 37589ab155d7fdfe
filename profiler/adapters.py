"""Adapter-family tables for twin profiles: run the torch benchmark, plot it, check tables, carry them into profiles.

The measurement itself lives in :mod:`adaptwin.profiler.gpu_adapters` (a stand-alone script for GPU machines);
this module is the package side of ``adaptwin profile adapters`` and ``adaptwin twin fit --adapter-table``.
docs/adapters.md describes the benchmark, the table and how the twin uses it.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Iterable

from adaptwin.cliutil import UserError
from adaptwin.twin.profile import ADAPTER_FAMILIES, AdapterFamilyTable, ProfileError

log = logging.getLogger(__name__)

__all__ = ["load_table", "check_table", "write_plots", "install_tables", "read_rows"]


def check_table(table: Any, where: str) -> dict[str, Any]:
    """``table`` if a twin profile can carry it; a :class:`UserError` saying what is wrong otherwise."""
    try:
        AdapterFamilyTable.from_dict(table, where)
    except ProfileError as err:
        raise UserError(str(err)) from None
    return table


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of an ``adapters.csv``."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as err:
        raise UserError(f"cannot read adapter table {path}: {err.strerror}") from None
    need = {"model", "rank", "distinct", "batch", "variant", "median_ms", "overhead_ms", "overhead_pct"}
    if not rows or not need <= set(rows[0]):
        raise UserError(f"{path} is not an adapters.csv of `adaptwin profile adapters` "
                        f"(needs columns {', '.join(sorted(need))})")
    return rows


def load_table(path: str | Path, model: str) -> dict[str, Any]:
    """The adapter-family table of ``model`` from an ``adapter_family__<model>.json``, a profile JSON that carries
    one, or an ``adapters.csv`` (rebuilt from its rows); checked as the twin checks it."""
    path = Path(path)
    if path.suffix.lower() == ".csv":
        rows = read_rows(path)
        from adaptwin.profiler.gpu_adapters import build_table  # torch: the profile extra

        try:
            table = build_table(rows, model, {"source": str(path.name)})
        except ValueError as err:
            raise UserError(f"{path}: {err}") from None
        return check_table(table, str(path))
    try:
        data = json.loads(path.read_text())
    except OSError as err:
        raise UserError(f"cannot read adapter table {path}: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"adapter table {path} is not valid JSON: {err}") from None
    if isinstance(data, dict) and "adapter_family" in data and "step_time" in data:
        data = data["adapter_family"]  # a whole profile: take its table
    if isinstance(data, dict) and data.get("model") not in (None, model):
        raise UserError(f"adapter table {path} is for model {data['model']!r}, not {model!r}")
    return check_table(data, str(path))


def _by_point(rows: Iterable[dict[str, Any]], model: str) -> dict[tuple[int, int, str], list[float]]:
    pts: dict[tuple[int, int, str], list[float]] = {}
    for r in rows:
        if r["model"] == model and r["variant"] in ADAPTER_FAMILIES and r["overhead_pct"] not in ("", None):
            pts.setdefault((int(r["rank"]), int(r["distinct"]), r["variant"]), []).append(float(r["overhead_pct"]))
    return pts


def write_plots(rows: list[dict[str, Any]], model: str, out: str | Path) -> list[Path]:
    """``overhead_vs_k__<model>.svg`` (one panel per rank) and ``overhead_vs_rank__<model>.svg`` (one panel per
    distinct-adapter count, smallest and largest): overhead in % of the layer without adapters, mean over batches."""
    from adaptwin.profiler.adapters_plot import Panel, small_multiples, write_svg

    pts = _by_point(rows, model)
    if not pts:
        return []
    ranks = sorted({r for r, _, _ in pts})
    ks = sorted({k for _, k, _ in pts})
    mean = {key: sum(v) / len(v) for key, v in pts.items()}
    by_k = [Panel(f"rank {r}", {f: [(k, mean[(r, k, f)]) for k in ks if (r, k, f) in mean] for f in ADAPTER_FAMILIES})
            for r in ranks]
    by_rank = [Panel(f"{k} adapter{'s' if k > 1 else ''}",
                     {f: [(r, mean[(r, k, f)]) for r in ranks if (r, k, f) in mean] for f in ADAPTER_FAMILIES})
               for k in dict.fromkeys((ks[0], ks[-1]))]
    out = Path(out)
    return [
        write_svg(out / f"overhead_vs_k__{model}.svg",
                  small_multiples(by_k, "distinct adapters in the batch (k)", "overhead % of layer",
                                  f"{model}: adapter overhead vs k")),
        write_svg(out / f"overhead_vs_rank__{model}.svg",
                  small_multiples(by_rank, "rank / bottleneck width", "overhead % of layer",
                                  f"{model}: adapter overhead vs rank")),
    ]


def install_tables(src: str | Path, profiles: list[str | Path]) -> list[Path]:
    """Write ``src/adapter_family__<model>.json`` into each profile file for that model (replacing its table)."""
    from adaptwin.profiler.fit import write_profile

    done = []
    for prof_path in map(Path, profiles):
        try:
            prof = json.loads(prof_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read profile {prof_path}: {err}") from None
        table_path = Path(src) / f"adapter_family__{prof.get('model')}.json"
        if not table_path.is_file():
            log.warning("no table for %s in %s; %s left as it is", prof.get("model"), src, prof_path)
            continue
        prof["adapter_family"] = load_table(table_path, prof["model"])
        write_profile(prof, prof_path)
        done.append(prof_path)
    return done
