"""Which adapter a request goes to, for traces that carry no adapter ids (no public trace does).

A popularity law gives each of N adapters ``lora-0 … lora-(N-1)`` a weight (``lora-0`` the most
popular); requests draw their adapter from it with a seeded RNG. Ranks go round-robin over a ranks
list, as ``twin serve`` registers them: adapter k has ``ranks[k mod len(ranks)]``.

>>> import numpy as np
>>> Popularity.parse("zipf:1.1").weights(3).round(3).tolist()
[0.567, 0.264, 0.169]
>>> a = AdapterAssigner(AdapterSet.round_robin(3, (8, 16)), Popularity.parse("uniform").weights(3), np.random.default_rng(0))
>>> a.rank_of("lora-2"), a.rank_of("lora-1")
(8, 16)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adaptwin.cliutil import UserError

_GRAMMAR = "zipf:S (S > 0, e.g. zipf:1.1), uniform, or servegen[:m-small|deepseek-r1|DIR]"
_LORA = re.compile(r"lora-(\d+)")


@dataclass(frozen=True)
class Popularity:
    """A popularity law: ``zipf`` (weight of the k-th adapter ∝ 1/(k+1)^s), ``uniform``, or ``servegen``
    (the relative request counts of a ServeGen trace's clients, most active first)."""

    kind: str
    s: float = 1.0  # zipf exponent
    servegen: str = "m-small"  # shipped ServeGen trace name or a directory

    @classmethod
    def parse(cls, text: str) -> Popularity:
        kind, _, arg = text.strip().partition(":")
        if kind == "uniform" and not arg:
            return cls("uniform")
        if kind == "zipf":
            try:
                s = float(arg or 1.0)
            except ValueError:
                s = -1.0
            if not s > 0 or s == float("inf"):
                raise UserError(f"popularity {text!r}: the Zipf exponent must be a number > 0; use {_GRAMMAR}")
            return cls("zipf", s=s)
        if kind == "servegen":
            return cls("servegen", servegen=arg or "m-small")
        raise UserError(f"unknown popularity {text!r}; use {_GRAMMAR}")

    def weights(self, n: int) -> np.ndarray:
        """Probabilities of adapters 0..n-1 (sum 1, non-increasing)."""
        if n < 1:
            raise UserError(f"need at least one adapter, got {n}")
        if self.kind == "uniform":
            return np.full(n, 1.0 / n)
        if self.kind == "zipf":
            w = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** self.s
            return w / w.sum()
        counts = np.sort(np.array(list(_servegen_counts(self.servegen).values())))[::-1]
        counts = counts[counts > 0]
        if n > len(counts):
            raise UserError(f"popularity servegen:{self.servegen} has {len(counts)} clients with traffic, "
                            f"fewer than the {n} adapters asked for; use --adapters <= {len(counts)} or zipf")
        return counts[:n] / counts[:n].sum()


def _servegen_counts(name: str) -> dict[str, float]:
    from adaptwin.ingest.readers.servegen import client_request_counts
    from adaptwin.ingest.readers.shipped import SHIPPED, shipped_path

    path = shipped_path(f"servegen-{name}") if f"servegen-{name}" in SHIPPED else Path(name)
    if not path.exists():
        raise UserError(f"popularity servegen:{name}: no shipped ServeGen trace or directory of that name "
                        "(shipped: m-small, deepseek-r1)")
    return client_request_counts(path)


@dataclass(frozen=True)
class AdapterSet:
    """Adapter names and their ranks, index k = adapter k."""

    names: tuple[str, ...]
    ranks: tuple[int, ...]

    @classmethod
    def round_robin(cls, n: int, ranks: tuple[int, ...] = (8,)) -> AdapterSet:
        """``lora-0 … lora-(n-1)``, adapter k with ``ranks[k mod len(ranks)]``."""
        if not ranks or min(ranks) < 1:
            raise UserError(f"ranks must be a non-empty list of positive integers, got {list(ranks)}")
        return cls(tuple(f"lora-{k}" for k in range(n)), tuple(ranks[k % len(ranks)] for k in range(n)))


class AdapterAssigner:
    """Draws adapters by popularity (in blocks, vectorised) and knows every adapter's rank."""

    def __init__(self, adapters: AdapterSet, weights: np.ndarray, rng: np.random.Generator,
                 ranks: tuple[int, ...] = (8,), block: int = 65_536):
        self.adapters = adapters
        self.weights = weights
        self.rng = rng
        self.ranks = ranks  # for adapters named in a trace that are not in ``adapters``
        self.block = block
        self._pending: list[int] = []
        self._pos = 0
        self._index = {name: k for k, name in enumerate(adapters.names)}
        self._seen: dict[str, int] = {}  # rank of adapters met in a trace, by name
        self._others = 0  # names met that are neither known nor lora-<k>

    def draw(self, n: int) -> np.ndarray:
        """Adapter indices of the next ``n`` requests."""
        return self.rng.choice(len(self.weights), size=n, p=self.weights)

    def next(self) -> tuple[str, int]:
        """(name, rank) of the next request's adapter."""
        if self._pos == len(self._pending):
            self._pending, self._pos = self.draw(self.block).tolist(), 0
        k = self._pending[self._pos]
        self._pos += 1
        return self.adapters.names[k], self.adapters.ranks[k]

    def rank_of(self, name: str) -> int:
        """Rank of an adapter named by a trace: its own when known; ``lora-<k>`` gets ranks[k mod len],
        as ``twin serve`` registers it; other names round-robin in order of first appearance."""
        k = self._index.get(name)
        if k is not None:
            return self.adapters.ranks[k]
        rank = self._seen.get(name)
        if rank is None:
            m = _LORA.fullmatch(name)
            if m:
                k = int(m.group(1))
            else:
                k, self._others = self._others, self._others + 1
            rank = self._seen[name] = self.ranks[k % len(self.ranks)]
        return rank
