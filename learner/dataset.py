"""Read labelled runs (scenario CSVs, twin sweep files) into :class:`Run` records for the learner.

Three layouts are understood, told apart by their header:

* **scenario CSV** (``data/validation/scenarios_table1.csv``, DESIGN.md §CLI contract): inputs
  ``model, rates, ranks, served_adapters, max_loras, max_lora_rank, duration_s`` (lists ``;``-separated, the paper's
  round-robin assignment), outcomes ``total_throughput, starved``. Other columns are ignored.
* **twin validate output** (``adaptwin twin validate --out``): the same inputs, outcomes ``sim_total_throughput,
  sim_starved`` (used when ``total_throughput`` is absent, or when ``prefer_sim`` is set).
* **ML grid** (``data/validation/ml_train_sim.csv.gz``): ``model, served_adapters, adapter_slots, rates, sizes,
  max_size, rate_counts, size_counts`` and outcomes ``sim_total_throughput, starved_est``.

Files may be gzip-compressed (``.gz``).

>>> import io
>>> text = "model,rates,ranks,served_adapters,max_loras,max_lora_rank,duration_s,total_throughput,starved\\n" \\
...        "llama-3.1-8b-instruct,0.1;0.05,8;16,4,4,16,3600,100.5,0\\n"
>>> runs = read_runs(io.StringIO(text))
>>> runs[0].scenario.rate_counts, runs[0].throughput, runs[0].starved
((2, 2), 100.5, 0)
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable

from adaptwin.learner.features import Scenario, model_facts

__all__ = ["DatasetError", "Run", "read_runs", "SCENARIO_INPUTS", "SCENARIO_OUTCOMES"]

SCENARIO_INPUTS = ("model", "rates", "ranks", "served_adapters", "max_loras", "max_lora_rank", "duration_s")
SCENARIO_OUTCOMES = ("total_throughput", "starved")
GRID_INPUTS = ("model", "served_adapters", "adapter_slots", "rates", "sizes", "rate_counts", "size_counts")


class DatasetError(ValueError):
    """A dataset cannot be read; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Run:
    """One labelled run: the scenario and what came out of it."""

    scenario: Scenario
    throughput: float
    """Total (input + output) tokens/s of requests completed inside the window."""
    starved: int
    """1 when the run completed < 90 % of the offered tokens (paper §1.3)."""
    line: int = 0
    """Line of the source file (1 = header)."""


def _floats(text: str, where: str) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in str(text).replace(",", ";").split(";") if x.strip())
    except ValueError:
        raise DatasetError(f"{where}: expected a ';'-separated list of numbers, got {text!r}") from None
    if not out:
        raise DatasetError(f"{where}: empty list")
    return out


def _num(row: dict, key: str, where: str) -> float:
    text = row.get(key)
    if text is None or str(text).strip() == "":
        raise DatasetError(f"{where}: column '{key}' is empty")
    try:
        v = float(text)
    except ValueError:
        raise DatasetError(f"{where}: column '{key}' must be a number, got {text!r}") from None
    if not math.isfinite(v):
        raise DatasetError(f"{where}: column '{key}' must be finite, got {text!r}")
    return v


def _open(source) -> IO[str]:
    if hasattr(source, "read"):
        return source
    path = Path(source)
    try:
        if path.suffix == ".gz":
            return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
        return open(path, encoding="utf-8", newline="")
    except OSError as err:
        raise DatasetError(f"cannot read dataset {path}: {err.strerror}") from None


def read_runs(source, prefer_sim: bool = False, limit: int | None = None) -> list[Run]:
    """All runs of a file (path or text stream), in file order.

    ``prefer_sim`` takes the ``sim_*`` outcomes of a twin validate output even when real outcomes are present.
    Raises :class:`DatasetError` on a missing column or a malformed row.
    """
    name = getattr(source, "name", str(source))
    fh = _open(source)
    try:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        if all(c in header for c in GRID_INPUTS):
            rows = _grid_rows(reader, name)
        else:
            missing = [c for c in SCENARIO_INPUTS if c not in header]
            if missing:
                raise DatasetError(f"dataset {name} lacks input column(s) {', '.join(missing)}: a scenario CSV needs "
                                   f"{', '.join(SCENARIO_INPUTS)} (or the ML grid's {', '.join(GRID_INPUTS)})")
            if (prefer_sim or "total_throughput" not in header) and "sim_total_throughput" in header:
                out_t, out_s = "sim_total_throughput", "sim_starved"
            else:
                out_t, out_s = SCENARIO_OUTCOMES
            missing = [c for c in (out_t, out_s) if c not in header]
            if missing:
                raise DatasetError(f"dataset {name} lacks outcome column(s) {', '.join(missing)}: the learner needs "
                                   "total_throughput and starved (0/1) for every row")
            rows = _scenario_rows(reader, name, out_t, out_s)
        out = []
        for run in rows:
            out.append(run)
            if limit is not None and len(out) >= limit:
                break
        return out
    except csv.Error as err:
        raise DatasetError(f"dataset {name} is not valid CSV: {err}") from None
    finally:
        if fh is not source:
            fh.close()


def _starved(text, where: str) -> int:
    s = str(text).strip().lower()
    if s in ("1", "1.0", "true"):
        return 1
    if s in ("0", "0.0", "false"):
        return 0
    raise DatasetError(f"{where}: 'starved' must be 0 or 1, got {text!r}")


def _scenario_rows(reader: csv.DictReader, name: str, out_t: str, out_s: str) -> Iterable[Run]:
    for i, row in enumerate(reader, start=2):
        where = f"{name} line {i}"
        try:
            sc = Scenario.round_robin(
                row["model"].strip(), _floats(row["rates"], where), [int(x) for x in _floats(row["ranks"], where)],
                int(_num(row, "served_adapters", where)), int(_num(row, "max_loras", where)),
                int(_num(row, "max_lora_rank", where)), _num(row, "duration_s", where))
        except ValueError as err:
            if isinstance(err, DatasetError):
                raise
            raise DatasetError(f"{where}: {err}") from None
        thr = _num(row, out_t, where)
        if thr < 0:
            raise DatasetError(f"{where}: '{out_t}' must be >= 0, got {thr}")
        yield Run(sc, thr, _starved(row.get(out_s, ""), where), i)


def _grid_rows(reader: csv.DictReader, name: str) -> Iterable[Run]:
    for i, row in enumerate(reader, start=2):
        where = f"{name} line {i}"
        if row.get("status", "ok") not in ("ok", ""):
            continue
        rates = _floats(row["rates"], where)
        sizes = tuple(int(x) for x in _floats(row["sizes"], where))
        rc = tuple(int(x) for x in _floats(row["rate_counts"], where))
        sc_ = tuple(int(x) for x in _floats(row["size_counts"], where))
        served = int(_num(row, "served_adapters", where))
        mlr = int(_num(row, "max_size", where)) if row.get("max_size") else max(sizes)
        try:
            sc = Scenario(row["model"].strip(), rates, rc, sizes, sc_, served, int(_num(row, "adapter_slots", where)),
                          mlr, 3600.0)
        except ValueError as err:
            raise DatasetError(f"{where}: {err}") from None
        starved = row.get("starved_est", row.get("sim_starved", ""))
        thr = _num(row, "sim_total_throughput", where)
        if row.get("mean_tokens_per_request_used"):
            # The paper's twin re-drew lengths (mean ~462 tokens/request instead of ~420): rescale so that the
            # fraction of the offered load it completed is kept, which is what transfers to real runs.
            thr *= model_facts(sc.model).mean_tokens / _num(row, "mean_tokens_per_request_used", where)
        yield Run(sc, thr, _starved(starved, where), i)
