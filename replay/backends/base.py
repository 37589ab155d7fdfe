"""What the replay engine asks of a backend: the twin in-process, or a vLLM server over HTTP.

The engine owns the clock in *trace time* (seconds since the trace start). It hands a backend the
requests that are due, asks it to move on to a later trace time, and collects what finished meanwhile:

    backend.start(config)
    backend.submit(requests)          # due requests, in trace-time order
    done = backend.advance(until_ts)  # the twin simulates up to until_ts; vLLM waits for the scaled wall
                                      # clock to reach it, sending each request at its own time (open loop)
    gauges = backend.gauges()         # running, waiting, KV usage, adapter loads so far
    done += backend.finish(end_ts)    # requests still in flight at the end: cancelled (unfinished)

Optionally, ``backend.window_gauges(start, end) -> Gauges | None`` gives time-weighted means over a window (and
the adapter loads inside it); the engine uses it when present, else the mean of its per-tick ``gauges()`` samples.

A backend never drops a request silently: every submitted request comes back exactly once, finished,
unfinished (still running at the end) or failed with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


@dataclass(frozen=True)
class ServingConfig:
    """The configuration under test (vLLM's flags)."""

    served: int  # --max-cpu-loras: adapters lora-0 … lora-(served-1)
    max_loras: int  # --max-loras
    max_lora_rank: int  # --max-lora-rank
    model: str = "llama-3.1-8b-instruct"
    # rank of adapter k (length ``served``), as the replay learnt it from the requests' ``adapter_rank``;
    # empty: unknown. The twin needs it (load cost per adapter); a vLLM server has its own adapters.
    adapter_ranks: tuple[int, ...] = ()


@dataclass(frozen=True)
class ReplayRequest:
    request_id: str
    ts: float  # trace time of arrival (s)
    adapter_id: str  # lora-<k>, k < served
    adapter_rank: int
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Completion:
    """What happened to one request; times in ms, measured from its arrival (trace time, unscaled)."""

    request_id: str
    finished: bool
    ttft_ms: float | None  # None: no token came back
    itl_ms: float | None  # mean inter-token gap of this request
    e2e_ms: float | None
    output_tokens_done: int  # tokens actually generated (== output_tokens when finished)
    preempted: int = 0
    error: str | None = None  # failure reason (HTTP status, timeout, reset…), None when fine


@dataclass(frozen=True)
class Gauges:
    running: float  # requests in the running batch
    waiting: float  # requests queued
    kv_usage: float  # fraction of KV cache blocks in use, 0..1
    adapter_loads: int  # adapter activations (CPU→GPU) so far, cumulative


class Backend(Protocol):
    name: str  # "twin" | "vllm"

    def start(self, config: ServingConfig) -> None: ...

    def submit(self, requests: Sequence[ReplayRequest]) -> None: ...

    def advance(self, until_ts: float) -> list[Completion]: ...

    def gauges(self) -> Gauges: ...

    def finish(self, end_ts: float) -> list[Completion]: ...
