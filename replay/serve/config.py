"""What ``adaptwin twin serve`` runs: the server's flags (vLLM's names) and the faults it injects on demand."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

__all__ = ["ServeConfig", "Faults", "FaultError"]


class FaultError(ValueError):
    """A fault specification that cannot be applied; the message says which field and why."""


@dataclass(frozen=True)
class Faults:
    """Faults injected into ``/v1/completions`` (only there: health, models and metrics stay clean).

    Rates are probabilities per request, drawn from one seeded generator (reproducible runs). ``next`` forces the
    kinds of the next requests in order (e.g. ``("5xx", "reset")``), which tests use to be exact.

    >>> Faults(error_rate=0.1).active
    True
    >>> Faults().active
    False
    """

    latency_ms: float = 0.0
    """Extra delay before the server answers (headers and first token move later by this much, wall time)."""
    error_rate: float = 0.0
    """Share of requests answered with ``error_status`` and vLLM's error JSON, before reaching the twin."""
    error_status: int = 500
    """HTTP status of injected errors (500, 502, 503, 429 …)."""
    reset_rate: float = 0.0
    """Share of requests whose connection is reset (TCP RST) before any response byte."""
    midstream_reset_rate: float = 0.0
    """Share of streamed requests whose connection is reset after half of their tokens."""
    stall_rate: float = 0.0
    """Share of requests that never get an answer (the client's timeout fires)."""
    next: tuple[str, ...] = ()
    """Forced kinds for the next requests, one each: ``5xx``, ``reset``, ``midstream``, ``stall``, ``ok``."""
    seed: int = 0

    KINDS = ("5xx", "reset", "midstream", "stall", "ok")

    def __post_init__(self) -> None:
        for name in ("error_rate", "reset_rate", "midstream_reset_rate", "stall_rate"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise FaultError(f"{name} must be a probability in [0, 1], got {v!r}")
        total = self.error_rate + self.reset_rate + self.midstream_reset_rate + self.stall_rate
        if total > 1.0 + 1e-12:
            raise FaultError(f"fault rates add up to {total:.3g} > 1; lower some of them")
        if not (isinstance(self.latency_ms, (int, float)) and math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise FaultError(f"latency_ms must be a finite number >= 0, got {self.latency_ms!r}")
        if not (isinstance(self.error_status, int) and 400 <= self.error_status <= 599):
            raise FaultError(f"error_status must be an HTTP error status (400-599), got {self.error_status!r}")
        nxt = tuple(self.next)
        bad = [k for k in nxt if k not in self.KINDS]
        if bad:
            raise FaultError(f"unknown fault kind(s) {bad}; use {', '.join(self.KINDS)}")
        object.__setattr__(self, "next", nxt)

    @property
    def active(self) -> bool:
        return bool(self.latency_ms or self.error_rate or self.reset_rate or self.midstream_reset_rate
                    or self.stall_rate or self.next)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], base: "Faults | None" = None) -> "Faults":
        """Faults from a ``/fault`` JSON body; fields not given keep ``base``'s values (``{"reset": true}``
        clears everything first)."""
        if not isinstance(obj, Mapping):
            raise FaultError("the /fault body must be a JSON object")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(obj) - known - {"reset"}
        if unknown:
            raise FaultError(f"unknown field(s) {sorted(unknown)}; known: {sorted(known)} and 'reset'")
        start = cls() if (base is None or obj.get("reset")) else base
        kw = {k: (tuple(v) if k == "next" else v) for k, v in obj.items() if k != "reset"}
        try:
            return replace(start, **kw)
        except TypeError as err:
            raise FaultError(str(err)) from None

    def to_json(self) -> dict[str, Any]:
        return {"latency_ms": self.latency_ms, "error_rate": self.error_rate, "error_status": self.error_status,
                "reset_rate": self.reset_rate, "midstream_reset_rate": self.midstream_reset_rate,
                "stall_rate": self.stall_rate, "next": list(self.next), "seed": self.seed}


@dataclass(frozen=True)
class ServeConfig:
    """``adaptwin twin serve``'s flags, in vLLM's words where vLLM has one."""

    model: str
    """Base model name (selects the shipped profile unless ``profile`` is given); listed first by /v1/models."""
    max_cpu_loras: int
    """Adapters registered at start (``lora-0 … lora-(N-1)``) and the most the server holds."""
    max_loras: int
    """Adapter slots: distinct adapters per batch."""
    ranks: tuple[int, ...] = (8,)
    """Adapter ``lora-k`` has rank ``ranks[k mod len]``."""
    max_lora_rank: int | None = None
    """Default max(ranks)."""
    speedup: float = 1.0
    """Twin seconds per wall second (10 = the twin runs ten times faster than the real server would)."""
    host: str = "127.0.0.1"
    port: int = 8000
    """0 = any free port (the bound one is printed and readable from the server)."""
    max_model_len: int | None = None
    max_num_seqs: int = 2048
    max_num_batched_tokens: int = 2048
    profile: str | None = None
    """Profile JSON file (default: the shipped one for ``model``)."""
    runtime_lora_updating: bool = True
    """Expose /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM: VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)."""
    register_at_start: bool = True
    """Register lora-0 … lora-(N-1) at start; off, the adapters come through /v1/load_lora_adapter."""
    faults: Faults = field(default_factory=Faults)
    fault_endpoint: bool = False
    """Enable ``POST /fault`` (change faults at run time) and ``GET /fault``."""
    api_key: str | None = None
    """When set, ``/v1/*`` needs ``Authorization: Bearer <key>`` (vLLM's ``--api-key``); otherwise 401."""
    served_log: int = 100_000
    """How many finished requests ``GET /adaptwin/served`` keeps (ring buffer)."""

    def __post_init__(self) -> None:
        for name in ("max_cpu_loras", "max_loras", "max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.max_loras > self.max_cpu_loras:
            raise ValueError(f"--max-loras ({self.max_loras}) cannot exceed --max-cpu-loras ({self.max_cpu_loras}), "
                             "as vLLM requires max_cpu_loras >= max_loras")
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError(f"--ranks must be positive integers, got {list(self.ranks)}")
        if not (math.isfinite(self.speedup) and self.speedup > 0):
            raise ValueError(f"--speedup must be a positive number, got {self.speedup}")
        if not (0 <= self.port <= 65535):
            raise ValueError(f"--port must be 0..65535, got {self.port}")

    def adapter_ranks(self) -> tuple[int, ...]:
        return tuple(int(self.ranks[k % len(self.ranks)]) for k in range(self.max_cpu_loras))
