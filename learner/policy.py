"""The recommendation policy: after each window, score candidate configurations and say what to run.

Candidates are (served, max_loras) pairs of a grid (default the paper's 8…384, max_loras ≤ served) under the recent
traffic (:class:`~adaptwin.learner.workload.Workload`). A candidate is *acceptable* when its starvation probability is
at most ``max_starvation_prob``; the best is the acceptable one with the highest predicted throughput (ties: fewer
adapters, fewer slots). Then:

* **The twin's word stands.** Answers of what-if twin runs are kept per workload signature
  (:class:`~adaptwin.learner.verdicts.VerdictBook`: a reference traffic that sticks while the offered load and the
  number of active adapters stay within 20 %). Candidates are scored on that reference traffic; a candidate the twin
  found to starve is never recommended for it, and one it confirmed is ranked by the twin's throughput, not the
  model's. With a twin (``ask_twin``), only confirmed configurations are recommended: per window the running one is
  asked first, then the best-ranked unconfirmed candidates, and a question left over explores one served level above
  the best; at most ``twin_per_window`` questions, every answer also trains the model (twin data, like a warm start).
  The warm start's budget (:meth:`Policy.explore`) is a starvation-boundary search of the reference traffic.
* **Until something better is known, the running configuration.** Before the twin confirmed anything (or, without a
  twin, before the model learned ``min_windows`` windows) the record names the configuration the window ran and says
  why it is kept.
* **Hysteresis and cost of change.** The current recommendation is kept unless the twin (or, unconfirmed, the
  model) says it starves, or the best gains more than a margin: ``served_margin`` when only the served set changes
  (vLLM loads/unloads adapters at run time), ``restart_margin`` when ``max_loras`` changes (a vLLM restart, whose
  lost throughput must pay off). Gains between two confirmed configurations are the twin's, so they do not move with
  the model's noise.
* **Limits (optional): latency and per-adapter fairness.** When the window ran the current recommendation and its
  mean TTFT or ITL broke the limit, or one served adapter starved more than ``max_adapter_starvation``, only lighter
  configurations (fewer adapters, or fewer adapters per slot) are acceptable; the reason says which limit broke.

>>> PolicyConfig().candidates()[:3]
[(8, 8), (16, 8), (16, 16)]
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

from adaptwin.learner.dataset import Run
from adaptwin.learner.features import features
from adaptwin.learner.online import StreamPrediction
from adaptwin.learner.verdicts import TwinAnswer, VerdictBook, boundary_search
from adaptwin.learner.warmstart import PAPER_GRID
from adaptwin.learner.workload import Workload

__all__ = ["Candidate", "Decision", "Policy", "PolicyConfig", "TwinAnswer", "twin_what_if"]

log = logging.getLogger("adaptwin.learner.policy")


@dataclass(frozen=True)
class PolicyConfig:
    grid: tuple[int, ...] = PAPER_GRID
    max_starvation_prob: float = 0.2
    served_margin: float = 0.02
    """Relative predicted gain needed to change only the served set (runtime change)."""
    restart_margin: float = 0.05
    """Relative predicted gain needed to change max_loras (vLLM restart)."""
    unsure_width: float = 0.3
    """Relative interval width ((high − low) / predicted) above which the twin is asked."""
    unsure_prob: float = 0.05
    """Starvation probability above which (and below clearly_starved_prob) the twin is asked."""
    clearly_starved_prob: float = 0.8
    """Candidates at or above this starvation probability are not considered (nor asked about)."""
    twin_per_window: int = 2
    """What-if twin runs per window at most (0: never ask)."""
    twin_duration_s: float = 600.0
    """Trace seconds of a what-if run (requests still running at its end count as not completed: a short run leans
    towards "starves", the safe side; 600 s halves that end loss against 300 s and costs ≈ 0.1 s)."""
    explore_budget_s: float = 5.0
    """Twin seconds for a starvation-boundary search of traffic not seen before (0: only per-window questions)."""
    min_windows: int = 5
    """Without the twin: windows the model must have learned before it may move away from the running
    configuration."""
    max_ttft_ms: float | None = None
    max_itl_ms: float | None = None
    max_adapter_starvation: float | None = None
    """Per-adapter fairness: the most any served adapter (with ≥ 1 % of the window's offered tokens) may starve."""

    def __post_init__(self) -> None:
        if not self.grid or any(g < 1 for g in self.grid):
            raise ValueError(f"the candidate grid must list positive integers, got {list(self.grid)}")
        if not 0 < self.max_starvation_prob < 1:
            raise ValueError(f"max_starvation_prob must be in (0, 1), got {self.max_starvation_prob}")
        if self.served_margin < 0 or self.restart_margin < 0:
            raise ValueError("margins must be >= 0")

    def candidates(self) -> list[tuple[int, int]]:
        g = sorted(set(self.grid))
        return [(s, m) for s in g for m in g if m <= s]


@dataclass(frozen=True)
class Candidate:
    served: int
    max_loras: int
    prediction: StreamPrediction
    twin: TwinAnswer | None = None

    @property
    def key(self) -> tuple[int, int]:
        return self.served, self.max_loras


@dataclass(frozen=True)
class Decision:
    """What the policy says after one window (the fields of a RECOMMENDATION record)."""

    served: int
    max_loras: int
    prediction: StreamPrediction
    changed: bool
    asked_twin: bool
    reason: str


def twin_what_if(workload: Workload, served: int, max_loras: int, duration_s: float,
                 seed: int = 0) -> TwinAnswer | None:
    """A what-if twin run of ``served`` adapters of this traffic on ``max_loras`` slots; None if the twin refuses it."""
    from adaptwin.twin.runner import run_scenario

    s = workload.scenario(served, max_loras)
    ranks = [r for r, c in zip(s.ranks, s.rank_counts) for _ in range(c)]
    try:
        res = run_scenario(s.model, workload.adapter_rates(served), ranks, served, s.max_loras, s.max_lora_rank,
                           duration_s, seed=seed)
    except ValueError as err:  # the twin refuses the configuration (e.g. no KV cache left)
        log.debug("twin refused %s: %s", (served, max_loras), err)
        return None
    summ = res.summary()
    return float(summ["total_throughput"]), int(summ["starved"])


def _worst_adapter(window: dict) -> tuple[str, float] | None:
    """(adapter, starvation ratio) of the most starved served adapter with ≥ 1 % of the window's offered tokens."""
    from adaptwin.learner.workload import adapter_index

    total = window.get("offered_tokens") or 0
    rows = [(a["adapter_id"], float(a.get("starvation_ratio") or 0.0)) for a in window.get("adapters") or []
            if 0 <= adapter_index(a["adapter_id"]) < window["served"]
            and (a.get("offered_tokens") or 0) >= 0.01 * total]
    return max(rows, key=lambda r: r[1]) if rows else None


@dataclass
class Policy:
    """Scores candidates, asks the twin, never contradicts it for the same traffic, applies hysteresis; keeps the
    current recommendation (see the module docstring)."""

    config: PolicyConfig = field(default_factory=PolicyConfig)
    current: tuple[int, int] | None = None
    book: VerdictBook = field(default_factory=VerdictBook)
    twin_asks: int = 0
    explored: set = field(default_factory=set)
    """Signatures whose starvation boundary was searched."""

    # ---- the twin ---------------------------------------------------------------------------------------------------
    def _asker(self, ask_twin: Callable, model) -> Callable:
        """``ask_twin`` that also trains the model on every new answer (twin data trains the prior, like a warm
        start, exactly where decisions are made)."""

        def ask(workload: Workload, served: int, max_loras: int, duration: float) -> TwinAnswer | None:
            answer = ask_twin(workload, served, max_loras, duration)
            self.twin_asks += 1
            if answer is not None:
                model.warm([Run(workload.scenario(served, max_loras), answer[0], answer[1])])
            return answer

        return ask

    def _ask(self, c: tuple[int, int], ask_twin: Callable, model) -> TwinAnswer | None:
        if not self.book.asked(c):
            self.book.record(c, self._asker(ask_twin, model)(self.book.reference, *c, self.config.twin_duration_s))
        return self.book.verdict(c)

    def explore(self, model, ask_twin: Callable, budget_s: float) -> int:
        """The warm start's twin budget, spent on the starvation boundary of the reference traffic."""
        self.explored.add(self.book.key)
        return boundary_search(self.book, self._asker(ask_twin, model), self.config.grid,
                               self.config.twin_duration_s, budget_s)

    # ---- scoring ----------------------------------------------------------------------------------------------------
    def _score(self, model, workload: Workload) -> dict[tuple[int, int], Candidate]:
        out = {}
        for s, m in self.config.candidates():
            out[(s, m)] = Candidate(s, m, model.predict(features(workload.scenario(s, m))), self.book.verdict((s, m)))
        return out

    def _value(self, c: Candidate) -> float:
        """Throughput to rank by: the twin's when it confirmed the candidate, else the model's prediction."""
        return c.twin[0] if c.twin is not None and not c.twin[1] else c.prediction.throughput

    def _unsure(self, c: Candidate) -> bool:
        p = c.prediction
        return p.relative_width > self.config.unsure_width or p.starvation_prob > self.config.unsure_prob

    def _ready(self, model) -> bool:
        return getattr(model, "n_learned", 0) >= self.config.min_windows

    def _limits(self, window: dict | None) -> tuple[Callable[[Candidate], bool], str | None]:
        """Which candidates the optional limits allow, judged on the window if it ran the current recommendation."""
        cfg = self.config
        if window is None or self.current is None or (window["served"], window["max_loras"]) != self.current:
            return (lambda c: True), None
        broken = []
        if cfg.max_ttft_ms is not None and (window.get("mean_ttft_ms") or 0) > cfg.max_ttft_ms:
            broken.append(f"mean TTFT {window['mean_ttft_ms']:.0f} ms > {cfg.max_ttft_ms:g}")
        if cfg.max_itl_ms is not None and (window.get("mean_itl_ms") or 0) > cfg.max_itl_ms:
            broken.append(f"mean ITL {window['mean_itl_ms']:.1f} ms > {cfg.max_itl_ms:g}")
        if cfg.max_adapter_starvation is not None:
            worst = _worst_adapter(window)
            if worst is not None and worst[1] > cfg.max_adapter_starvation:
                broken.append(f"adapter {worst[0]} starved {worst[1]:.0%} > {cfg.max_adapter_starvation:.0%}")
        if not broken:
            return (lambda c: True), None
        s0, m0 = self.current

        def lighter(c: Candidate) -> bool:  # fewer adapters per slot, or fewer adapters: less queueing per request
            r, r0 = c.served / c.max_loras, s0 / m0
            return (c.served <= s0 and r <= r0) and (c.served < s0 or r < r0)

        return lighter, f"{'; '.join(broken)} in the last window: only lighter configurations considered"

    # ---- one decision -----------------------------------------------------------------------------------------------
    def decide(self, model, workload: Workload, window: dict | None = None,
               ask_twin: Callable[[Workload, int, int, float], TwinAnswer | None] | None = None) -> Decision:
        cfg = self.config
        notes: list[str] = []
        if self.book.observe(workload) and self.current is not None:
            notes.append(f"new traffic (offered load or active adapters moved by more than {self.book.tolerance:.0%}):"
                         " answers of the twin for other traffic do not apply")
        ref = self.book.reference
        first = self.current is None
        running = (int(window["served"]), int(window["max_loras"])) if window is not None else None
        if first and running in set(cfg.candidates()):
            self.current = running  # the incumbent: what runs now, kept until something better is known
        questions = cfg.twin_per_window if ask_twin is not None else 0
        asked = False
        if questions and cfg.explore_budget_s > 0 and self.book.key not in self.explored:
            runs = self.explore(model, ask_twin, cfg.explore_budget_s)
            asked = asked or runs > 0
            notes.append(f"twin boundary search of this traffic: {runs} runs")
        if questions and self.current is not None and not self.book.asked(self.current):
            questions -= 1  # the incumbent's verdict first: it decides whether any change is needed
            asked = True
            self._ask(self.current, ask_twin, model)
            notes.append(f"twin on the current ({self.current[0]}, {self.current[1]}): {self._verdict(self.current)}")
        scored = self._score(model, ref)
        latency_ok, limit_note = self._limits(window)
        if limit_note:
            notes.insert(0, limit_note)
        twin_mode = ask_twin is not None or any(a is not None for a in self.book.answers.values())
        ready = twin_mode or self._ready(model)
        pool = [c for c in scored.values() if not self.book.refuted(c.key) and latency_ok(c)
                and (c.twin is not None or c.prediction.starvation_prob < cfg.clearly_starved_prob)]
        best: Candidate | None = None
        while pool and ready:
            c = max(pool, key=lambda c: (self._value(c), -c.served, -c.max_loras))
            if c.twin is not None:  # confirmed by the twin for this traffic
                best = c
                break
            if questions > 0 and (twin_mode or self._unsure(c)):
                questions -= 1
                asked = True
                answer = self._ask(c.key, ask_twin, model)
                notes.append(f"twin on ({c.served}, {c.max_loras}): {self._verdict(c.key)}")
                pool.remove(c)
                if answer is not None and not answer[1]:
                    pool.append(Candidate(c.served, c.max_loras, c.prediction, answer))
                continue
            pool.remove(c)
            if not twin_mode and c.prediction.starvation_prob <= cfg.max_starvation_prob:
                best = c  # no twin to ask: the model alone, once it has learned enough windows
                break
        if best is not None and questions > 0:
            # explore one served level up: a cautious model cannot find out it is wrong unless someone looks
            levels = sorted({c.served for c in scored.values() if c.served > best.served})
            ups = [c for c in scored.values() if levels and c.served == levels[0] and latency_ok(c)
                   and not self.book.asked(c.key)]
            if ups:
                up = max(ups, key=lambda c: (c.prediction.throughput, -c.max_loras))
                answer = self._ask(up.key, ask_twin, model)
                asked = True
                notes.append(f"twin one step up on ({up.served}, {up.max_loras}): {self._verdict(up.key)}")
                if answer is not None and not answer[1] and answer[0] > self._value(best):
                    best = Candidate(up.served, up.max_loras, up.prediction, answer)
        if best is None:
            if self.current is not None:
                why = ("no configuration confirmed by the twin yet" if twin_mode else
                       f"model warming up ({getattr(model, 'n_learned', 0)} of {cfg.min_windows} windows learned)"
                       if not ready else "no candidate is predicted not to starve")
                return self._keep(model, scored, ref, asked, [f"kept the running configuration: {why}", *notes])
            best = min(scored.values(), key=lambda c: (c.prediction.starvation_prob, -c.prediction.throughput))
            notes.append("every candidate is predicted to starve; least likely chosen")
        if limit_note and self.current is not None and best.key != self.current and latency_ok(best):
            changed, reason = True, f"({self.current[0]}, {self.current[1]}) broke a limit"
        else:
            changed, reason = self._hysteresis(best, scored, model, ref, twin_mode)
        if first and self.current is not None:
            how = "confirmed by the twin" if best.twin else "model"
            reason = (f"first recommendation ({how}): {reason}" if changed else
                      f"first recommendation: the running configuration ({how}); {reason}")
        if changed:
            self.current = best.key
        return self._keep(model, scored, ref, asked, [reason, *notes], changed)

    def _verdict(self, key: tuple[int, int]) -> str:
        a = self.book.verdict(key)
        return "refused (cannot start)" if a is None else "starves" if a[1] else f"{a[0]:,.0f} tok/s, no starvation"

    def _keep(self, model, scored: dict, workload: Workload, asked: bool, notes: list[str],
              changed: bool = False) -> Decision:
        chosen = scored.get(self.current)
        pred = chosen.prediction if chosen is not None else model.predict(features(workload.scenario(*self.current)))
        return Decision(self.current[0], self.current[1], pred, changed, asked, "; ".join(n for n in notes if n))

    def _hysteresis(self, best: Candidate, scored: dict, model, workload: Workload,
                    twin_mode: bool) -> tuple[bool, str]:
        cfg = self.config
        if self.current is None:
            return True, "first recommendation"
        if best.key == self.current:
            return False, "unchanged: still the best"
        cur = scored.get(self.current)
        if cur is None:
            cur = Candidate(*self.current, model.predict(features(workload.scenario(*self.current))),
                            self.book.verdict(self.current))
        if self.book.refuted(cur.key):
            found = f" ({best.twin[0]:,.0f} tok/s)" if best.twin is not None else " (predicted)"
            return True, (f"the twin found ({cur.served}, {cur.max_loras}) starves under this traffic; "
                          f"({best.served}, {best.max_loras}) does not{found}")
        p_cur = cur.prediction
        if cur.twin is None and p_cur.starvation_prob > cfg.max_starvation_prob:
            return True, (f"({cur.served}, {cur.max_loras}) is predicted to starve (p={p_cur.starvation_prob:.2f}); "
                          f"({best.served}, {best.max_loras}) is not")
        v_best, v_cur = self._value(best), self._value(cur)
        gain = v_best / v_cur - 1 if v_cur > 0 else math.inf
        restart = best.max_loras != cur.max_loras
        margin = cfg.restart_margin if restart else cfg.served_margin
        what = "max_loras change (vLLM restart)" if restart else "served-set change (runtime)"
        source = "twin" if best.twin is not None and cur.twin is not None else "predicted"
        if gain > margin:
            return True, (f"+{gain:.1%} {source} throughput over ({cur.served}, {cur.max_loras}), above the "
                          f"{margin:.0%} margin of a {what}")
        return False, (f"kept: ({best.served}, {best.max_loras}) would gain only {gain:+.1%} ({source}), under the "
                       f"{margin:.0%} margin of a {what}")
