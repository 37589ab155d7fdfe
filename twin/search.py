"""The optimiser behind ``adaptwin recommend``: the best (served adapters, max_loras) for a workload.

The paper's criterion (reference/paper-digest.md §1.3–1.4): a configuration *starves* when it completes less than 90 %
of the offered tokens; per slot value ``g`` (vLLM ``--max-loras``) walk the served-adapter values upwards from the
smallest and keep the last point of the leading non-starving run (or the first point, even if it starves); then pick
the slot value whose point has the highest throughput.

Offered load grows with served adapters (the workload's rates go round-robin over ``served`` adapters), so for a fixed
``g`` starvation is monotone in ``served`` and the walk's point is the starvation boundary: :func:`search` finds it by
bisection (a few runs per slot value instead of one per grid point), starts each slot value's search at the previous
one's boundary, and caches every run by configuration (and each workload by served adapters and seed), so nothing is
simulated twice. A probe only needs its verdict, so its run stops once the verdict is statistically settled
(:mod:`adaptwin.twin.settle`); the points the choice depends on are then carried on to the end of the window
(:func:`_settle`). ``exhaustive=True`` applies the paper's walk literally: every grid point in order, each run to the end
of the window, up to the first starving one after the leading non-starving run (the points after it cannot change the
walk's choice, so they are not simulated: no monotonicity is assumed).

Without a grid both knobs are integers: slot values are searched coarse to fine (a geometric coarse set, then a
pattern search with halving steps around the best one), each with its own served-adapter bisection.

Configurations vLLM cannot start (the profile's failed start-ups, KV cache below ``max_model_len``) are never run nor
recommended. With several seeds (arrival processes), each configuration's throughput and starvation ratio are means
over seeds, and among the slot values whose throughput is within noise of the best (2 standard errors of the
difference) the one with the largest margin to starvation wins.

>>> from adaptwin.twin.search import Workload, search
>>> wl = Workload("llama-3.1-8b-instruct", rates=(0.4, 0.2), ranks=(8, 16), duration=120)
>>> rec = search(wl, grid=[16, 32, 64])
>>> rec.best.max_loras <= rec.best.served
True
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

from adaptwin.twin.config import ConfigError, ServerConfig, paper_workload
from adaptwin.twin.settle import EarlyStop, RunOutcome, SettlingRun
from adaptwin.twin.engine import Engine
from adaptwin.twin.profile import Profile, load_profile
from adaptwin.twin.result import STARVATION_THRESHOLD

__all__ = ["PAPER_GRID", "Workload", "Evaluation", "Recommendation", "Evaluator", "search"]

log = logging.getLogger("adaptwin.twin.search")

PAPER_GRID: tuple[int, ...] = (16, 32, 64, 96, 128, 160, 192, 256, 320, 384)
"""The paper's grid for both knobs (served adapters and max_loras, max_loras <= served)."""

COARSE_SLOTS: tuple[int, ...] = (1, 2, 4, 8) + PAPER_GRID
"""First pass over slot values in the integer search (then refined around the best)."""

MAX_EXHAUSTIVE_CONFIGS = 20_000

NOISE_Z = 2.0
STRICT = EarlyStop(warmup_s=1200.0)
"""The rule that confirms the starving verdicts a choice hinges on (see :meth:`Evaluator.confirm`)."""


@dataclass(frozen=True)
class Workload:
    """What to serve: the paper's workload (``rates``/``ranks`` per adapter group, round-robin over the served
    adapters, shuffled per seed) on ``model``, judged over ``duration`` seconds and ``seeds`` arrival processes."""

    model: str
    rates: tuple[float, ...]
    ranks: tuple[int, ...]
    duration: float = 3600.0
    seeds: tuple[int, ...] = (0,)
    max_lora_rank: int | None = None
    """vLLM ``--max-lora-rank`` of every candidate; default max(ranks)."""

    def __post_init__(self) -> None:
        rates = tuple(float(r) for r in self.rates)
        ranks = tuple(int(r) for r in self.ranks)
        if not rates:
            raise ConfigError("no rates: give the per-adapter request rates, e.g. --rates 0.1,0.05,0.025")
        if any(not math.isfinite(r) or r < 0 for r in rates):
            raise ConfigError(f"rates must be finite and >= 0 req/s, got {list(rates)}")
        if sum(rates) <= 0:
            raise ConfigError(f"all rates are zero ({list(rates)}): there is no traffic to serve")
        if not ranks:
            raise ConfigError("no ranks: give the adapter ranks, e.g. --ranks 8,16,32")
        if min(ranks) < 1:
            raise ConfigError(f"ranks must be >= 1, got {list(ranks)}")
        if not (isinstance(self.duration, (int, float)) and math.isfinite(self.duration) and self.duration > 0):
            raise ConfigError(f"duration must be a positive number of seconds, got {self.duration!r}")
        seeds = tuple(int(s) for s in self.seeds)
        if not seeds:
            raise ConfigError("give at least one seed")
        mlr = int(self.max_lora_rank) if self.max_lora_rank is not None else max(ranks)
        if mlr < max(ranks):
            raise ConfigError(f"rank {max(ranks)} is above --max-lora-rank {mlr}: vLLM refuses such adapters; "
                              "raise --max-lora-rank or lower --ranks")
        object.__setattr__(self, "rates", rates)
        object.__setattr__(self, "ranks", ranks)
        object.__setattr__(self, "seeds", seeds)
        object.__setattr__(self, "max_lora_rank", mlr)


def check_rank_measured(profile: Profile, max_lora_rank: int) -> None:
    """ConfigError when ``max_lora_rank`` is above every rank the profile was measured with."""
    measured = {r for _, r in profile.kv_table} | set(profile.loading_ms)
    if measured and max_lora_rank > max(measured):
        raise ConfigError(f"max LoRA rank {max_lora_rank} is above the largest rank the {profile.model} profile was "
                          f"measured with ({max(measured)}): the twin cannot predict it; lower --ranks or give a "
                          "--profile measured at that rank")


@dataclass(frozen=True)
class Evaluation:
    """One configuration over all seeds: means (and spread) of the twin's throughput and starvation ratio."""

    served: int
    max_loras: int
    total_throughput: float
    """tokens/s of finished requests, mean over seeds."""
    ideal_total_throughput: float
    starvation_ratio: float
    """1 − completed/offered tokens, mean over seeds; starved ⇔ >= 0.1."""
    throughput_std: float = 0.0
    starvation_ratio_std: float = 0.0
    seeds: int = 1
    starved_seeds: int = 0
    early_stopped: bool = False
    """The verdict was settled before the window ended: throughput and starvation ratio are projections."""

    @property
    def starved(self) -> bool:
        return self.starvation_ratio >= STARVATION_THRESHOLD

    @property
    def margin(self) -> float:
        """Headroom to the starvation threshold, as a fraction of offered tokens (negative when starved)."""
        return STARVATION_THRESHOLD - self.starvation_ratio

    @property
    def throughput_se(self) -> float:
        return self.throughput_std / math.sqrt(self.seeds) if self.seeds > 1 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(starved=int(self.starved), starvation_margin=round(self.margin, 6), early_stopped=int(self.early_stopped))
        for k in ("total_throughput", "ideal_total_throughput", "throughput_std"):
            d[k] = round(d[k], 3)
        for k in ("starvation_ratio", "starvation_ratio_std"):
            d[k] = round(d[k], 6)
        return d


@dataclass(frozen=True)
class SlotChoice:
    """The paper's point for one slot value: the last served value of the leading non-starving run (or the first,
    starving, one), and the smallest served value seen starving above it (``None`` if none within range)."""

    evaluation: Evaluation
    first_starving_served: int | None

    @property
    def served_headroom(self) -> int | None:
        s = self.first_starving_served
        return None if s is None or self.evaluation.starved else s - self.evaluation.served


@dataclass
class Recommendation:
    best: Evaluation
    headroom: int | None
    """More served adapters the chosen slot value takes before it starves (None: none starved within range)."""
    runners_up: list[SlotChoice]
    all_starve: bool
    method: str
    runs: int
    """Twin simulations done (one per configuration and seed)."""
    configs: int
    """Distinct configurations simulated."""
    unstartable_slots: list[int]
    wall_s: float
    per_slot: list[SlotChoice] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    early_stopped: int = 0
    """Runs stopped once their starvation verdict was settled (twin/settle.py)."""

    def summary(self, top: int = 5) -> dict:
        """The ``recommend --json`` object (DESIGN.md §CLI contract, extended)."""
        b = self.best
        return {
            "served_adapters": b.served, "max_loras": b.max_loras,
            "predicted_total_throughput": round(b.total_throughput, 3),
            "predicted_starved": int(b.starved), "method": self.method,
            "predicted_ideal_total_throughput": round(b.ideal_total_throughput, 3),
            "predicted_starvation_ratio": round(b.starvation_ratio, 6),
            "starvation_margin": round(b.margin, 6), "served_headroom": self.headroom,
            "throughput_std": round(b.throughput_std, 3), "seeds": b.seeds, "all_starve": int(self.all_starve),
            "runners_up": [dict(c.evaluation.to_dict(), served_headroom=c.served_headroom)
                           for c in self.runners_up[:top]],
            "unstartable_max_loras": self.unstartable_slots,
            "runs": self.runs, "early_stopped_runs": self.early_stopped, "configs": self.configs,
            "wall_s": round(self.wall_s, 3),
        }


class Evaluator:
    """Runs configurations through the twin, once each: results cached by (served, max_loras), workloads by
    (served, seed) (a workload does not depend on max_loras, so slot values share it), start-up checks by slot value."""

    def __init__(self, workload: Workload, profile: Profile | None = None, lengths=None,
                 on_run: Callable[[int, int], None] | None = None, workload_cache: int = 4,
                 early_stop: bool = True, rule: EarlyStop | None = None, suspended_requests: int = 1_500_000):
        self.workload = workload
        self.early_stop = early_stop
        self.rule = rule or EarlyStop()
        self.early_stopped = 0
        """Runs whose verdict was settled before the end of the window (see :mod:`adaptwin.twin.settle`)."""
        self.simulated_s = 0.0
        self.profile = profile or load_profile(workload.model)
        if lengths is None:
            from adaptwin.twin.lengths import load_lengths

            lengths = load_lengths(self.profile.model)
        self.lengths = lengths
        check_rank_measured(self.profile, workload.max_lora_rank)
        self.on_run = on_run
        self.runs = 0
        self.wall_s = 0.0
        self._results: dict[tuple[int, int], Evaluation] = {}
        self._startable: dict[int, str | None] = {}
        self._arrivals: OrderedDict = OrderedDict()
        self._arrivals_cap = max(1, workload_cache)
        self._suspended: OrderedDict = OrderedDict()  # (served, max_loras, seed) -> SettlingRun stopped early
        self._suspended_cap = max(0, suspended_requests)
        self._confirmed: set[tuple[int, int]] = set()

    @property
    def configs(self) -> int:
        return len(self._results)

    def cannot_start(self, max_loras: int) -> str | None:
        """Why vLLM would refuse to start with ``max_loras`` slots at the workload's max rank (None: it starts)."""
        if max_loras not in self._startable:
            mlr = self.workload.max_lora_rank
            try:
                cfg = ServerConfig(model=self.profile.model, served=max_loras, max_loras=max_loras,
                                   adapter_ranks=(mlr,) * max_loras, max_lora_rank=mlr)
                Engine(cfg, self.profile)
                self._startable[max_loras] = None
            except ConfigError as err:
                self._startable[max_loras] = str(err)
        return self._startable[max_loras]

    def _workload(self, served: int, seed: int):
        key = (served, seed)
        if key in self._arrivals:
            self._arrivals.move_to_end(key)
            return self._arrivals[key]
        wl = self.workload
        arrivals, ranks = paper_workload(wl.rates, wl.ranks, served, wl.duration, seed, self.lengths)
        eos = getattr(self.profile, "early_stop_fraction", 0.0)
        if eos > 0:  # as `twin run` does: some answers end at EOS before max_tokens (twin/lengths.py)
            from adaptwin.twin.lengths import apply_early_stop

            arrivals = apply_early_stop(arrivals, eos, seed)
        value = (arrivals, ranks)
        self._arrivals[key] = value
        while len(self._arrivals) > self._arrivals_cap:
            self._arrivals.popitem(last=False)
        return value

    def cached(self, served: int, max_loras: int) -> Evaluation | None:
        return self._results.get((served, max_loras))

    def __call__(self, served: int, max_loras: int) -> Evaluation:
        """The configuration's verdict: a run may stop early once it is settled (then ``early_stopped``, and the
        throughput and starvation ratio are projections); see :meth:`exact`."""
        key = (int(served), int(max_loras))
        if key in self._results:
            return self._results[key]
        return self._evaluate(key, self.early_stop)

    def exact(self, served: int, max_loras: int) -> Evaluation:
        """The configuration run to the end of the window on every seed (reuses a run that was not stopped)."""
        key = (int(served), int(max_loras))
        ev = self._results.get(key)
        if ev is not None and not ev.early_stopped:
            return ev
        return self._evaluate(key, False)

    def confirm(self, served: int, max_loras: int) -> Evaluation:
        """Re-settle a point with the strict rule (:data:`STRICT`): a stopped run goes on from where it stopped until
        the verdict is settled after a longer warm-up, or to the end of the window. For the starving verdicts the
        choice hinges on: a near-critical server's queue can grow steadily for many minutes before it levels off."""
        key = (int(served), int(max_loras))
        ev = self._results.get(key)
        if ev is not None and (not ev.early_stopped or key in self._confirmed):
            return ev
        self._confirmed.add(key)
        return self._evaluate(key, True, STRICT)

    def _evaluate(self, key: tuple[int, int], early: bool, rule: EarlyStop | None = None) -> Evaluation:
        reason = self.cannot_start(key[1])
        if reason is not None:
            raise ConfigError(reason)
        wl = self.workload
        t0 = time.perf_counter()
        rule = (rule or self.rule) if early else None
        outcomes = [self._run(key, seed, rule) for seed in wl.seeds]
        stopped = [i for i, o in enumerate(outcomes) if o is not None and o.early]
        verdicts = {o.starved for o in outcomes if o is not None}
        if stopped and len(verdicts) > 1:  # seeds disagree: the mean's verdict needs the stopped seeds' full runs
            for i in stopped:
                outcomes[i] = self._run(key, wl.seeds[i], None)
            stopped = []
        thr = [o.summary["total_throughput"] if o else 0.0 for o in outcomes]
        ideal = [o.summary["ideal_total_throughput"] if o else 0.0 for o in outcomes]
        ratio = [o.starvation_ratio if o else 0.0 for o in outcomes]
        self.wall_s += time.perf_counter() - t0
        ev = Evaluation(served=key[0], max_loras=key[1], total_throughput=_mean(thr),
                        ideal_total_throughput=_mean(ideal), starvation_ratio=_mean(ratio),
                        throughput_std=_std(thr), starvation_ratio_std=_std(ratio), seeds=len(wl.seeds),
                        starved_seeds=sum(1 for o in outcomes if o is not None and o.starved),
                        early_stopped=bool(stopped))
        self._results[key] = ev
        log.debug("served %d max_loras %d: %.1f tok/s, starvation %.3f%s", *key, ev.total_throughput,
                  ev.starvation_ratio, " (stopped early)" if ev.early_stopped else "")
        return ev

    def _run(self, key: tuple[int, int], seed: int, rule: EarlyStop | None) -> RunOutcome | None:
        """One seed's run (None: no request arrives in the window, nothing to serve). A run stopped early is kept
        (up to ``suspended_requests`` requests in all, the most recent first) so that a later full run or a stricter
        check goes on from where it stopped."""
        served, max_loras = key
        wl = self.workload
        run = self._suspended.pop((served, max_loras, seed), None)
        if run is None:
            arrivals, adapter_ranks = self._workload(served, seed)
            if len(arrivals) == 0:  # a light workload on few adapters over a short window: nothing offered
                return None
            cfg = ServerConfig(model=self.profile.model, served=served, max_loras=max_loras,
                               adapter_ranks=tuple(adapter_ranks), max_lora_rank=wl.max_lora_rank)
            run = SettlingRun(cfg, arrivals, wl.duration, self.profile, self.rule.check_s)
            self.runs += 1
        before = run.simulated_s
        out = run.finish() if rule is None else run.settle(rule)
        self.simulated_s += run.simulated_s - before
        if out.early:
            self.early_stopped += 1
            self._suspended[(served, max_loras, seed)] = run
            # bounded by requests held (~100 bytes each in the engine), oldest dropped first
            while sum(r.requests for r in self._suspended.values()) > self._suspended_cap:
                self._suspended.popitem(last=False)
        if self.on_run is not None:
            self.on_run(served, max_loras)
        return out


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# ---- per slot value ----------------------------------------------------------------------------------------
def walk(evals: Sequence[Evaluation]) -> SlotChoice:
    """The paper's ``find_max_point`` on one slot value's points, sorted by served adapters."""
    if evals[0].starved:
        return SlotChoice(evals[0], None)
    i = 0
    while i + 1 < len(evals) and not evals[i + 1].starved:
        i += 1
    return SlotChoice(evals[i], evals[i + 1].served if i + 1 < len(evals) else None)


def _leading_run(served_values: Sequence[int], max_loras: int,
                 evaluate: Callable[[int, int], Evaluation]) -> list[Evaluation]:
    """The points the walk looks at: all of the leading non-starving run plus the first starving one."""
    out = []
    for s in served_values:
        out.append(evaluate(s, max_loras))
        if out[-1].starved:
            break
    return out


def boundary(served_values: Sequence[int], max_loras: int, evaluate: Callable[[int, int], Evaluation],
             hint: int | None = None, exact: Callable[[int, int], Evaluation] | None = None) -> SlotChoice:
    """The walk's point for one slot value by bisection, assuming starvation is monotone in served adapters.

    ``served_values`` ascending (all >= max_loras); the first one is always evaluated (the walk keeps it even when it
    starves). ``hint`` (a served value, e.g. the previous slot value's boundary) is probed first, then the bracket is
    widened by doubling steps before bisecting, so a good hint costs two runs. ``evaluate`` may settle verdicts early;
    ``exact`` (if given) re-runs the non-starving point found to the end of the window — should that full run starve
    after all, the bisection goes on below it."""
    vals = list(served_values)
    n = len(vals)
    first = evaluate(vals[0], max_loras)
    if first.starved or n == 1:
        return SlotChoice(_exact_unless_starved(first, exact), None)
    ok = lambda i: not evaluate(vals[i], max_loras).starved  # noqa: E731
    lo, hi = 0, n  # invariant: vals[lo] does not starve; vals[hi] starves (hi == n: none seen starving)
    h = min(range(n), key=lambda i: abs(vals[i] - hint)) if hint is not None else 0
    if h > 0:
        step = 1
        if ok(h):
            lo = h
            while lo + step < n and ok(lo + step):
                lo, step = lo + step, step * 2
            hi = lo + step if lo + step < n else n
        else:
            hi = h
            while hi - step > 0 and not ok(hi - step):
                hi, step = hi - step, step * 2
            lo = hi - step if hi - step > 0 else 0
    while True:
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if ok(mid):
                lo = mid
            else:
                hi = mid
        point = _exact_unless_starved(evaluate(vals[lo], max_loras), exact)
        if not point.starved or lo == 0:
            return SlotChoice(point, vals[hi] if hi < n else None)
        log.warning("max_loras %d served %d: the full run starves although the early verdict said it would not; "
                    "searching below it", max_loras, vals[lo])
        hi, lo = lo, 0


def _exact_unless_starved(ev: Evaluation, exact: Callable[[int, int], Evaluation] | None) -> Evaluation:
    """A non-starving point's throughput decides the choice, so it must come from a full run; a starving point's
    only matters when every candidate starves (:func:`search` completes those then)."""
    if exact is None or not ev.early_stopped or ev.starved:
        return ev
    return exact(ev.served, ev.max_loras)


# ---- across slot values ----------------------------------------------------------------------------------------
def _rank_key(c: SlotChoice) -> tuple:
    e = c.evaluation
    if e.starved:  # only when nothing avoids starvation: least starved first
        return (1, e.starvation_ratio, -e.total_throughput, e.max_loras)
    return (0, -e.total_throughput, -e.margin, e.max_loras)


def choose(choices: Sequence[SlotChoice], z: float = NOISE_Z) -> tuple[SlotChoice, list[SlotChoice], bool]:
    """Best slot value: the highest throughput among non-starving points; among those within ``z`` standard errors
    of it (only with several seeds) the one with the most margin to starvation. When all starve, the least-starved.
    Returns (choice, the others best first, all starve)."""
    ranked = sorted(choices, key=_rank_key)
    top = ranked[0]
    if top.evaluation.starved:
        return top, ranked[1:], True
    tb = top.evaluation
    close = [c for c in ranked if not c.evaluation.starved
             and tb.total_throughput - c.evaluation.total_throughput
             <= z * math.hypot(tb.throughput_se, c.evaluation.throughput_se)]
    pick = max(close, key=lambda c: (c.evaluation.margin, c.evaluation.total_throughput, -c.evaluation.max_loras))
    return pick, [c for c in ranked if c is not pick], False


def _better(a: SlotChoice | None, b: SlotChoice) -> bool:
    return a is None or _rank_key(b) < _rank_key(a)


def search(workload: Workload, grid: Iterable[int] | None = None, exhaustive: bool = False,
           max_served: int = 384, profile: Profile | None = None, lengths=None,
           on_run: Callable[[int, int], None] | None = None, evaluator: Evaluator | None = None) -> Recommendation:
    """Recommend (served adapters, max_loras) for ``workload`` (see the module docstring).

    ``grid``: the values both knobs may take (max_loras <= served); None = all integers 1..``max_served``."""
    t0 = time.perf_counter()
    ev = evaluator or Evaluator(workload, profile=profile, lengths=lengths, on_run=on_run)
    if grid is not None:
        values = sorted({int(v) for v in grid})
        if not values:
            raise ConfigError("empty grid: give at least one value, e.g. --grid 16,32,64")
        if values[0] < 1:
            raise ConfigError(f"grid values must be positive integers, got {values[0]}")
    else:
        if max_served < 1:
            raise ConfigError(f"max_served must be >= 1, got {max_served}")
        values = None
    hi = values[-1] if values else max_served
    slot_values = values if values else list(range(1, hi + 1))
    unstartable = [g for g in _candidate_slots(values, hi) if ev.cannot_start(g)]
    notes: list[str] = []

    def served_for(g: int) -> list[int]:
        return [s for s in values if s >= g] if values else list(range(g, hi + 1))

    per_slot: dict[int, SlotChoice] = {}
    if exhaustive:
        startable = [g for g in slot_values if not ev.cannot_start(g)]
        n_cfg = sum(len(served_for(g)) for g in startable)
        if n_cfg > MAX_EXHAUSTIVE_CONFIGS:
            raise ConfigError(f"--exhaustive over the integers 1..{hi} means {n_cfg} configurations; "
                              "give --grid or a smaller --max-served")
        for g in startable:
            per_slot[g] = walk(_leading_run(served_for(g), g, ev.exact))
        method = "exhaustive"
    else:
        hint = None

        def solve(g: int) -> SlotChoice | None:
            nonlocal hint
            if ev.cannot_start(g):
                return None
            if g not in per_slot:
                per_slot[g] = boundary(served_for(g), g, ev, hint)
                hint = per_slot[g].evaluation.served
            return per_slot[g]

        if values:
            for g in values:
                solve(g)
        else:
            coarse = [g for g in COARSE_SLOTS if g <= hi] + ([hi] if hi not in COARSE_SLOTS else [])
            for g in coarse:
                solve(g)
            _refine(solve, per_slot, hi)
        method = "bisection"
    if not per_slot:
        raise ConfigError(f"vLLM cannot start any candidate ({workload.model}, max_lora_rank "
                          f"{workload.max_lora_rank}, max_loras {slot_values[0]}..{slot_values[-1]}): "
                          f"{ev.cannot_start(slot_values[0])}")
    if not exhaustive:
        _settle(per_slot, ev, lambda g, hint: boundary(served_for(g), g, ev, hint))
    pick, others, all_starve = choose(list(per_slot.values()))
    if all_starve:
        notes.append("every candidate starves: recommending the least-starved one")
    return Recommendation(best=pick.evaluation, headroom=pick.served_headroom, runners_up=others,
                          all_starve=all_starve, method=method, runs=ev.runs, configs=ev.configs,
                          unstartable_slots=unstartable, wall_s=time.perf_counter() - t0,
                          per_slot=sorted(per_slot.values(), key=lambda c: c.evaluation.max_loras), notes=notes,
                          early_stopped=ev.early_stopped)


def _throughput_bounds(e: Evaluation) -> tuple[float, float]:
    """What a non-starving point's full run can yield: exact once run to the end; else at least 90 % and at most
    100 % of the offered tokens (the offered load of a served value is known exactly before any run)."""
    if not e.early_stopped:
        return e.total_throughput, e.total_throughput
    return (1.0 - STARVATION_THRESHOLD) * e.ideal_total_throughput, e.ideal_total_throughput


def _settle(per_slot: dict[int, SlotChoice], ev: Evaluator,
            research: Callable[[int, int], SlotChoice]) -> None:
    """Replace early-stopped points by full runs where the choice depends on them: non-starving points that could
    still be the best (their throughput bound reaches the best one's guaranteed throughput; with several seeds every
    non-starving point, as noise ties are broken by margin) and, when every candidate starves, all of them (the
    least-starved wins). A full run that starves after all sends its slot value back to the bisection."""
    while True:
        ok = [c for c in per_slot.values() if not c.evaluation.starved]
        if not ok:
            need = [c for c in per_slot.values() if c.evaluation.early_stopped]
        else:
            best = max(_throughput_bounds(c.evaluation)[0] for c in ok)
            many = ev.workload.seeds and len(ev.workload.seeds) > 1
            need = [c for c in ok if c.evaluation.early_stopped
                    and (many or _throughput_bounds(c.evaluation)[1] >= best)]
        if not need and ok:
            # the first starving point above each slot value's choice, wherever a boundary there could still win:
            # an early "starves" that is wrong would hide a better point
            top = max(c.evaluation.total_throughput for c in ok)
            for c in list(per_slot.values()):
                hi, g = c.first_starving_served, c.evaluation.max_loras
                e = ev.cached(hi, g) if hi is not None and not c.evaluation.starved else None
                if e is None or not e.early_stopped or e.ideal_total_throughput < top:
                    continue
                checked = ev.confirm(hi, g)
                if not checked.starved:
                    log.info("max_loras %d served %d does not starve after all (stricter check); searching above",
                             g, hi)
                    per_slot[g] = research(g, hi)
                    need.append(per_slot[g])
            need = [c for c in need if not c.evaluation.starved and c.evaluation.early_stopped]
        if not need:
            return
        for c in need:
            g = c.evaluation.max_loras
            full = ev.exact(c.evaluation.served, g)
            if full.starved and not c.evaluation.starved:
                log.warning("max_loras %d served %d: the full run starves although the early verdict said it would "
                            "not; searching below it", g, full.served)
                per_slot[g] = research(g, full.served)
            else:
                per_slot[g] = SlotChoice(full, c.first_starving_served)


def _candidate_slots(values: list[int] | None, hi: int) -> list[int]:
    if values:
        return values
    return [g for g in COARSE_SLOTS if g <= hi]


def _refine(solve: Callable[[int], SlotChoice | None], per_slot: dict[int, SlotChoice], hi: int) -> None:
    """Pattern search over integer slot values around the best one so far, halving the step down to 1."""
    best_g = min(per_slot, key=lambda g: _rank_key(per_slot[g]))
    known = sorted(per_slot)
    i = known.index(best_g)
    gaps = [known[i] - known[i - 1] if i > 0 else 0, known[i + 1] - known[i] if i + 1 < len(known) else 0]
    step = max(gaps) // 2
    while step >= 1:
        for g in (best_g - step, best_g + step):
            if 1 <= g <= hi:
                c = solve(g)
                if c is not None and _better(per_slot[best_g], c):
                    best_g = g
        step //= 2
