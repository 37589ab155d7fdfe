"""``adaptwin twin validate``: run every row of a scenario CSV through the twin, in input order, on N processes."""

from __future__ import annotations

import csv
import logging
import math
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Iterable

from adaptwin.twin.config import ConfigError

__all__ = ["read_scenarios", "run_rows", "SUMMARY_FIELDS"]

log = logging.getLogger("adaptwin.twin.validate")

REQUIRED = ("model", "rates", "ranks", "served_adapters", "max_loras", "max_lora_rank", "duration_s")
SUMMARY_FIELDS = ("total_throughput", "ideal_total_throughput", "starved", "arrivals", "finished", "mean_ttft_ms",
                  "mean_itl_ms", "adapter_loads", "wall_s")


def read_scenarios(path: str) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = list(reader.fieldnames or [])
    except OSError as err:
        raise ConfigError(f"cannot read scenarios {path}: {err.strerror}") from None
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ConfigError(f"scenario CSV {path} lacks column(s) {', '.join(missing)}; needs {', '.join(REQUIRED)}")
    if not rows:
        raise ConfigError(f"scenario CSV {path} has no rows")
    return header, rows


def _num(row: dict, key: str, kind=float):
    try:
        v = float(row[key])
    except (TypeError, ValueError):
        raise ConfigError(f"column {key} must be a number, got {row.get(key)!r}") from None
    if not math.isfinite(v):
        raise ConfigError(f"column {key} must be finite, got {row.get(key)!r}")
    return kind(v)


def run_row(args: tuple[int, dict[str, str], dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    """Simulate one scenario row; returns (index, sim_* fields) — or an ``sim_error`` on a bad row."""
    from adaptwin.twin.profile import ProfileError
    from adaptwin.twin.runner import parse_list, run_scenario

    i, row, opts = args
    try:
        seeds = opts.get("seeds", [opts.get("seed", 0)])
        light = opts.get("light_seeds")  # (max expected requests, seeds): average more seeds where runs are cheap
        if light:
            rates = parse_list(row["rates"])
            served = _num(row, "served_adapters", int)
            expected = sum(rates[k % len(rates)] for k in range(served)) * _num(row, "duration_s")
            if expected <= light[0]:
                seeds = list(light[1])
        results = []
        for seed in seeds:
            res = run_scenario(
                row["model"], parse_list(row["rates"]), parse_list(row["ranks"], int),
                _num(row, "served_adapters", int), _num(row, "max_loras", int),
                _num(row, "max_lora_rank", int) if row.get("max_lora_rank") else None,
                duration=opts.get("duration") or _num(row, "duration_s"), seed=seed,
                profile=opts.get("profiles", {}).get(row["model"]))
            results.append(res.summary())
        out = {f"sim_{k}": (sum(r[k] for r in results) / len(results)) for k in SUMMARY_FIELDS}
        for k in ("starved", "arrivals", "finished", "adapter_loads"):
            out[f"sim_{k}"] = int(round(out[f"sim_{k}"])) if k != "starved" else int(out[f"sim_{k}"] >= 0.5)
        out["sim_error"] = ""
    except (ConfigError, ProfileError, KeyError) as err:
        out = {f"sim_{k}": "" for k in SUMMARY_FIELDS}
        out["sim_error"] = str(err)
    return i, out


def run_rows(rows: list[dict[str, str]], jobs: int = 1, progress: bool = True, **opts) -> list[dict[str, Any]]:
    """sim_* fields for each row, in input order, computed on ``jobs`` processes."""
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(rows)))
    work = [(i, r, opts) for i, r in enumerate(rows)]
    results: list[dict[str, Any] | None] = [None] * len(rows)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), desc="twin validate", unit="run", file=__import__("sys").stderr)
    if jobs == 1:
        it: Iterable = map(run_row, work)
        for i, out in it:
            results[i] = out
            if bar:
                bar.update(1)
    else:
        # longest first keeps both cores busy to the end; results are put back in input order
        order = sorted(work, key=lambda w: -_cost_hint(w[1]))
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            for i, out in pool.map(run_row, order, chunksize=1):
                results[i] = out
                if bar:
                    bar.update(1)
    if bar:
        bar.close()
    return results  # type: ignore[return-value]


def _cost_hint(row: dict[str, str]) -> float:
    try:
        from adaptwin.twin.runner import parse_list

        return sum(parse_list(row["rates"])) * float(row["served_adapters"]) / 3 * float(row["duration_s"])
    except Exception:  # noqa: BLE001 - only an ordering hint
        return 0.0


def write_output(path: str, header: list[str], rows: list[dict[str, str]], sims: list[dict[str, Any]]) -> None:
    fields = header + [f"sim_{k}" for k in SUMMARY_FIELDS] + ["sim_error"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for row, sim in zip(rows, sims):
            w.writerow({**row, **sim})
