"""Sweeps: a design of workloads × configurations simulated to a Parquet dataset, one row per run (Kafka-free).

A :class:`SweepTask` is one twin run (the paper's workload on one configuration, one seed); its ``task_id`` is a hash
of everything that determines the run, so a task is the same task whoever plans it, and the dataset, which keeps one
row per task id, can be resumed and de-duplicated. :func:`grid_design` crosses workloads with served × max_loras (max_loras
<= served); :func:`random_design` draws both from the paper's rates, ranks and grid. :func:`run_task` simulates one task
to a row: the twin's ``--json`` summary plus the workload's features (as the paper's ML dataset has them).
:class:`SweepDataset` is a folder of Parquet part files, each written to a temporary name and renamed into place, so an
interrupted sweep leaves whole files; a re-run skips the task ids already there. The Kafka transport (tasks out,
results back, workers in a consumer group) lives in ``adaptwin.replay.worker``.

>>> tasks = grid_design([("llama-3.1-8b-instruct", (0.4, 0.2), (8, 16))], served=[16, 32], max_loras=[16, 32],
...                     duration=60.0)
>>> [(t.served, t.max_loras) for t in tasks]
[(16, 16), (32, 16), (32, 32)]
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from adaptwin.twin.config import ConfigError
from adaptwin.twin.search import PAPER_GRID

__all__ = ["SweepTask", "grid_design", "random_design", "check_design", "run_task", "SweepDataset", "run_local", "PAPER_RATES",
           "ROW_FIELDS"]

log = logging.getLogger("adaptwin.twin.sweep")

PAPER_RATES: tuple[float, ...] = (3.2, 1.6, 0.8, 0.4, 0.2, 0.1, 0.05, 0.025, 0.0125, 0.00625, 0.003125)
"""Per-adapter rates (req/s) of the paper's workloads."""
PAPER_RANKS: tuple[int, ...] = (8, 16, 32)
SUMMARY_FIELDS = ("total_throughput", "ideal_total_throughput", "starved", "arrivals", "finished", "mean_ttft_ms",
                  "mean_itl_ms", "adapter_loads", "wall_s")


@dataclass(frozen=True)
class SweepTask:
    """One run: the paper's workload (``rates``/``ranks`` per adapter group) on one configuration and seed."""

    model: str
    rates: tuple[float, ...]
    ranks: tuple[int, ...]
    served: int
    max_loras: int
    max_lora_rank: int
    duration: float = 3600.0
    seed: int = 0

    def __post_init__(self) -> None:
        rates = tuple(float(r) for r in self.rates)
        ranks = tuple(int(r) for r in self.ranks)
        if not rates or any(not math.isfinite(r) or r < 0 for r in rates) or sum(rates) <= 0:
            raise ConfigError(f"a sweep workload needs finite rates >= 0 with some traffic, got {list(rates)} "
                              "(e.g. --rates 0.1,0.05,0.025)")
        if not ranks or min(ranks) < 1:
            raise ConfigError(f"a sweep workload needs ranks >= 1, got {list(ranks)} (e.g. --ranks 8,16,32)")
        if max(ranks) > int(self.max_lora_rank):
            raise ConfigError(f"rank {max(ranks)} is above --max-lora-rank {self.max_lora_rank}: vLLM refuses such "
                              "adapters; raise --max-lora-rank or lower --ranks")
        if not 1 <= int(self.max_loras) <= int(self.served):
            raise ConfigError(f"max_loras {self.max_loras} must be between 1 and served adapters {self.served}")
        if not (math.isfinite(self.duration) and self.duration > 0):
            raise ConfigError(f"duration must be a positive number of seconds, got {self.duration}")
        object.__setattr__(self, "rates", rates)
        object.__setattr__(self, "ranks", ranks)
        for name in ("served", "max_loras", "max_lora_rank", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "duration", float(self.duration))

    @property
    def task_id(self) -> str:
        """Stable id: a hash of every field (the same run planned twice has the same id)."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {"task_id": self.task_id, **asdict(self), "rates": list(self.rates), "ranks": list(self.ranks)}

    @classmethod
    def from_dict(cls, d: dict) -> "SweepTask":
        """From :meth:`to_dict`'s output; ConfigError names what is missing or wrong."""
        try:
            task = cls(model=str(d["model"]), rates=tuple(d["rates"]), ranks=tuple(d["ranks"]),
                       served=d["served"], max_loras=d["max_loras"], max_lora_rank=d["max_lora_rank"],
                       duration=float(d.get("duration", 3600.0)), seed=d.get("seed", 0))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"not a sweep task ({type(err).__name__}: {err})") from None
        if "task_id" in d and d["task_id"] != task.task_id:
            raise ConfigError(f"task id {d['task_id']!r} does not match the task's fields ({task.task_id})")
        return task


Workload = tuple  # (model, rates, ranks)


def grid_design(workloads: Sequence[Workload], served: Iterable[int], max_loras: Iterable[int],
                duration: float = 3600.0, seeds: Iterable[int] = (0,), max_lora_rank: int | None = None
                ) -> list[SweepTask]:
    """Every workload × served × max_loras (max_loras <= served) × seed."""
    served_v, slots_v, seeds_v = sorted({int(s) for s in served}), sorted({int(g) for g in max_loras}), list(seeds)
    if not workloads:
        raise ConfigError("no workload: give --rates and --ranks (or --random N)")
    if not served_v or not slots_v:
        raise ConfigError("empty grid: give --served and --max-loras values, e.g. --served 16,32 --max-loras 8,16")
    if min(served_v + slots_v) < 1:
        raise ConfigError(f"grid values must be positive integers, got served {served_v}, max_loras {slots_v}")
    if not seeds_v:
        raise ConfigError("give at least one seed")
    tasks = []
    for model, rates, ranks in workloads:
        mlr = max_lora_rank if max_lora_rank is not None else (max(ranks) if ranks else 1)
        for seed in seeds_v:
            for g in slots_v:
                for s in served_v:
                    if g <= s:
                        tasks.append(SweepTask(model, tuple(rates), tuple(ranks), s, g, mlr, duration, seed))
    if not tasks:
        raise ConfigError(f"empty grid: no max_loras in {slots_v} is <= a served value in {served_v}")
    tasks.sort(key=lambda t: (t.model, t.rates, t.ranks, t.seed, t.max_loras, t.served))
    return tasks


def random_design(n: int, models: Sequence[str], seed: int = 0, groups: int = 3, grid: Sequence[int] = PAPER_GRID,
                  duration: float = 3600.0) -> list[SweepTask]:
    """``n`` runs with workloads and configurations drawn like the paper's: ``groups`` rates from PAPER_RATES,
    ranks from 8/16/32, served and max_loras (<= served) from ``grid``; seeded."""
    if n < 1:
        raise ConfigError(f"--random needs a positive number of runs, got {n}")
    if not models:
        raise ConfigError("give at least one --model")
    rng = random.Random(seed)
    grid_v = sorted({int(v) for v in grid})
    if not grid_v or grid_v[0] < 1:
        raise ConfigError(f"grid values must be positive integers, got {list(grid)}")
    tasks: dict[str, SweepTask] = {}
    tries = 0
    while len(tasks) < n and tries < 100 * n:
        tries += 1
        rates = tuple(sorted(rng.sample(PAPER_RATES, groups), reverse=True))
        ranks = tuple(sorted(rng.choice(PAPER_RANKS) for _ in range(groups)))
        s = rng.choice(grid_v)
        g = rng.choice([v for v in grid_v if v <= s])
        t = SweepTask(rng.choice(list(models)), rates, ranks, s, g, max(ranks), duration, rng.randrange(1 << 16))
        tasks.setdefault(t.task_id, t)
    return list(tasks.values())


def check_design(tasks: Sequence[SweepTask]) -> None:
    """Refuse, before anything runs, a design the twin cannot answer: an unknown model, or a max LoRA rank above
    what the model's profile was measured with."""
    from adaptwin.twin.profile import ProfileError, load_profile
    from adaptwin.twin.search import check_rank_measured

    by_model: dict[str, int] = {}
    for t in tasks:
        by_model[t.model] = max(by_model.get(t.model, 0), t.max_lora_rank)
    for model, rank in by_model.items():
        try:
            prof = load_profile(model)
        except ProfileError as err:
            raise ConfigError(str(err)) from None
        check_rank_measured(prof, rank)


def _features(task: SweepTask) -> dict:
    """The workload as the paper's ML dataset describes it, plus the offered load of this served count."""
    rates, ranks = task.rates, task.ranks
    n = len(rates)
    mean_r = sum(rates) / n
    mean_k = sum(ranks) / len(ranks)
    offered = sum(rates[k % n] for k in range(task.served))  # round-robin: req/s over all served adapters
    return {
        "rates": ";".join(repr(r) for r in rates), "ranks": ";".join(str(k) for k in ranks), "groups": n,
        "max_rate": max(rates), "min_rate": min(rates), "mean_rate": mean_r,
        "std_rate": math.sqrt(sum((r - mean_r) ** 2 for r in rates) / n),
        "max_rank": max(ranks), "min_rank": min(ranks), "mean_rank": mean_k,
        "offered_rps": offered,
    }


ROW_FIELDS = ("task_id", "model", "served_adapters", "max_loras", "max_lora_rank", "duration_s", "seed") + \
    tuple(_features(SweepTask("m", (1.0,), (8,), 1, 1, 8)).keys()) + SUMMARY_FIELDS + ("error",)


def run_task(task: SweepTask, profiles: dict | None = None) -> dict:
    """Simulate one task: a dataset row. A configuration vLLM cannot start is a row with ``error`` set and no
    metrics (it is an answer too: that point of the grid does not exist)."""
    from adaptwin.twin.profile import load_profile
    from adaptwin.twin.runner import run_scenario

    profiles = profiles if profiles is not None else {}
    row = {"task_id": task.task_id, "model": task.model, "served_adapters": task.served,
           "max_loras": task.max_loras, "max_lora_rank": task.max_lora_rank, "duration_s": task.duration,
           "seed": task.seed, **_features(task)}
    row.update({k: None for k in SUMMARY_FIELDS})
    row["error"] = ""
    try:
        prof = profiles.get(task.model)
        if prof is None:
            prof = profiles[task.model] = load_profile(task.model)
        t0 = time.perf_counter()
        s = run_scenario(prof.model, task.rates, task.ranks, task.served, task.max_loras, task.max_lora_rank,
                         task.duration, task.seed, profile=prof, window_s=60.0).summary()
        s["wall_s"] = round(time.perf_counter() - t0, 4)
        row.update({k: s[k] for k in SUMMARY_FIELDS})
    except ConfigError as err:
        row["error"] = str(err)
    except Exception as err:  # noqa: BLE001 -- e.g. an unknown model's missing profile: a row, not a dead sweep
        row["error"] = f"{type(err).__name__}: {err}"
    return row


def _schema():
    import pyarrow as pa

    types = {"task_id": pa.string(), "model": pa.string(), "rates": pa.string(), "ranks": pa.string(),
             "error": pa.string(), "max_rate": pa.float64(), "min_rate": pa.float64(), "mean_rate": pa.float64(),
             "std_rate": pa.float64(), "mean_rank": pa.float64(), "offered_rps": pa.float64(),
             "duration_s": pa.float64(), "total_throughput": pa.float64(), "ideal_total_throughput": pa.float64(),
             "mean_ttft_ms": pa.float64(), "mean_itl_ms": pa.float64(), "wall_s": pa.float64()}
    return pa.schema([(f, types.get(f, pa.int64())) for f in ROW_FIELDS])


class SweepDataset:
    """A folder of Parquet part files with one row per task id (written by one sweep at a time)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"{self.path} is a file; the sweep dataset is a folder of Parquet files: give a "
                              "folder name with --out")

    def parts(self) -> list[Path]:
        return sorted(self.path.glob("part-*.parquet")) if self.path.is_dir() else []

    def done_ids(self) -> set[str]:
        import pyarrow.parquet as pq

        done: set[str] = set()
        for p in self.parts():
            done.update(pq.read_table(p, columns=["task_id"]).column("task_id").to_pylist())
        return done

    def append(self, rows: list[dict]) -> Path | None:
        """Write ``rows`` as one new part file (temporary name, fsync, rename: a crash leaves whole files only)."""
        if not rows:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist([{f: r.get(f) for f in ROW_FIELDS} for r in rows], schema=_schema())
        name = f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}.parquet"
        tmp = self.path / f".{name}.tmp"
        with open(tmp, "wb") as f:
            pq.write_table(table, f, compression="zstd")
            f.flush()
            os.fsync(f.fileno())
        final = self.path / name
        os.replace(tmp, final)
        return final

    def read(self):
        """The whole dataset as one Arrow table (duplicates of a task id, if a crash left any, dropped)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = [pq.read_table(p) for p in self.parts()]
        if not tables:
            return _schema().empty_table()
        table = pa.concat_tables(tables)
        ids = table.column("task_id").to_pylist()
        seen: set[str] = set()
        keep = [i for i, t in enumerate(ids) if not (t in seen or seen.add(t))]
        return table.take(keep) if len(keep) < len(ids) else table


def _worker_init() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and writes what is done


_PROFILES: dict = {}


def _run_in_pool(task_dict: dict) -> dict:
    return run_task(SweepTask.from_dict(task_dict), _PROFILES)


def run_local(tasks: Sequence[SweepTask], dataset: SweepDataset, jobs: int = 1, flush_every: int = 50,
              flush_s: float = 10.0, on_row: Callable[[dict], None] | None = None) -> dict:
    """Simulate the tasks not yet in ``dataset`` with ``jobs`` processes, appending rows in batches (every
    ``flush_every`` rows or ``flush_s`` seconds). Returns counts: planned, skipped (already done), run, errors."""
    done = dataset.done_ids()
    unique = _unique(tasks)
    todo = [t for t in unique if t.task_id not in done]
    stats = {"planned": len(unique), "skipped": len(unique) - len(todo), "run": 0, "errors": 0}
    buf: list[dict] = []
    last = time.monotonic()

    def take(row: dict) -> None:
        nonlocal last
        buf.append(row)
        stats["run"] += 1
        stats["errors"] += int(bool(row["error"]))
        if on_row is not None:
            on_row(row)
        if len(buf) >= flush_every or time.monotonic() - last >= flush_s:
            dataset.append(buf)
            buf.clear()
            last = time.monotonic()

    try:
        for row in _rows(todo, jobs):
            take(row)
    finally:
        dataset.append(buf)  # whatever finished is kept, also on Ctrl-C
    return stats


def _rows(todo: Sequence[SweepTask], jobs: int) -> Iterator[dict]:
    if jobs <= 1 or len(todo) <= 1:
        profiles: dict = {}
        for t in todo:
            yield run_task(t, profiles)
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed

    with ProcessPoolExecutor(max_workers=jobs, initializer=_worker_init) as pool:
        futs = [pool.submit(_run_in_pool, t.to_dict()) for t in todo]
        try:
            for fut in as_completed(futs):
                yield fut.result()
        finally:
            for f in futs:
                f.cancel()


def _unique(tasks: Iterable[SweepTask]) -> list[SweepTask]:
    seen: dict[str, SweepTask] = {}
    for t in tasks:
        seen.setdefault(t.task_id, t)
    return list(seen.values())
