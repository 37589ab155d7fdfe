"""What the twin simulates: one server's configuration (:class:`ServerConfig`) and its arrivals (:class:`Arrivals`).

>>> cfg = ServerConfig(model="llama-3.1-8b-instruct", served=4, max_loras=2, adapter_ranks=(8, 16, 8, 16))
>>> cfg.max_lora_rank
16
>>> arr, ranks = paper_workload([0.5, 0.25], [8, 16], served=4, duration=60, seed=0,
...                             lengths=(np.array([10, 20]), np.array([5, 7])))
>>> len(arr) > 0, ranks  # round-robin, then shuffled with the seed
(True, (16, 8, 16, 8))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["ServerConfig", "Arrivals", "ConfigError", "paper_workload", "assign_round_robin"]


class ConfigError(ValueError):
    """A configuration or workload that vLLM (or the twin) cannot run; the message says what to change."""


@dataclass(frozen=True)
class ServerConfig:
    """One vLLM V1 server with LoRA, in vLLM's own words (see DESIGN.md §The twin)."""

    model: str
    """Model name; selects the shipped profile unless the caller passes one."""
    served: int
    """Adapters deployed and receiving traffic (vLLM ``--max-cpu-loras``)."""
    max_loras: int
    """Adapter slots: distinct adapters per batch and GPU-resident adapters (vLLM ``--max-loras``)."""
    adapter_ranks: tuple[int, ...] = ()
    """Rank of adapter k (length ``served``); empty = all 8."""
    max_lora_rank: int | None = None
    """vLLM ``--max-lora-rank``; default max(adapter_ranks). Sizes the LoRA buffers taken out of the KV cache."""
    max_num_batched_tokens: int = 2048
    """Token budget of one engine step (chunked prefill)."""
    max_num_seqs: int = 2048
    """Most running requests (the paper's servers used 2048)."""
    max_model_len: int | None = None
    """Context limit; default the model's own. Requests with prompt + max_tokens above it are rejected."""
    block_size: int = 16
    """KV cache block size (tokens)."""
    kv_capacity_tokens: int | None = None
    """Override of the KV cache size (tokens); default from the profile for (max_loras, max_lora_rank)."""
    client_max_waiting: int | None = -1
    """Most requests the server's queue holds before the client stalls (the real runs' "network collapse");
    -1 = the profile's value, None = unlimited."""
    adapter_family: str = "lora"
    """Adapter family (compute scale from the profile's family table)."""

    def __post_init__(self) -> None:
        for name in ("served", "max_loras", "max_num_batched_tokens", "max_num_seqs", "block_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.max_loras > self.served:
            raise ConfigError(f"max_loras ({self.max_loras}) cannot exceed served adapters ({self.served}): "
                              "vLLM requires max_cpu_loras >= max_loras; lower --max-loras or raise --served")
        ranks = tuple(int(r) for r in self.adapter_ranks) or (8,) * self.served
        if len(ranks) != self.served:
            raise ConfigError(f"adapter_ranks has {len(ranks)} entries for {self.served} served adapters")
        if min(ranks) < 1:
            raise ConfigError(f"adapter ranks must be >= 1, got {min(ranks)}")
        object.__setattr__(self, "adapter_ranks", ranks)
        mlr = self.max_lora_rank if self.max_lora_rank is not None else max(ranks)
        if mlr < max(ranks):
            raise ConfigError(f"max_lora_rank ({mlr}) is below the largest adapter rank ({max(ranks)}); "
                              "vLLM refuses such adapters: raise --max-lora-rank")
        object.__setattr__(self, "max_lora_rank", int(mlr))
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                              f"({self.max_num_seqs}), as vLLM requires")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.kv_capacity_tokens is not None and self.kv_capacity_tokens < self.block_size:
            raise ConfigError(f"kv_capacity_tokens ({self.kv_capacity_tokens}) is below one block")


@dataclass(frozen=True, eq=False)
class Arrivals:
    """Requests as a struct of arrays, sorted by time: ``time`` (s), ``adapter`` (index < served),
    ``prompt`` and ``output`` (tokens; ``output`` is the request's max_tokens)."""

    time: np.ndarray
    adapter: np.ndarray
    prompt: np.ndarray
    output: np.ndarray

    def __post_init__(self) -> None:
        t = np.asarray(self.time, dtype=np.float64)
        a = np.asarray(self.adapter, dtype=np.int64)
        p = np.asarray(self.prompt, dtype=np.int64)
        o = np.asarray(self.output, dtype=np.int64)
        if not (t.ndim == a.ndim == p.ndim == o.ndim == 1 and t.size == a.size == p.size == o.size):
            raise ConfigError("arrivals need four 1-D arrays of equal length (time, adapter, prompt, output)")
        if t.size and not np.isfinite(t).all():
            raise ConfigError("arrival times must be finite (found NaN or inf)")
        if t.size and t.min() < 0:
            raise ConfigError(f"arrival times must be >= 0, found {t.min()}")
        if t.size and ((p < 1).any() or (o < 1).any()):
            raise ConfigError("prompt and output lengths must be >= 1 token")
        if t.size and a.min() < 0:
            raise ConfigError("adapter indices must be >= 0")
        if t.size > 1 and (np.diff(t) < 0).any():
            order = np.argsort(t, kind="stable")
            t, a, p, o = t[order], a[order], p[order], o[order]
        for name, arr in (("time", t), ("adapter", a), ("prompt", p), ("output", o)):
            object.__setattr__(self, name, arr)

    def __len__(self) -> int:
        return int(self.time.size)

    @classmethod
    def empty(cls) -> "Arrivals":
        z = np.zeros(0)
        return cls(z, z.astype(np.int64), z.astype(np.int64), z.astype(np.int64))

    def tokens(self) -> int:
        return int(self.prompt.sum() + self.output.sum())


def assign_round_robin(values: Sequence, served: int, rng: np.random.Generator) -> np.ndarray:
    """Adapter k gets ``values[k mod len]``; then which adapter carries which value is shuffled (the paper's client)."""
    arr = np.array([values[k % len(values)] for k in range(served)])
    rng.shuffle(arr)
    return arr


def paper_workload(rates: Sequence[float], ranks: Sequence[int], served: int, duration: float, seed: int,
                   lengths) -> tuple[Arrivals, tuple[int, ...]]:
    """The paper's workload: per-adapter Poisson streams over ``[0, duration)``, rates/ranks round-robin then
    shuffled with ``seed``; token lengths drawn (paired) from ``lengths`` — a LengthTable or a (prompt, output) pair
    of arrays. Returns the arrivals and the rank of each adapter."""
    if not rates or not ranks:
        raise ConfigError("rates and ranks must not be empty")
    rates = [float(r) for r in rates]
    if any(not math.isfinite(r) or r < 0 for r in rates):
        raise ConfigError(f"rates must be finite and >= 0 req/s, got {rates}")
    if any(int(r) < 1 for r in ranks):
        raise ConfigError(f"ranks must be >= 1, got {list(ranks)}")
    if served < 1:
        raise ConfigError(f"served must be >= 1, got {served}")
    if not math.isfinite(duration) or duration <= 0:
        raise ConfigError(f"duration must be a positive number of seconds, got {duration}")
    rng = np.random.default_rng(seed)
    adapter_rates = assign_round_robin(rates, served, rng).astype(np.float64)
    adapter_ranks = tuple(int(r) for r in assign_round_robin([int(r) for r in ranks], served, rng))
    # Poisson: count per adapter, then uniform order statistics (same law as summed exponential gaps).
    counts = rng.poisson(adapter_rates * duration)
    n = int(counts.sum())
    adapter = np.repeat(np.arange(served, dtype=np.int64), counts)
    time = rng.uniform(0.0, duration, size=n)
    order = np.argsort(time, kind="stable")
    time, adapter = time[order], adapter[order]
    if hasattr(lengths, "sample"):
        prompt, output = lengths.sample(rng, n)
    else:
        pool_p, pool_o = (np.asarray(x, dtype=np.int64) for x in lengths)
        idx = rng.integers(0, pool_p.size, size=n)
        prompt, output = pool_p[idx], pool_o[idx]
    return Arrivals(time, adapter, prompt, output), adapter_ranks
