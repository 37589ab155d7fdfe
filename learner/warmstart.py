"""Warm-start data: twin runs from a sweep file, or generated now with the twin, for the workloads being learned.

* :func:`select_warm_runs` picks from a sweep file (e.g. ``ml_train_sim.csv.gz``, 74,673 paper-twin runs) the rows of
  the models being learned: first every row whose workload (model, rates) is one of the dataset's, then a seeded
  random sample of the rest, up to ``limit`` rows, shuffled. Only the dataset's *inputs* are used to choose.
* :func:`twin_warm_runs` runs :mod:`adaptwin.twin` on the paper's configuration grid (served, max_loras ∈
  {8, 16, 32, 64, 128, 192, 256, 320, 384}, max_loras ≤ served) for each of the dataset's workloads, in a seeded
  random order, on ``jobs`` processes, until ``budget_s`` seconds are spent; results are cached (one JSON line per
  run, keyed by the scenario) so a second evaluation costs nothing.
* :func:`twin_predictions` runs the twin on the dataset's *own* scenarios (inputs only), for the ``twin_gap``
  feature: the learner then corrects the twin instead of replacing it. ``calibration=DIR`` fits the twin's profile
  from the profiling CSVs alone (no LoRA terms refitted on real runs), which is what an honest evaluation on real
  runs needs: the shipped profiles' LoRA terms were fitted on the 294 real runs (``twin/real_params.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Iterable, Sequence

from adaptwin.learner.dataset import Run
from adaptwin.learner.features import Scenario

__all__ = ["PAPER_GRID", "select_warm_runs", "twin_grid", "twin_warm_runs", "twin_predictions", "run_twin",
           "calibration_profiles"]

log = logging.getLogger("adaptwin.learner.warmstart")

PAPER_GRID = (8, 16, 32, 64, 128, 192, 256, 320, 384)
"""Served adapters and adapter slots of the paper's Table-1 sweep."""


def _workload_key(s: Scenario) -> tuple:
    return (s.model, tuple(sorted(set(s.rates))))


def select_warm_runs(pool: Sequence[Run], dataset: Sequence[Run], limit: int | None, seed: int = 0) -> list[Run]:
    """Rows of ``pool`` for the dataset's models: same-workload rows first, then a random sample, shuffled."""
    models = {r.scenario.model for r in dataset}
    keys = {_workload_key(r.scenario) for r in dataset}
    same = [r for r in pool if r.scenario.model in models and _workload_key(r.scenario) in keys]
    rest = [r for r in pool if r.scenario.model in models and _workload_key(r.scenario) not in keys]
    rng = random.Random(seed)
    if limit is not None and len(same) > limit:
        same = rng.sample(same, limit)
    room = len(rest) if limit is None else max(0, limit - len(same))
    out = same + (rng.sample(rest, room) if room < len(rest) else rest)
    rng.shuffle(out)
    return out


def twin_grid(dataset: Iterable[Run], grid: Sequence[int] = PAPER_GRID) -> list[Scenario]:
    """The paper's configuration grid for each distinct workload of ``dataset`` (max_loras ≤ served)."""
    seen: dict[tuple, Scenario] = {}
    for r in dataset:
        s = r.scenario
        seen.setdefault((s.model, s.rates, s.ranks, s.max_lora_rank, s.duration_s), s)
    out = []
    for (model, rates, ranks, mlr, duration), _ in seen.items():
        for served in grid:
            for slots in grid:
                if slots <= served:
                    out.append(Scenario.round_robin(model, rates, ranks, served, slots, mlr, duration))
    return out


def _key(s: Scenario, seed: int, tag: str = "") -> str:
    text = json.dumps([s.model, s.rates, s.ranks, s.served, s.max_loras, s.max_lora_rank, s.duration_s, seed])
    if tag:  # a non-default profile: its runs must not be mistaken for the shipped profile's
        text += "|" + tag
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def calibration_profiles(calibration: str | Path, models: Iterable[str]) -> dict:
    """Twin profiles fitted from the profiling CSVs in ``calibration`` alone (``adaptwin twin fit`` without
    ``--real-params``), one per model."""
    from adaptwin.profiler.fit import fit_profile
    from adaptwin.twin.profile import Profile

    return {m: Profile.from_dict(fit_profile(calibration, m)) for m in sorted(set(models))}


def run_twin(s: Scenario, seed: int = 0, profile=None) -> dict | None:
    """One twin run of ``s`` (the paper's workload): its summary, or None when the twin refuses the configuration
    (e.g. no KV cache left for that many slots). ``profile``: a twin Profile (default: the shipped one)."""
    from adaptwin.twin.runner import run_scenario

    try:
        res = run_scenario(s.model, list(s.rates), list(s.ranks), s.served, s.max_loras, s.max_lora_rank,
                           s.duration_s, seed=seed, profile=profile)
    except ValueError as err:  # ConfigError / ProfileError are ValueErrors
        log.debug("twin refused %s: %s", s, err)
        return None
    return res.summary()


def _run_keyed(args: tuple) -> tuple[str, dict | None]:
    key, s, seed, profile = args
    return key, run_twin(s, seed, profile)


def twin_warm_runs(dataset: Sequence[Run], budget_s: float = 300.0, jobs: int = 1, seed: int = 0,
                   cache: str | Path | None = None, grid: Sequence[int] = PAPER_GRID) -> list[Run]:
    """Twin runs on the paper's grid for the dataset's workloads, within ``budget_s`` of wall time (cached runs are
    free). Returns them as :class:`Run` records (in the grid's shuffled order)."""
    scenarios = twin_grid(dataset, grid)
    random.Random(seed).shuffle(scenarios)
    done = _run_budgeted(scenarios, budget_s, jobs, seed, cache, None, "")
    out = []
    for s in scenarios:
        summary = done.get(_key(s, seed))
        if summary:
            out.append(Run(s, float(summary["total_throughput"]), int(summary["starved"])))
    log.info("twin warm start: %d runs", len(out))
    return out


def twin_predictions(dataset: Sequence[Run], budget_s: float = 600.0, jobs: int = 1, seed: int = 0,
                     cache: str | Path | None = None, calibration: str | Path | None = None) -> dict[Scenario, float]:
    """The twin's total throughput for each distinct scenario of ``dataset`` (inputs only; outcomes unread), within
    ``budget_s`` (cached runs are free). Scenarios the twin refuses or the budget leaves out are absent: the
    learner then goes without the ``twin_gap`` feature for them. ``calibration``: fit the profiles from that folder
    of profiling CSVs instead of using the shipped ones."""
    scenarios = list(dict.fromkeys(r.scenario for r in dataset))
    profiles, tag = {}, ""
    if calibration is not None:
        profiles = calibration_profiles(calibration, {s.model for s in scenarios})
        tag = "calibration-only"
    done = _run_budgeted(scenarios, budget_s, jobs, seed, cache, profiles, tag)
    out = {}
    for s in scenarios:
        summary = done.get(_key(s, seed, tag))
        if summary:
            out[s] = float(summary["total_throughput"])
    log.info("twin predictions: %d of %d scenarios", len(out), len(scenarios))
    return out


def _run_budgeted(scenarios: Sequence[Scenario], budget_s: float, jobs: int, seed: int, cache: str | Path | None,
                  profiles: dict | None, tag: str) -> dict[str, dict | None]:
    """Summaries of twin runs of ``scenarios`` by key: cached ones, then new ones (in order, on ``jobs`` processes)
    until ``budget_s`` is spent; new ones are appended to ``cache``."""
    done: dict[str, dict | None] = {}
    cache_path = Path(cache) if cache else None
    if cache_path and cache_path.exists():
        for line in cache_path.read_text().splitlines():
            try:
                item = json.loads(line)
                done[item["key"]] = item["summary"]
            except (ValueError, KeyError):
                continue
    todo = [(_key(s, seed, tag), s, seed, (profiles or {}).get(s.model)) for s in scenarios]
    todo = [t for t in todo if t[0] not in done]
    log.info("twin runs: %d scenarios, %d cached, budget %.0f s on %d process(es)",
             len(scenarios), len(scenarios) - len(todo), budget_s, jobs)
    deadline = time.monotonic() + budget_s
    new: dict[str, dict | None] = {}
    if todo:
        with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
            pending = set()
            it = iter(todo)
            for t in it:
                pending.add(pool.submit(_run_keyed, t))
                if len(pending) >= max(1, jobs):
                    break
            while pending:
                left = deadline - time.monotonic()
                finished, pending = wait(pending, timeout=max(0.0, left), return_when=FIRST_COMPLETED)
                for f in finished:
                    key, summary = f.result()
                    new[key] = summary
                if time.monotonic() >= deadline:
                    for f in pending:
                        f.cancel()
                    break
                for t in it:
                    pending.add(pool.submit(_run_keyed, t))
                    if len(pending) >= max(1, jobs):
                        break
            pool.shutdown(wait=False, cancel_futures=True)
        if cache_path and new:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(cache_path, "a") as fh:
                for key, summary in new.items():
                    fh.write(json.dumps({"key": key, "summary": summary}) + "\n")
    done.update(new)
    if len(todo) > len(new):
        log.warning("twin runs: budget spent after %d of %d new scenarios; raise --twin-budget to run more",
                    len(new), len(todo))
    return done


def default_cache() -> Path:
    """Where generated twin runs are kept: ``$ADAPTWIN_CACHE`` or ``./.cache``, file ``learner/twin_runs.jsonl``."""
    return Path(os.environ.get("ADAPTWIN_CACHE", ".cache")) / "learner" / "twin_runs.jsonl"
