"""What the twin answered about configurations, per workload signature, and the boundary search that fills it.

The twin's what-if answers (throughput, starved) are the ground truth the streaming policy may not contradict while
the traffic is the same. "The same" is a *reference* workload that sticks: a new window's traffic keeps the reference
while its offered load and number of active adapters stay within ``tolerance`` (relative) of it, so the window-to-
window noise of a live stream (±10–20 %) does not throw the answers away; a real change (rates ×2, a third more
adapters) sets a new reference. Answers are kept per reference signature (quantised offered load, active adapters,
busiest-quarter share), so a workload that comes back finds its answers again.

:func:`boundary_search` spends a twin budget on the configurations that matter: for each ``max_loras`` of the grid,
bisection over the served values for the starvation boundary (offered load grows with served adapters, so for a fixed
``max_loras`` starvation is monotone in served), starting at the previous slot value's boundary. The best
configuration is one of these boundary points, so the search answers the question a blind grid only samples.

>>> ref = VerdictBook()
>>> from adaptwin.learner.workload import Workload
>>> wl = Workload("llama-3.1-8b-instruct", (0.2,) * 32, None, 16, 180.0)
>>> ref.observe(wl), ref.observe(Workload("llama-3.1-8b-instruct", (0.22,) * 32, None, 16, 180.0))
(True, False)
>>> ref.record((64, 16), (5000.0, 0)); ref.verdict((64, 16))
(5000.0, 0)
>>> ref.observe(Workload("llama-3.1-8b-instruct", (0.4,) * 40, None, 16, 180.0)), ref.verdict((64, 16))
(True, None)
"""

from __future__ import annotations

import collections
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

from adaptwin.learner.features import model_facts
from adaptwin.learner.workload import Workload

__all__ = ["TwinAnswer", "VerdictBook", "boundary_search", "signature"]

log = logging.getLogger("adaptwin.learner.verdicts")

TwinAnswer = tuple[float, int]
"""(total throughput tokens/s, starved 0/1) of one what-if twin run."""
AskTwin = Callable[[Workload, int, int, float], "TwinAnswer | None"]


def _offered(wl: Workload) -> float:
    return sum(wl.rates) * model_facts(wl.model).mean_tokens


def signature(wl: Workload) -> tuple:
    """A coarse key of the traffic: model, active adapters, offered tokens/s (10 % steps), busiest-quarter share."""
    off = _offered(wl)
    n = wl.active
    top = sum(wl.rates[: max(1, n // 4)]) / sum(wl.rates) if off > 0 else 0.0
    return (wl.model, n, round(math.log(max(off, 1e-9)) / math.log(1.1)), round(10 * top))


@dataclass
class VerdictBook:
    """Twin answers for the current reference workload, and for earlier ones by signature (see the module doc)."""

    tolerance: float = 0.2
    max_signatures: int = 16
    reference: Workload | None = None
    key: tuple | None = None
    books: collections.OrderedDict = field(default_factory=collections.OrderedDict)

    def same(self, wl: Workload) -> bool:
        ref = self.reference
        if ref is None or ref.model != wl.model or wl.active == 0:
            return False
        lo, hi = 1 / (1 + self.tolerance), 1 + self.tolerance
        return lo <= _offered(wl) / max(_offered(ref), 1e-9) <= hi and lo <= wl.active / max(ref.active, 1) <= hi

    def observe(self, wl: Workload) -> bool:
        """Keep the reference or set ``wl`` as the new one; True when the reference changed."""
        if self.same(wl):
            return False
        self.reference, self.key = wl, signature(wl)
        self.books.setdefault(self.key, {})
        self.books.move_to_end(self.key)
        while len(self.books) > self.max_signatures:
            self.books.popitem(last=False)
        return True

    @property
    def answers(self) -> dict[tuple[int, int], TwinAnswer | None]:
        return self.books.setdefault(self.key, {}) if self.key is not None else {}

    def verdict(self, config: tuple[int, int]) -> TwinAnswer | None:
        """The twin's answer on ``config`` for the reference traffic (None: not asked, or the twin refused it)."""
        return self.answers.get(config)

    def asked(self, config: tuple[int, int]) -> bool:
        return config in self.answers

    def record(self, config: tuple[int, int], answer: TwinAnswer | None) -> None:
        self.answers[config] = answer

    def confirmed(self, config: tuple[int, int]) -> bool:
        a = self.answers.get(config)
        return a is not None and not a[1]

    def refuted(self, config: tuple[int, int]) -> bool:
        """The twin said it starves, or refused to start it."""
        return config in self.answers and (self.answers[config] is None or bool(self.answers[config][1]))


def boundary_search(book: VerdictBook, ask_twin: AskTwin, grid: Sequence[int], duration_s: float, budget_s: float,
                    clock: Callable[[], float] = time.monotonic) -> int:
    """Per ``max_loras`` of ``grid``, bisect the served values (≥ max_loras) for the starvation boundary of the
    reference traffic, recording every answer in ``book``; stops when ``budget_s`` is spent. Returns twin runs made.
    """
    wl = book.reference
    if wl is None:
        return 0
    values = sorted(set(grid))
    deadline = clock() + budget_s
    runs = 0
    hint: int | None = None

    def ask(served: int, slots: int) -> TwinAnswer | None:
        nonlocal runs
        if not book.asked((served, slots)):
            book.record((served, slots), ask_twin(wl, served, slots, duration_s))
            runs += 1
        return book.verdict((served, slots))

    for g in values:
        served = [s for s in values if s >= g]
        lo, hi = -1, len(served)  # served[lo] does not starve (or lo = -1); served[hi] starves (or hi = len)
        if hint is not None and hint in served:  # start at the previous boundary: usually one run settles a side
            mid = served.index(hint)
        else:
            mid = (len(served) - 1) // 2
        while hi - lo > 1:
            if clock() >= deadline:
                log.info("twin boundary search: budget %.0f s spent after %d runs", budget_s, runs)
                return runs
            a = ask(served[mid], g)
            if a is None and mid == 0:  # the twin refuses this slot value at all (no KV cache left)
                break
            if a is not None and not a[1]:
                lo = mid
            else:
                hi = mid
            mid = (lo + hi) // 2
        if lo >= 0:
            hint = served[lo]
    log.info("twin boundary search: %d runs, %d configurations known", runs, len(book.answers))
    return runs
