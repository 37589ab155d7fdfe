"""The replay driver: trace-time clock, windows, starvation accounting per window and per adapter, gauges.

The clock moves in fixed *ticks* of trace time (``tick_s``, default 1 s; windows are a whole number of ticks).
Tick ``k`` covers ``[k·tick, (k+1)·tick)``: once the source's watermark has passed its end, the requests that
arrived in it are taken from the merge buffer in (ts, partition, sequence) order, refused or submitted to the
backend, the backend advances to the tick's end and returns what finished, and every window that ended is
closed. The sequence of calls a backend sees depends only on the requests, never on how Kafka delivered them,
so a replay is deterministic — which is what makes a killed replay restartable without duplicates
(:mod:`adaptwin.replay.telemetry`).

Accounting (the paper's §1.3 rule, per window, per adapter and for the whole run):

* offered tokens (prompt + output) count in the window in which the request ARRIVED, completed tokens in the
  window in which it FINISHED; so a window's ratio ``1 − completed/offered`` can be negative when a backlog
  drains; the run record (``scope="run"``, ``[0, T)``) is the paper's criterion exactly: requests that arrived
  before T, completed if they finished by T.
* a request for an adapter this configuration does not serve (``lora-k`` with k ≥ served, or another name) or
  with a rank above ``max_lora_rank`` is *offered but refused*: its tokens count as offered, never completed;
  it gets a telemetry record (``finished=false``, ``error`` says why) and a dead letter (stage ``replay``).
* a request arriving after the watermark passed its tick (more out of order than the lateness allowance) is
  replayed at the start of the current tick (``late`` in the summary).
* at most ``max_backlog`` requests are in flight (submitted, not finished); beyond that requests wait in the
  client (``held``; replayed when room frees, their latencies count from their real arrival); the mean number
  held is added to the window's ``waiting`` figure and its maximum is in the summary — never hidden.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from adaptwin.cliutil import UserError
from adaptwin.replay.backends.base import Backend, Completion, ReplayRequest, ServingConfig
from adaptwin.replay.backends.twin import adapter_index
from adaptwin.replay.source import INF, RequestColumns, RequestSource
from adaptwin.replay.telemetry import Checkpoint, MemoryEmitter, dead_letter, telemetry_records
from adaptwin.schemas import SCHEMA_VERSION

log = logging.getLogger(__name__)

STARVATION_THRESHOLD = 0.1  # starved <=> 1 - completed/offered >= 0.1 (paper §1.3)
FLUSH_RECORDS = 5000  # send buffered records once this many are waiting (and at every commit)


@dataclass(frozen=True)
class ReplayOptions:
    run_id: str  # this replay
    served: int  # --max-cpu-loras
    max_loras: int
    max_lora_rank: int | None = None  # default: the largest rank among the served adapters
    model: str = "llama-3.1-8b-instruct"
    ranks: tuple[int, ...] | None = None  # adapter k has ranks[k mod len]; None: learnt from the requests
    window_s: float = 60.0
    tick_s: float = 1.0
    duration_s: float | None = None  # None: up to the end of the window holding the last arrival
    max_backlog: int = 100_000  # requests in flight (submitted, not finished)
    commit_interval_s: float = 1.0  # wall seconds between transactions
    discover_s: float = 600.0  # ranks are learnt from the requests that arrive before this trace time
    flush_records: int = FLUSH_RECORDS  # records buffered before they are sent (inside the open transaction)
    source_name: str = ""  # for dead letters
    pace: float | None = None  # trace seconds per wall second; None: as fast as it can

    def __post_init__(self) -> None:
        if self.served < 1 or self.max_loras < 1:
            raise UserError(f"--served and --max-loras must be >= 1, got {self.served} and {self.max_loras}")
        if self.max_loras > self.served:
            raise UserError(f"--max-loras ({self.max_loras}) cannot exceed --served ({self.served}): vLLM requires "
                            "max_cpu_loras >= max_loras")
        if not (self.window_s > 0 and math.isfinite(self.window_s)):
            raise UserError(f"--window must be a positive number of seconds, got {self.window_s}")
        if not (0 < self.tick_s <= self.window_s):
            raise UserError(f"--tick must be in (0, window], got {self.tick_s}")
        if self.duration_s is not None and not (self.duration_s > 0 and math.isfinite(self.duration_s)):
            raise UserError(f"--duration must be a positive number of seconds, got {self.duration_s}")
        if self.max_backlog < 1:
            raise UserError(f"--max-backlog must be >= 1, got {self.max_backlog}")
        if self.pace is not None and not (self.pace > 0 and math.isfinite(self.pace)):
            raise UserError(f"--speedup must be a positive number, got {self.pace}")
        # a window is a whole number of ticks
        n = max(1, round(self.window_s / self.tick_s))
        object.__setattr__(self, "tick_s", self.window_s / n)


def infer_ranks(served: int, adapters: np.ndarray, ranks: np.ndarray) -> tuple[int, ...]:
    """Rank of each served adapter from ``(adapter index, rank)`` observations.

    Adapters seen keep their rank; the others follow the shortest period that explains what was seen (ingest
    and the paper's client give adapter k ``ranks[k mod len]``), else the most common rank.

    >>> infer_ranks(6, np.array([0, 1, 2, 4]), np.array([8, 16, 8, 8]))
    (8, 16, 8, 16, 8, 16)
    """
    seen: dict[int, int] = {}
    for k, r in zip(adapters.tolist(), ranks.tolist()):
        if 0 <= k < served:
            seen.setdefault(k, r)
    if not seen:
        return (8,) * served
    counts = Counter(seen.values())
    mode = min(counts, key=lambda r: (-counts[r], r))
    for period in range(1, served + 1):
        classes: dict[int, int] = {}
        if all(classes.setdefault(k % period, r) == r for k, r in seen.items()):
            break
    return tuple(seen.get(k, classes.get(k % period, mode)) for k in range(served))


@dataclass
class _Acc:
    """One window's (or the run's) accumulators."""

    arrivals: int = 0
    finished: int = 0
    offered: int = 0
    completed: int = 0
    off_a: Counter = field(default_factory=Counter)
    com_a: Counter = field(default_factory=Counter)
    ttft_sum: float = 0.0
    itl_weighted: float = 0.0  # sum of itl_ms * (tokens - 1)
    gaps: int = 0
    samples: int = 0
    running: float = 0.0
    waiting: float = 0.0
    kv: float = 0.0
    held: float = 0.0
    loads_at_start: int = 0


@dataclass
class ReplayStats:
    offered: int = 0  # requests taken from the source (arrived before the end)
    submitted: int = 0
    completed: int = 0  # completions returned by the backend (finished or not)
    finished: int = 0
    refused: int = 0
    late: int = 0
    held_max: int = 0
    rank_mismatch: int = 0
    telemetry: int = 0  # records created (sent, or re-created and skipped after a restart)
    windows: int = 0
    dead: int = 0
    ticks: int = 0


class Replay:
    """Drive ``backend`` with the requests of ``source``; records go to ``emitter``.

    ``run()`` returns the summary (the ``--json`` object); the records went to the emitter.
    """

    def __init__(self, options: ReplayOptions, source: RequestSource, backend: Backend, emitter=None,
                 checkpoint: Checkpoint | None = None, progress: bool = False):
        self.opt = options
        self.source = source
        self.backend = backend
        self.emitter = emitter if emitter is not None else MemoryEmitter()
        self.resume = checkpoint or Checkpoint()
        self.progress = progress
        self.stats = ReplayStats()
        self.config: ServingConfig | None = None
        self._inflight: dict[str, tuple] = {}  # request id -> (adapter id, ts, prompt, output, twin ts)
        self._held = RequestColumns.empty()
        self._windows: dict[int, _Acc] = {}
        self._next_window = 0  # first window not yet closed
        self._run = _Acc()
        self._pending: tuple[list, list, list] = ([], [], [])  # telemetry, windows, dead not yet sent
        self._last_commit = time.monotonic()
        self._warned_rank: set[str] = set()
        self._adapter_idx: dict[str, int] = {}
        self._loads = 0  # cumulative adapter loads at the last sample
        self._gsum = [0.0, 0.0, 0.0]  # span-weighted running, waiting, kv_usage of the closed windows
        self._gspan = 0.0
        self._pace_origin: tuple[float, float] | None = None  # (wall, trace time) of the first paced tick

    # ---------------------------------------------------------------------------------------------------------
    def run(self) -> dict:
        opt, src = self.opt, self.source
        if self.resume.done:
            return dict(self.resume.summary or {}, resumed="already complete")
        t0 = time.perf_counter()
        from tqdm import tqdm

        bar = tqdm(desc=f"replay {opt.run_id}", unit=" s trace", total=opt.duration_s, disable=not self.progress,
                   file=sys.stderr, mininterval=0.5)
        k = 0  # next tick
        tick = opt.tick_s
        try:
            while True:
                src.poll(0.05)
                wm = src.watermark()
                if opt.duration_s is not None and wm >= opt.duration_s:
                    wm = INF  # everything needed is here
                if self.config is None and (wm >= min(opt.discover_s, opt.duration_s or INF) or src.ended()
                                            or len(src.buffer) >= src.max_buffer):
                    self._start_backend()
                if self.config is not None:
                    end = opt.duration_s if opt.duration_s is not None else INF
                    if src.ended() and end == INF:
                        break  # the end is the last arrival's window: the loop below runs up to it
                    while (k + 1) * tick <= wm and k * tick < end:
                        self._tick(k, k * tick, min((k + 1) * tick, end))
                        k += 1
                        bar.update(tick)
                        if k % 50 == 0:
                            bar.set_postfix(inflight=len(self._inflight), held=len(self._held),
                                            buffered=len(src.buffer), refresh=False)
                    if src.ended() or (opt.duration_s is not None and k * tick >= opt.duration_s):
                        break
            end_ts = self._end_ts()
            while k * tick < end_ts:
                self._tick(k, k * tick, min((k + 1) * tick, end_ts))
                k += 1
                bar.update(tick)
            summary = self._finish(k, end_ts, time.perf_counter() - t0)
        finally:
            bar.close()
        return summary

    def _pace(self, k: int, a: float, b: float) -> None:
        """With ``pace``: wait until the wall clock reaches trace time ``b`` (ticks a restarted replay re-creates
        are not paced again)."""
        if self.opt.pace is None or k <= self.resume.tick:
            return
        if self._pace_origin is None:
            self._pace_origin = (time.perf_counter(), a)
        wall0, ts0 = self._pace_origin
        delay = wall0 + (b - ts0) / self.opt.pace - time.perf_counter()
        if delay > 0:
            time.sleep(delay)

    def _end_ts(self) -> float:
        if self.opt.duration_s is not None:
            return self.opt.duration_s
        last = self.source.last_ts
        if last == -INF:
            raise UserError("no requests to replay: the source holds none of the selected run "
                            "(check --run-id-in, or the file)")
        w = self.opt.window_s
        return (math.floor(last / w) + 1) * w

    # ---------------------------------------------------------------------------------------------------------
    def _start_backend(self) -> None:
        opt = self.opt
        if opt.ranks:
            ranks = tuple(opt.ranks[k % len(opt.ranks)] for k in range(opt.served))
        else:
            first = self.source.buffer.peek_below(min(opt.discover_s, self.source.watermark()))
            idx = np.fromiter((self._index(a) for a in first.adapter_id), dtype=np.int64, count=len(first))
            ranks = infer_ranks(opt.served, idx, first.adapter_rank)
        mlr = opt.max_lora_rank if opt.max_lora_rank is not None else max(ranks)
        if mlr < max(ranks):
            raise UserError(f"--max-lora-rank {mlr} is below the rank of a served adapter ({max(ranks)}); vLLM "
                            "would refuse it: raise --max-lora-rank")
        self.config = ServingConfig(served=opt.served, max_loras=opt.max_loras, max_lora_rank=mlr, model=opt.model,
                                    adapter_ranks=ranks)
        try:
            self.backend.start(self.config)
        except ValueError as err:  # the twin's ConfigError: a configuration vLLM would not start with
            raise UserError(str(err)) from None
        log.info("replay %s: %s backend, served=%d max_loras=%d max_lora_rank=%d", opt.run_id, self.backend.name,
                 opt.served, opt.max_loras, mlr)

    def _index(self, adapter_id: str) -> int:
        k = self._adapter_idx.get(adapter_id)
        if k is None:
            k = self._adapter_idx[adapter_id] = adapter_index(adapter_id)
        return k

    def _acc(self, w: int) -> _Acc:
        acc = self._windows.get(w)
        if acc is None:
            acc = self._windows[w] = _Acc(loads_at_start=self._loads)
        return acc

    def _window_of(self, ts: float) -> int:
        return max(self._next_window, int(ts // self.opt.window_s))

    # ---------------------------------------------------------------------------------------------------------
    def _tick(self, k: int, a: float, b: float) -> None:
        self._pace(k, a, b)
        opt, st = self.opt, self.stats
        dead: list[dict] = []
        # -- arrivals of [a, b): taken in (ts, partition, seq) order
        rows = self.source.take(b)
        if self.source.dead:
            for d in self.source.dead:
                dead.append(dict(d, run_id=opt.run_id))
            self.source.dead = []
        refused_tel = ([], [], [], [], [], [])  # request_id, adapter_id, ts, prompt, output, error
        accepted_mask = np.ones(len(rows), dtype=bool)
        if len(rows):
            late = rows.ts < a
            if late.any():
                st.late += int(late.sum())
                log.warning("%d request(s) arrived after the watermark passed them (more out of order than "
                            "--lateness); replayed at t=%.3f", int(late.sum()), a)
            rows.ts = np.maximum(rows.ts, a)
            st.offered += len(rows)
            wstart = self._window_of(a)
            ids, ads, tss, prs, outs, rks = (rows.request_id.tolist(), rows.adapter_id.tolist(), rows.ts.tolist(),
                                             rows.prompt.tolist(), rows.output.tolist(), rows.adapter_rank.tolist())
            for i, (rid, ad, ts, p, o, r) in enumerate(zip(ids, ads, tss, prs, outs, rks)):
                tokens = p + o
                w = max(wstart, int(ts // opt.window_s))
                acc = self._acc(w)
                acc.arrivals += 1
                acc.offered += tokens
                acc.off_a[ad] += tokens
                self._run.arrivals += 1
                self._run.offered += tokens
                self._run.off_a[ad] += tokens
                why = self._refusal(ad, r, rid)
                if why is not None:
                    accepted_mask[i] = False
                    for col, val in zip(refused_tel, (rid, ad, ts, p, o, why)):
                        col.append(val)
                    dead.append(dead_letter(opt.run_id, opt.source_name, None, why,
                                            {"request_id": rid, "adapter_id": ad, "adapter_rank": r, "ts": ts,
                                             "prompt_tokens": p, "output_tokens": o}))
            st.refused += len(refused_tel[0])
        # -- submit within the in-flight bound; the rest waits in the client (FIFO)
        queue = RequestColumns.concat([self._held, rows.select(accepted_mask)]) if len(rows) else self._held
        room = max(0, opt.max_backlog - len(self._inflight))
        submit, self._held = queue.select(slice(0, room)), queue.select(slice(room, None))
        st.held_max = max(st.held_max, len(self._held))
        if len(submit):
            twin_ts = np.maximum(submit.ts, a).tolist()
            reqs = [ReplayRequest(rid, t, ad, r, p, o) for rid, t, ad, r, p, o in zip(
                submit.request_id.tolist(), twin_ts, submit.adapter_id.tolist(), submit.adapter_rank.tolist(),
                submit.prompt.tolist(), submit.output.tolist())]
            for req, ts in zip(reqs, submit.ts.tolist()):
                self._inflight[req.request_id] = (req.adapter_id, ts, req.prompt_tokens, req.output_tokens, req.ts)
            self.backend.submit(reqs)
            st.submitted += len(reqs)
        done = self.backend.advance(b)
        self._sample(a)
        self._account(done, b, final=False)
        self._emit_tick(k, done, refused_tel, dead, b)
        st.ticks = k + 1

    def _refusal(self, adapter_id: str, rank: int, request_id: str) -> str | None:
        opt, cfg = self.opt, self.config
        k = self._index(adapter_id)
        if k < 0:
            return (f"adapter id {adapter_id!r} is not of the form lora-<k>; this replay serves "
                    f"lora-0 … lora-{opt.served - 1}")
        if k >= opt.served:
            return (f"adapter {adapter_id} is not served by this configuration (--served {opt.served}: "
                    f"lora-0 … lora-{opt.served - 1})")
        if rank > cfg.max_lora_rank:
            return f"adapter {adapter_id} has rank {rank}, above --max-lora-rank {cfg.max_lora_rank}; vLLM refuses it"
        if request_id in self._inflight:
            return f"duplicate request id {request_id!r} (already in flight)"
        if rank != cfg.adapter_ranks[k]:
            self.stats.rank_mismatch += 1
            if adapter_id not in self._warned_rank:
                self._warned_rank.add(adapter_id)
                log.warning("adapter %s: request with rank %d, the replay serves it with rank %d (learnt from the "
                            "first --discover seconds; pass --ranks to set them)", adapter_id, rank,
                            cfg.adapter_ranks[k])
        return None

    def _sample(self, a: float) -> None:
        g = self.backend.gauges()
        acc = self._acc(self._window_of(a))
        acc.samples += 1
        acc.running += g.running
        acc.waiting += g.waiting
        acc.kv += g.kv_usage
        acc.held += len(self._held)
        self._loads = g.adapter_loads

    def _account(self, done: list[Completion], now: float, final: bool) -> None:
        """Credit completed tokens to the window of each finish."""
        for c in done:
            info = self._inflight.get(c.request_id)
            if info is None or not c.finished or c.e2e_ms is None:
                continue
            ad, ts, p, o, twin_ts = info
            finish = twin_ts + c.e2e_ms / 1000.0
            if final and finish > now:
                continue
            tokens = p + o
            acc = self._acc(self._window_of(finish))
            delay_ms = (twin_ts - ts) * 1000.0
            for x in (acc, self._run):
                x.finished += 1
                x.completed += tokens
                x.com_a[ad] += tokens
                if c.ttft_ms is not None:
                    x.ttft_sum += c.ttft_ms + delay_ms
                if c.itl_ms is not None and c.output_tokens_done > 1:
                    x.itl_weighted += c.itl_ms * (c.output_tokens_done - 1)
                    x.gaps += c.output_tokens_done - 1

    # ---------------------------------------------------------------------------------------------------------
    def _telemetry(self, done: list[Completion], refused: tuple, end: float | None = None) -> list[dict]:
        opt, st = self.opt, self.stats
        rid, ad, ts, pr, out, ttft, itl, e2e, fin, pre, err = ([] for _ in range(11))
        for c in done:
            a, t, p, o, twin_ts = self._inflight.pop(c.request_id)
            delay = (twin_ts - t) * 1000.0
            finished = c.finished and c.e2e_ms is not None and (end is None or twin_ts + c.e2e_ms / 1000.0 <= end)
            rid.append(c.request_id); ad.append(a); ts.append(t); pr.append(p); out.append(o)
            ttft.append(None if c.ttft_ms is None else c.ttft_ms + delay)
            itl.append(c.itl_ms if finished else None)
            e2e.append(c.e2e_ms + delay if finished else None)
            fin.append(finished); pre.append(int(c.preempted)); err.append(c.error)
        st.completed += len(done)
        st.finished += sum(fin)
        n = len(refused[0])
        rid += refused[0]; ad += refused[1]; ts += refused[2]; pr += refused[3]; out += refused[4]
        ttft += [None] * n; itl += [None] * n; e2e += [None] * n; fin += [False] * n; pre += [0] * n
        err += refused[5]
        return telemetry_records(opt.run_id, self.backend.name, opt.served, opt.max_loras, rid, ad, ts, pr, out,
                                 ttft, itl, e2e, fin, pre, err)

    def _close_windows(self, upto: float, final: bool = False) -> list[dict]:
        """WINDOW records of every window that ends at or before ``upto``; with ``final`` also the window that
        ``upto`` cuts short (a --duration that is not a whole number of windows)."""
        out = []
        W = self.opt.window_s
        while True:
            w = self._next_window
            start, end = w * W, (w + 1) * W
            eps = 1e-9 * max(1.0, end)
            if end > upto + eps:
                if not (final and start < upto - eps):
                    break
                end = upto
            acc = self._windows.pop(w, None) or _Acc(loads_at_start=self._loads)
            rec = self._window_record(acc, start, end, "window")
            if acc.held:
                log.warning("window [%g, %g): %.0f requests on average held by the client (in flight >= "
                            "--max-backlog %d)", start, end, acc.held / max(acc.samples, 1), self.opt.max_backlog)
            span = end - start
            self._gsum[0] += rec["running"] * span
            self._gsum[1] += rec["waiting"] * span
            self._gsum[2] += rec["kv_usage"] * span
            self._gspan += span
            out.append(rec)
            self._next_window += 1
        return out

    def _window_record(self, acc: _Acc, start: float, end: float, scope: str) -> dict:
        opt, cfg = self.opt, self.config
        span = end - start
        gauges = None
        if scope == "window":
            wg = getattr(self.backend, "window_gauges", None)
            gauges = wg(start, end) if wg is not None else None
        n = max(acc.samples, 1)
        held = acc.held / n
        if gauges is not None:
            running, waiting, kv, loads = gauges.running, gauges.waiting + held, gauges.kv_usage, gauges.adapter_loads
        else:
            running, waiting, kv = acc.running / n, acc.waiting / n + held, acc.kv / n
            loads = self._loads - acc.loads_at_start
        ratio = 1.0 - acc.completed / acc.offered if acc.offered > 0 else 0.0
        adapters = sorted(set(acc.off_a) | set(acc.com_a), key=lambda a: (self._index(a) < 0, self._index(a), a))
        return {
            "v": SCHEMA_VERSION, "run_id": opt.run_id, "backend": self.backend.name, "scope": scope,
            "window_start": float(start), "window_end": float(end), "served": opt.served,
            "max_loras": opt.max_loras, "max_lora_rank": cfg.max_lora_rank, "arrivals": acc.arrivals,
            "finished": acc.finished, "offered_tokens": acc.offered, "completed_tokens": acc.completed,
            "throughput": acc.completed / span if span > 0 else 0.0, "starvation_ratio": ratio,
            "starved": int(acc.offered > 0 and ratio >= STARVATION_THRESHOLD),
            "running": float(running), "waiting": float(waiting), "kv_usage": float(kv), "adapter_loads": int(loads),
            "mean_ttft_ms": acc.ttft_sum / acc.finished if acc.finished else None,
            "mean_itl_ms": acc.itl_weighted / acc.gaps if acc.gaps else None,
            "adapters": [{"adapter_id": a, "offered_tokens": int(acc.off_a.get(a, 0)),
                          "completed_tokens": int(acc.com_a.get(a, 0)),
                          "starvation_ratio": (1.0 - acc.com_a.get(a, 0) / acc.off_a[a]) if acc.off_a.get(a) else 0.0}
                         for a in adapters],
        }

    # ---------------------------------------------------------------------------------------------------------
    def _emit_tick(self, k: int, done: list[Completion], refused: tuple, dead: list[dict], b: float) -> None:
        self._emit(k, self._telemetry(done, refused), self._close_windows(b), dead)

    def _emit(self, k: int, tel: list[dict], wins: list[dict], dead: list[dict], done: bool = False,
              summary: dict | None = None) -> None:
        st, ck = self.stats, self.resume
        st.telemetry += len(tel)
        st.windows += len(wins)
        st.dead += len(dead)
        if k <= ck.tick and not done:  # already committed by the replay that was killed: re-created, not sent
            if k == ck.tick and (st.telemetry, st.windows, st.dead) != (ck.telemetry, ck.windows, ck.dead):
                raise UserError(
                    f"replay {self.opt.run_id} restarted but did not re-create what its predecessor committed up to "
                    f"tick {k} (telemetry/windows/dead letters: {st.telemetry}/{st.windows}/{st.dead} vs "
                    f"{ck.telemetry}/{ck.windows}/{ck.dead}); its input changed since. Nothing more was sent; "
                    "replay it again under a new --run-id")
            if k == ck.tick:
                log.info("replay %s resumed after tick %d: %d telemetry records, %d windows already committed",
                         self.opt.run_id, k, ck.telemetry, ck.windows)
            return
        pt, pw, pd = self._pending
        pt += tel
        pw += wins
        pd += dead
        if len(pt) + len(pw) + len(pd) >= self.opt.flush_records:
            self._flush()
        if done or time.monotonic() - self._last_commit >= self.opt.commit_interval_s:
            self._flush()
            offsets = self.source.offsets()
            cp = Checkpoint(tick=k, telemetry=st.telemetry, windows=st.windows, dead=st.dead, done=done,
                            summary=summary, start=self.source.checkpoint_info().get("start", {}))
            self.emitter.commit(cp, offsets)
            self._last_commit = time.monotonic()

    def _flush(self) -> None:
        pt, pw, pd = self._pending
        if pt or pw or pd:
            self.emitter.send(pt, pw, pd)
            self._pending = ([], [], [])

    # ---------------------------------------------------------------------------------------------------------
    def _finish(self, k: int, end_ts: float, wall_s: float) -> dict:
        opt, st = self.opt, self.stats
        if self.config is None:
            self._start_backend()
        done = self.backend.finish(end_ts)
        self._account(done, end_ts, final=True)
        tel = self._telemetry(done, ([], [], [], [], [], []), end=end_ts)
        h = self._held  # requests still held by the client at the end: never sent
        if len(h):
            why = f"still held by the client at the end (more than --max-backlog {opt.max_backlog} in flight)"
            n = len(h)
            tel += telemetry_records(opt.run_id, self.backend.name, opt.served, opt.max_loras, h.request_id.tolist(),
                                     h.adapter_id.tolist(), h.ts.tolist(), h.prompt.tolist(), h.output.tolist(),
                                     [None] * n, [None] * n, [None] * n, [False] * n, [0] * n, [why] * n)
            self._held = RequestColumns.empty()
        self._loads = self.backend.gauges().adapter_loads
        wins = self._close_windows(end_ts, final=True)
        run = self._window_record(self._run, 0.0, end_ts, "run")
        span = self._gspan or 1.0
        run["running"], run["waiting"], run["kv_usage"] = (x / span for x in self._gsum)
        run["adapter_loads"] = int(self._loads)
        wins.append(run)
        summary = self._summary(run, end_ts, wall_s, telemetry=st.telemetry + len(tel), windows=st.windows + len(wins))
        self._emit(k, tel, wins, [], done=True, summary=summary)
        self.emitter.close()
        return summary

    def _summary(self, run: dict, end_ts: float, wall_s: float, telemetry: int, windows: int) -> dict:
        st, src = self.stats, self.source.stats
        return {
            "run_id": self.opt.run_id, "backend": self.backend.name, "served": self.opt.served,
            "max_loras": self.opt.max_loras, "max_lora_rank": self.config.max_lora_rank,
            "duration_s": end_ts, "total_throughput": round(run["throughput"], 4),
            "ideal_total_throughput": round(run["offered_tokens"] / end_ts, 4), "starved": run["starved"],
            "starvation_ratio": round(run["starvation_ratio"], 6), "arrivals": run["arrivals"],
            "finished": run["finished"], "refused": st.refused, "late": st.late, "held_max": st.held_max,
            "mean_ttft_ms": round(run["mean_ttft_ms"], 4) if run["mean_ttft_ms"] is not None else 0.0,
            "mean_itl_ms": round(run["mean_itl_ms"], 4) if run["mean_itl_ms"] is not None else 0.0,
            "adapter_loads": run["adapter_loads"], "telemetry": telemetry, "windows": windows,
            "dead_lettered": st.dead, "rank_mismatch": st.rank_mismatch, "other_runs_skipped": src.other_runs,
            "bad_records": src.bad_records, "max_buffered": src.max_buffered,
            "resumed_after_tick": self.resume.tick, "wall_s": round(wall_s, 4),
        }
