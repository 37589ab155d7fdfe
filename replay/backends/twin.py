"""The twin backend: the digital twin in-process, in virtual time, as fast as the twin goes.

Adapter ``lora-k`` is twin adapter index ``k``; the server is ``ServerConfig(served, max_loras, adapter_ranks,
max_lora_rank)`` with the ranks the replay learnt from the requests. Requests are fed as :class:`Arrivals`;
``advance(until)`` runs the twin up to ``until`` and returns the requests that finished (or were rejected)
at or before ``until`` — a request whose last step ends just past ``until`` is returned by the next call, so
completions always come back in the tick of their finish time.

>>> from adaptwin.replay.backends.base import ReplayRequest, ServingConfig
>>> b = TwinBackend()
>>> b.start(ServingConfig(served=2, max_loras=1, max_lora_rank=8))
>>> b.submit([ReplayRequest("a", 0.0, "lora-0", 8, 100, 10), ReplayRequest("b", 0.0, "lora-1", 8, 50, 5)])
>>> sorted(c.request_id for c in b.advance(5.0) if c.finished)
['a', 'b']
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from adaptwin.replay.backends.base import Completion, Gauges, ReplayRequest, ServingConfig
from adaptwin.twin.config import Arrivals, ServerConfig
from adaptwin.twin.engine import FINISHED, REJECTED, Engine
from adaptwin.twin.profile import Profile

__all__ = ["TwinBackend", "adapter_index"]


def adapter_index(adapter_id: str) -> int:
    """``lora-k`` -> k; -1 for any other name (the twin serves ``lora-0 … lora-(served-1)`` only)."""
    if adapter_id.startswith("lora-"):
        tail = adapter_id[5:]
        if tail.isdigit() and (tail == "0" or not tail.startswith("0")):
            return int(tail)
    return -1


class TwinBackend:
    """A :class:`~adaptwin.replay.backends.base.Backend` over :class:`adaptwin.twin.Engine`."""

    name = "twin"

    def __init__(self, profile: Profile | None = None, window_s: float = 60.0, **server_kw):
        self._profile = profile
        self._window_s = float(window_s)
        self._server_kw = server_kw  # further ServerConfig fields (max_num_seqs, max_model_len, ...)
        self.engine: Engine | None = None
        self._ids: list[str] = []  # request id of each twin request (index = twin request id)
        self._reported = bytearray()  # 1 once a request's completion was returned
        self._lo = 0  # lowest twin request id not yet reported
        self._seen = (-1, -1)  # (requests, finished count) at the last scan that left nothing due behind
        self._rejected = 0

    # -- Backend protocol ------------------------------------------------------------------------------
    def start(self, config: ServingConfig) -> None:
        ranks = tuple(config.adapter_ranks) or (config.max_lora_rank,) * config.served
        server = ServerConfig(model=config.model, served=config.served, max_loras=config.max_loras,
                              adapter_ranks=ranks, max_lora_rank=config.max_lora_rank, **self._server_kw)
        self.engine = Engine(server, self._profile, window_s=self._window_s)

    def submit(self, requests: Sequence[ReplayRequest]) -> None:
        if not requests:
            return
        eng = self._engine()
        idx = np.fromiter((adapter_index(r.adapter_id) for r in requests), dtype=np.int64, count=len(requests))
        if (idx < 0).any():
            bad = requests[int(np.argmax(idx < 0))].adapter_id
            raise ValueError(f"adapter id {bad!r} is not of the form lora-<k>; the replay refuses such requests")
        eng.add_arrivals(Arrivals(np.fromiter((r.ts for r in requests), dtype=np.float64, count=len(requests)), idx,
                                  np.fromiter((r.prompt_tokens for r in requests), dtype=np.int64, count=len(requests)),
                                  np.fromiter((r.output_tokens for r in requests), dtype=np.int64,
                                              count=len(requests))))
        self._ids.extend(r.request_id for r in requests)
        self._reported.extend(bytes(len(requests)))

    def advance(self, until_ts: float) -> list[Completion]:
        eng = self._engine()
        eng.advance_until(until_ts)
        return self._collect(until_ts, final=False)

    def gauges(self) -> Gauges:
        eng = self._engine()
        # queued, or held back by the twin's client model (requests the server's queue had no room for)
        waiting = len(self._ids) - eng.finished_count - len(eng.running) - self._rejected
        return Gauges(running=float(len(eng.running)), waiting=float(max(eng.n_waiting, waiting)),
                      kv_usage=eng.used_blocks / eng.capacity_blocks, adapter_loads=int(eng.adapter_loads))

    def window_gauges(self, start: float, end: float) -> Gauges | None:
        """Time-weighted means over the twin's statistics window ``[start, end)`` (the replay's windows have the
        same length and origin); ``adapter_loads`` is the loads inside the window. None when unknown."""
        eng = self._engine()
        w = int(start // eng.window_s)
        if abs(w * eng.window_s - start) > 1e-9 * max(1.0, start) or w >= len(eng.windows) or end <= start:
            return None
        acc, span = eng.windows[w], end - start
        return Gauges(running=acc.running_s / span, waiting=acc.waiting_s / span, kv_usage=acc.kv_s / span,
                      adapter_loads=int(acc.loads))

    def finish(self, end_ts: float) -> list[Completion]:
        eng = self._engine()
        if eng.time < end_ts:
            eng.advance_until(end_ts)
        return self._collect(end_ts, final=True)

    # -- internals -------------------------------------------------------------------------------------
    def _engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("TwinBackend.start() was not called")
        return self.engine

    def _collect(self, until: float, final: bool) -> list[Completion]:
        """Completions of the not-yet-reported requests that are done by ``until`` (all of them when final)."""
        eng, lo, n = self._engine(), self._lo, len(self._ids)
        if lo >= n or (not final and self._seen == (n, eng.finished_count)):
            return []  # nothing was submitted or finished since a scan that left nothing due
        status = np.frombuffer(bytes(eng.status[lo:n]), dtype=np.uint8)
        finish = np.frombuffer(eng.finish_time[lo:n].tobytes(), dtype=np.float64)
        fresh = np.frombuffer(bytes(self._reported[lo:n]), dtype=np.uint8) == 0
        finished = (status == FINISHED) & (finish <= until)
        rejected = status == REJECTED
        done = fresh & (finished | rejected | final)
        late = fresh & (status == FINISHED) & ~finished  # finished just past ``until``: due next time
        self._seen = (-1, -1) if late.any() else (n, eng.finished_count)
        rows = np.nonzero(done)[0]
        if rows.size == 0:
            return []
        rids = rows + lo
        arrival = np.frombuffer(eng.arrival[lo:n].tobytes(), dtype=np.float64)[rows]
        first = np.frombuffer(eng.first_token[lo:n].tobytes(), dtype=np.float64)[rows]
        last = np.frombuffer(eng.last_token[lo:n].tobytes(), dtype=np.float64)[rows]
        fin = finished[rows]
        output = np.frombuffer(eng.output[lo:n].tobytes(), dtype=np.int64)[rows]
        if final and not fin.all():
            eng.sync()  # decoders' generated counts are lazy
        generated = np.frombuffer(eng.generated[lo:n].tobytes(), dtype=np.int64)[rows]
        generated = np.where(fin, output, generated)
        preempted = np.frombuffer(eng.preemptions[lo:n].tobytes(), dtype=np.int64)[rows]
        with np.errstate(invalid="ignore", divide="ignore"):
            ttft = np.where(first <= until, (first - arrival) * 1000.0, np.nan)
            itl = np.where(fin & (generated > 1), (last - first) / (generated - 1) * 1000.0, np.nan)
            e2e = np.where(fin, (finish[rows] - arrival) * 1000.0, np.nan)
        rej = rejected[rows]
        self._rejected += int(rej.sum())
        ids, mml = self._ids, eng.max_model_len
        out = []
        for i, rid in enumerate(rids.tolist()):
            t, g, e = ttft[i], itl[i], e2e[i]
            out.append(Completion(
                request_id=ids[rid], finished=bool(fin[i]),
                ttft_ms=None if math.isnan(t) else float(t), itl_ms=None if math.isnan(g) else float(g),
                e2e_ms=None if math.isnan(e) else float(e), output_tokens_done=int(generated[i]),
                preempted=int(preempted[i]),
                error=(f"prompt + max_tokens exceed max_model_len ({mml}); vLLM answers HTTP 400" if rej[i]
                       else None)))
            self._reported[rid] = 1
        while self._lo < n and self._reported[self._lo]:
            self._lo += 1
        return out
