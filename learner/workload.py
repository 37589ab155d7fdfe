"""From WINDOW records (``adaptwin.windows``) to the learner's scenarios.

A window record says what one replay served (``served``, ``max_loras``, ``max_lora_rank``) and what it was offered
and completed, in total and per adapter. It does not name the model or the rank of every adapter, so both come from
the stream's options (``--model``, ``--ranks``; ranks default to ``max_lora_rank`` for every adapter, the
conservative choice: rank only enters the features through the largest rank and the rank mix).

Rates are *request equivalents*: an adapter's offered tokens per second divided by the model's mean tokens per
request (:func:`~adaptwin.learner.features.model_facts`). The features' offered load, ``Σ rates × mean tokens``, is
then exactly the offered tokens per second the replay saw, whatever the trace's own token lengths are.

Two scenarios come out of a window:

* :func:`observed` — what the window ran: the ``served`` adapters (``lora-k`` with ``k < served``; the others were
  refused by the replay) with their observed rates, and the outcome (completed tokens/s, starved).
* :meth:`Workload.scenario` — a candidate configuration under the recent traffic: a server hosting ``served``
  adapters whose rates follow the observed per-adapter rate distribution (the paper's question: how many adapters of
  this traffic one server should host).

>>> w = {"window_start": 0.0, "window_end": 60.0, "served": 4, "max_loras": 2, "max_lora_rank": 16,
...      "offered_tokens": 60_000, "completed_tokens": 48_000, "adapters": [
...      {"adapter_id": "lora-0", "offered_tokens": 30_000}, {"adapter_id": "lora-1", "offered_tokens": 18_000},
...      {"adapter_id": "lora-7", "offered_tokens": 12_000}]}
>>> obs = observed(w, "llama-3.1-8b-instruct")
>>> obs.scenario.served, obs.refused_tokens, round(obs.throughput), obs.starved
(4, 12000, 800, 0)
>>> wl = Workload.from_windows([w], "llama-3.1-8b-instruct")
>>> wl.active, wl.scenario(8, 4).served
(3, 8)
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from adaptwin.learner.features import Scenario, model_facts
from adaptwin.learner.models import STARVED_RATIO

__all__ = ["Observed", "Workload", "WindowError", "adapter_index", "check_window", "observed"]

MAX_GROUPS = 4
"""Rate groups a workload is summarised into (the warm-start data has 1–3 rate groups per workload)."""
_LORA = re.compile(r"^lora-(\d+)$")


class WindowError(ValueError):
    """A window record that passed the schema but makes no sense (the dead-letter reason)."""


def adapter_index(adapter_id: str) -> int:
    """k for ``lora-k`` (the replay's and ``twin serve``'s names), -1 for any other name."""
    m = _LORA.match(adapter_id or "")
    return int(m.group(1)) if m else -1


def check_window(w: dict) -> None:
    """Raise WindowError when a (schema-valid) window record cannot be learned from."""
    span = w["window_end"] - w["window_start"]
    if not span > 0:
        raise WindowError(f"window_end ({w['window_end']}) must be after window_start ({w['window_start']})")
    if w["served"] < 1 or w["max_loras"] < 1 or w["max_lora_rank"] < 1:
        raise WindowError(f"served, max_loras and max_lora_rank must be >= 1, got {w['served']}, {w['max_loras']}, "
                          f"{w['max_lora_rank']}")
    if w["offered_tokens"] < 0 or w["completed_tokens"] < 0:
        raise WindowError(f"token counts must be >= 0, got offered {w['offered_tokens']}, "
                          f"completed {w['completed_tokens']}")
    for a in w.get("adapters") or []:
        if not isinstance(a, dict) or not isinstance(a.get("adapter_id"), str):
            raise WindowError("every entry of 'adapters' must be an object with a string adapter_id")
        off = a.get("offered_tokens")
        if off is not None and (not isinstance(off, (int, float)) or off < 0):
            raise WindowError(f"adapter {a['adapter_id']!r}: offered_tokens must be a number >= 0, got {off!r}")


def _groups(rates: Sequence[float], n_groups: int = MAX_GROUPS) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Per-adapter rates summarised as up to ``n_groups`` (mean rate, count) groups of equal size, busiest first."""
    ordered = sorted(rates, reverse=True)
    n = len(ordered)
    k = max(1, min(n_groups, n))
    bounds = [round(i * n / k) for i in range(k + 1)]
    chunks = [ordered[bounds[i]:bounds[i + 1]] for i in range(k)]
    return tuple(sum(c) / len(c) for c in chunks), tuple(len(c) for c in chunks)


def _rank_groups(ranks: Sequence[int] | None, max_lora_rank: int,
                 served: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Adapter k has ``ranks[k mod len]`` (the replay's rule); without ranks every adapter has ``max_lora_rank``."""
    ranks = tuple(r for r in (ranks or ()) if r <= max_lora_rank) or (max_lora_rank,)
    counts = tuple(served // len(ranks) + (1 if i < served % len(ranks) else 0) for i in range(len(ranks)))
    return ranks, counts


def _span(w: dict) -> float:
    return float(w["window_end"] - w["window_start"])


@dataclass(frozen=True)
class Observed:
    """What one window ran and what came of it."""

    scenario: Scenario
    throughput: float
    """Completed tokens/s (only served adapters complete anything)."""
    starved: int
    """Starvation of the served adapters: completed ≤ 90 % of what they were offered."""
    refused_tokens: int
    """Tokens offered to adapters the configuration did not serve."""


def observed(w: dict, model: str, ranks: Sequence[int] | None = None) -> Observed | None:
    """The scenario a window ran, with its outcome; None when its served adapters were offered nothing."""
    span = _span(w)
    mean_tokens = model_facts(model).mean_tokens
    served = int(w["served"])
    per = [0.0] * served
    refused = 0
    listed = 0
    for a in w.get("adapters") or []:
        off = int(a.get("offered_tokens") or 0)
        listed += off
        k = adapter_index(a["adapter_id"])
        if 0 <= k < served:
            per[k] += off
        else:
            refused += off
    if not w.get("adapters"):  # no per-adapter detail: spread the offered tokens evenly
        per = [w["offered_tokens"] / served] * served
    served_offered = sum(per)
    if served_offered <= 0:
        return None
    rates, counts = _groups([t / span / mean_tokens for t in per])
    rk, rc = _rank_groups(ranks, int(w["max_lora_rank"]), served)
    s = Scenario(model, rates, counts, rk, rc, served, min(int(w["max_loras"]), served), int(w["max_lora_rank"]),
                 span)
    completed = float(w["completed_tokens"])
    starved = int(completed <= STARVED_RATIO * served_offered)
    return Observed(s, completed / span, starved, refused)


@dataclass(frozen=True)
class Workload:
    """The recent traffic as a per-adapter rate distribution (request equivalents per second)."""

    model: str
    rates: tuple[float, ...]
    """Rate of each active adapter (offered anything in the recent windows), busiest first."""
    ranks: tuple[int, ...] | None
    max_lora_rank: int
    span_s: float
    """Trace seconds the rates were measured over."""

    @classmethod
    def from_windows(cls, windows: Sequence[dict], model: str, ranks: Sequence[int] | None = None) -> "Workload":
        """The mean per-adapter rates over ``windows`` (the most recent few: a short memory follows shifts)."""
        mean_tokens = model_facts(model).mean_tokens
        tokens: dict[str, float] = defaultdict(float)
        span = 0.0
        for w in windows:
            span += _span(w)
            if w.get("adapters"):
                for a in w["adapters"]:
                    tokens[a["adapter_id"]] += float(a.get("offered_tokens") or 0)
            else:
                for k in range(int(w["served"])):
                    tokens[f"lora-{k}"] += w["offered_tokens"] / int(w["served"])
        rates = tuple(sorted((t / span / mean_tokens for t in tokens.values() if t > 0), reverse=True))
        mlr = max(int(w["max_lora_rank"]) for w in windows)
        return cls(model, rates, tuple(ranks) if ranks else None, mlr, span)

    @property
    def active(self) -> int:
        return len(self.rates)

    @property
    def offered_per_adapter(self) -> float:
        """Mean offered tokens/s of one active adapter."""
        return sum(self.rates) / max(1, len(self.rates)) * model_facts(self.model).mean_tokens

    def scenario(self, served: int, max_loras: int) -> Scenario:
        """``served`` adapters with this traffic's rate distribution (group shares kept) and ``max_loras`` slots."""
        rates, counts = _groups(self.rates or (0.0,))
        n = sum(counts)
        # largest-remainder apportionment of `served` adapters over the groups
        exact = [served * c / n for c in counts]
        alloc = [math.floor(e) for e in exact]
        for i in sorted(range(len(exact)), key=lambda i: alloc[i] - exact[i])[: served - sum(alloc)]:
            alloc[i] += 1
        pairs = [(r, c) for r, c in zip(rates, alloc) if c > 0]
        rk, rc = _rank_groups(self.ranks, self.max_lora_rank, served)
        return Scenario(self.model, tuple(r for r, _ in pairs), tuple(c for _, c in pairs), rk, rc, served,
                        min(max_loras, served), self.max_lora_rank, self.span_s)

    def adapter_rates(self, served: int) -> list[float]:
        """One rate per adapter for a what-if twin run of ``served`` adapters (the busiest pattern repeated)."""
        s = self.scenario(served, 1)
        return [r for r, c in zip(s.rates, s.rate_counts) for _ in range(c)]
