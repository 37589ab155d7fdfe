"""``adaptwin profile vllm``: the paper's calibration experiments (paper-digest §2.6) against a live server.

Every experiment sends streamed completions the way the replay's vLLM client does (token-id prompts, ``ignore_eos``,
tokens counted from the usage of each event because vLLM may merge tokens into one event), times every token, and
reads ``/metrics`` with the replay's Prometheus parser (``gauges_from_metrics``); latencies are server time
(wall × speed-up, 1 for vLLM). What each one measures, and what it uses where stock vLLM lacks the paper's fork's log lines:

* **decode** — N requests sent together (short prompt, T output tokens, over kept-alive connections). y = the gap
  between tokens inside the window where all N decode (a robust per-stream slope, see :meth:`Shot.itl`), or with
  ``itl_from="server"`` the server's ``vllm:inter_token_latency_seconds`` over the shot; x = N (the controlled
  concurrency; the ``vllm:num_requests_running`` mean is stored too). Once to the base model (no LoRA; skipped when the server
  serves adapters only, as ``twin serve``) → ``est_default_latency.csv`` ``experiment=decode``; once to one
  adapter → ``est_latency_overhead.csv`` ``experiment=decode_lora``.
* **LoRA overhead** — N requests spread over A adapters (request i → adapter i mod A, A ≤ max_loras), so every
  step holds A distinct adapters. The paper read A from its fork's per-step log; here A is controlled and checked
  against ``vllm:lora_requests_info``'s running set (``mean_loras_by_batch``) → ``experiment=overhead_small``.
* **prefill** — one request at a time of P prompt tokens on an idle server; TTFT(P) is one prefill step
  (``experiment=prefill`` / ``prefill_lora``). TTFT of these one-request shots comes from the server's
  ``vllm:time_to_first_token_seconds`` when it has one (no client noise), else from the client.
* **loading** — the paper read "Total loading time from memory" from its fork. Here: single requests cycling over
  max_loras + 1 adapters (every one evicts the least recently used, so each forces a CPU→GPU load) against the
  same adapter repeated; the TTFT difference is the activation time per adapter rank → ``est_loading_time.csv``.
* **KV capacity** — ``vllm:cache_config_info`` (num_gpu_blocks × block_size), or the start-up log line
  ``KV cache size: N tokens``; one row per start-up → ``est_kv_capacity.csv``. With ``--launch`` the server is
  restarted for each (max_loras, max_lora_rank) of ``--kv-grid`` and for each rank of ``--loading-ranks``.
* **scheduler** — stock vLLM logs no scheduler time; its per-step cost per running request is inside the decode
  slope. The part the twin models separately, waiting requests scanned and skipped every step because the batch
  already holds max_loras adapters, is the step-time increase with W such requests queued: max_loras holder
  requests take the slots, W requests of other adapters wait (the waiting gauge confirms all W), and one probe
  request of a holder's adapter runs; y = the mean gap the server's ITL histogram gained meanwhile, x = W →
  ``est_scheduler_overhead.csv`` (``source=profile_vllm``); see :meth:`Profiler.scheduler`.

``profile_vllm.json`` beside the CSVs records the server, the settings and the numbers the fit needs;
``adaptwin twin fit --calibration DIR`` sees it and fits with :mod:`adaptwin.profiler.vllm_profile_fit`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from adaptwin.profiler.vllm_profile_server import Launched, ServerError, ServerInfo, discover

__all__ = ["ProfileSettings", "run_profile", "CSV_COLUMNS", "META_FILE", "ServerError"]

log = logging.getLogger("adaptwin.profiler.vllm_profile")

META_FILE = "profile_vllm.json"

#: the column lists of ../shared/data/calibration/ (same names, same order); extra columns of ours go at the end
CSV_COLUMNS = {
    "est_default_latency.csv": (
        "model,experiment,max_num_seqs,set_input_length,set_output_length,dataset,request_rate,status,num_prompts,"
        "completed,total_input_tokens,total_output_tokens,duration,mean_ttft_ms,median_ttft_ms,mean_tpot_ms,"
        "mean_itl_ms,median_itl_ms,p99_itl_ms,request_throughput,input_throughput,output_throughput,mean_batch_size,"
        "max_batch_size,req_output_length,path,predicted_ms,target_ms,gauge_mean_running,adapter,min_ttft_ms,"
        "client_itl_ms,server_itl_ms,itl_source,ttft_source").split(","),
    "est_latency_overhead.csv": (
        "model,experiment,path,max_loras,max_lora_rank,set_input_length,set_output_length,status,num_prompts,"
        "completed,total_input_tokens,total_output_tokens,duration,mean_ttft_ms,median_ttft_ms,mean_tpot_ms,"
        "mean_itl_ms,median_itl_ms,p99_itl_ms,request_throughput,input_throughput,output_throughput,"
        "throughput_tok_s,mean_batch_size,max_batch_size,server_log_available,max_num_seqs,adapters_with_traffic,"
        "mean_loras_by_batch,scheduler_time_s,baseline_itl_ms,itl_overhead_pct,predicted_overhead_pct,"
        "gauge_mean_running,client_itl_ms,server_itl_ms,itl_source").split(","),
    "est_loading_time.csv": (
        "model,adapter_rank,max_lora_rank,max_loras,max_cpu_loras,path,status,num_prompts,n_disk_loads,n_mem_loads,"
        "duration,mean_activation_time_ms,constant_ms,ttft_cycle_ms,ttft_same_ms,ttft_source").split(","),
    "est_kv_capacity.csv": (
        "model,max_loras,max_lora_rank,gpu_memory_utilization,max_num_seqs,path,kv_cache_tokens,status,"
        "linear_fit_tokens,source").split(","),
    "est_scheduler_overhead.csv": (
        "source,gpu_loras,cpu_loras,cpu_gpu_diff,rank,rate,output_throughput,completed_requests,adapter_rates,"
        "max_lora_loading_time,avg_batch_size,avg_waiting_queue,max_lora_loads_from_memory,max_lora_loads_from_disk,"
        "max_lora_loads_from_memory_corrected,total_scheduling_time,mean_itl_ms,processed_tokens,duration,"
        "mean_loras_by_batch,steps,scheduling_time_per_step_ms,predicted_ms,baseline_itl_ms,set_waiting,output_tokens,"
        "waiting_at_start,waiting_at_end,waiting_sampled,itl_source,status").split(","),
}


@dataclass
class ProfileSettings:
    """What to measure and how hard (``--quick`` picks the small grid)."""

    out: Path
    url: str | None = None
    launch: list[str] | None = None
    model: str | None = None  # name stored in the CSVs / profile (default: the server's base model)
    speedup: float | None = None  # server seconds per wall second; None = ask the server (twin) or 1
    ranks: list[int] | None = None  # adapter k has ranks[k mod len] (when the server cannot tell)
    max_loras: int | None = None  # the server's --max-loras (default: from vllm:lora_requests_info)
    max_lora_rank: int | None = None  # the server's --max-lora-rank (default: the largest adapter rank)
    quick: bool = False
    decode_batches: list[int] = field(default_factory=lambda: [1, 8, 16, 32, 64, 128])
    lora_batches: list[int] = field(default_factory=lambda: [16, 64])
    adapter_counts: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    prefill_tokens: list[int] = field(default_factory=lambda: [16, 256, 512, 1024, 1536])
    output_tokens: int = 96
    prompt_tokens: int = 4
    repeats: int = 5
    loading_repeats: int | None = None  # cycles of the loading experiment (default 2 x repeats)
    batch_repeats: int = 1  # shots per decode / LoRA batch; the median one is kept (for a busy machine)
    itl_from: str = "client"  # "client": token times inside the all-decoding window; "server": ITL histogram
    waiting: list[int] = field(default_factory=lambda: [0, 100, 300])
    kv_grid: list[tuple[int, int]] = field(default_factory=list)
    loading_ranks: list[int] = field(default_factory=list)
    token_ids: tuple[int, int] = (100, 400)
    experiments: list[str] = field(default_factory=lambda: list(EXPERIMENTS))
    ready_timeout_s: float = 300.0
    request_timeout_s: float = 300.0
    api_key: str | None = None

    @classmethod
    def quick_defaults(cls, **kw) -> "ProfileSettings":
        """The ``--quick`` grid: minutes against vLLM, seconds against ``twin serve``."""
        base = dict(quick=True, decode_batches=[1, 8, 24, 48], lora_batches=[24], adapter_counts=[1, 2, 4, 8, 16],
                    prefill_tokens=[16, 512, 1024, 1536], output_tokens=64, repeats=3, waiting=[0, 150])
        base.update(kw)
        return cls(**base)


EXPERIMENTS = ("decode", "lora", "prefill", "loading", "scheduler", "kv")
#: the server's own latency histograms (vLLM's names; twin serve serves them in twin time)
HISTOGRAMS = ("vllm:inter_token_latency_seconds", "vllm:time_to_first_token_seconds")
OLD_ITL = "vllm:time_per_output_token_seconds"  # vLLM 0.8.x's name of the inter-token histogram
#: wall seconds the scheduler experiment's holders outlive its probe by: HOLD_S, plus SEND_S per waiting request
#: sent (HTTP set-up on a busy machine; measured 10-30 ms), plus the time to see them queued
HOLD_S, SEND_S = 2.0, 0.03


# ----------------------------------------------------------------------------------------------------------
# one measurement: a set of streamed requests, every token timed
@dataclass
class Timed:
    """One request's stream: when it left and when each new token arrived (wall, perf_counter)."""

    output_tokens: int
    sent: float | None = None
    times: list = field(default_factory=list)  # (t, tokens so far)
    done: bool = False
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.times[-1][1] if self.times else 0

    @property
    def finished(self) -> bool:
        return self.error is None and self.done and self.tokens >= self.output_tokens


@dataclass
class Shot:
    """Requests of one measurement and what came back; latencies in server ms (wall × speed-up)."""

    requests: list[Timed]
    scrapes: list
    wall_s: float
    speedup: float
    min_window_tokens: int = 4
    server_itl_ms: float = math.nan  # the server's own ITL histogram over the shot (vLLM: engine-core timestamps)
    server_ttft_ms: float = math.nan  # the server's own TTFT histogram mean over the shot (arrival → first token)

    @property
    def ok(self) -> list[Timed]:
        return [r for r in self.requests if r.finished]

    def itl(self, tokens: int | None = None, after: float | None = None) -> list[float]:
        """Per request, the mean gap between its tokens inside the window where every request of the group
        (``tokens`` output tokens; all when None) is decoding: after the last one's first token (and after the
        wall time ``after``), before the first one's last token. Inside it the batch is exactly the group, so x is
        the controlled N, not a gauge; ramp-up and tail (requests still arriving or already gone) are left out."""
        group = [r for r in self.ok if (tokens is None or r.output_tokens == tokens) and r.tokens >= 2]
        if not group:
            return []
        start = max(r.times[0][0] for r in group)
        if after is not None:
            start = max(start, after)
        end = min(r.times[-1][0] for r in group)
        out = []
        for r in group:
            inside = [(t, n) for t, n in r.times if start <= t <= end]
            if len(inside) >= 2 and inside[-1][1] - inside[0][1] >= self.min_window_tokens:
                out.append(_robust_gap(inside) * self.speedup * 1e3)
        return out

    def window_tokens(self, tokens: int | None = None) -> int:
        """Decode steps inside :meth:`itl`'s window (for the log)."""
        group = [r for r in self.ok if (tokens is None or r.output_tokens == tokens) and r.tokens >= 2]
        if not group:
            return 0
        start, end = max(r.times[0][0] for r in group), min(r.times[-1][0] for r in group)
        return max(sum(1 for t, _ in r.times if start <= t <= end) for r in group)

    def last_sent(self, tokens: int) -> float:
        return max(r.sent for r in self.requests if r.output_tokens == tokens and r.sent is not None)

    def ttft(self) -> list[float]:
        return [(r.times[0][0] - r.sent) * self.speedup * 1e3 for r in self.ok]

    def ttft_one(self) -> tuple[float, str]:
        """TTFT of a one-request shot: the server's histogram when it has one (no client or HTTP noise in it),
        else the client's."""
        if self.server_ttft_ms == self.server_ttft_ms:
            return self.server_ttft_ms, "server histogram"
        return self.ttft()[0], "client"

    def e2e(self, tokens: int | None = None) -> list[float]:
        return [(r.times[-1][0] - r.sent) * self.speedup * 1e3 for r in self.ok
                if tokens is None or r.output_tokens == tokens]

    def busy_scrapes(self) -> list[dict]:
        return [s for s in self.scrapes if s.get("running", 0) > 0]

    def mean_running(self) -> float:
        busy = self.busy_scrapes()
        return statistics.fmean(s["running"] for s in busy) if busy else math.nan

    def mean_running_adapters(self) -> float:
        busy = [s for s in self.busy_scrapes() if s.get("lora_running")]
        return statistics.fmean(len(s["lora_running"]) for s in busy) if busy else math.nan

    def failures(self) -> list[str]:
        return [r.error or f"{r.tokens} of {r.output_tokens} tokens" for r in self.requests if not r.finished]


class Prober:
    """Sends streamed completions (random token-id prompts, ``ignore_eos``, tokens counted from the usage of each
    event, since vLLM may merge tokens into one event) and scrapes ``/metrics`` meanwhile."""

    def __init__(self, info: ServerInfo, settings: ProfileSettings):
        import random

        self.info, self.s = info, settings
        self._rnd = random.Random(0)
        self._loop = None
        self._client = None
        self._client_size = 0

    def shot(self, plan: Iterable[tuple[float | None, str, int, int]], scrape_s: float = 0.2) -> Shot:
        """``plan``: (server-time offset s, model, prompt tokens, output tokens) per request; offset None = sent
        once every other request has its first token."""
        import asyncio

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        plan = list(plan)
        if len(plan) > 1:  # open (or re-open) one connection per request first, so that they leave together
            self._loop.run_until_complete(self._shot([(0.0, m, 1, 1) for _, m, _, _ in plan], 0.0, scrape=False))
        return self._loop.run_until_complete(self._shot(plan, scrape_s))

    def close(self) -> None:
        if self._loop is not None:
            if self._client is not None:
                self._loop.run_until_complete(self._client.aclose())
            self._loop.close()
            self._loop = self._client = None

    def _get_client(self, n: int):
        """One client for the whole profile: kept-alive connections, so a TTFT never includes a TCP connect."""
        import httpx

        if self._client is None or self._client_size < n:
            if self._client is not None:
                self._loop.create_task(self._client.aclose())
            size = max(64, n + 2)
            headers = {"Authorization": f"Bearer {self.s.api_key}"} if self.s.api_key else {}
            self._client = httpx.AsyncClient(
                base_url=self.info.url, headers=headers,
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size, keepalive_expiry=120.0),
                timeout=httpx.Timeout(self.s.request_timeout_s, connect=30.0))
            self._client_size = size
        return self._client

    def _body(self, model: str, prompt: int, output: int) -> dict:
        lo, hi = self.s.token_ids
        return {"model": model, "prompt": [self._rnd.randrange(lo, hi) for _ in range(max(1, prompt))],
                "max_tokens": output, "temperature": 0.0, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True, "continuous_usage_stats": True}}

    async def _shot(self, plan: list, scrape_s: float, scrape: bool = True) -> Shot:
        import asyncio

        import httpx

        from adaptwin.replay.backends.promtext import PromParseError
        from adaptwin.replay.backends.vllm import gauges_from_metrics

        speedup = self.info.speedup
        reqs = [Timed(int(out)) for _, _, _, out in plan]
        bodies = [self._body(m, p, o) for _, m, p, o in plan]
        scrapes: list[dict] = []
        c = self._get_client(len(plan))
        t0 = time.perf_counter()

        gate = asyncio.Event()
        gated = [i for i, item in enumerate(plan) if item[0] is None]
        first_wave = [reqs[i] for i, item in enumerate(plan) if item[0] is not None]
        if not gated:
            gate.set()

        async def one(i: int) -> None:
            if plan[i][0] is None:  # after every other request has its first token
                await gate.wait()
            else:
                delay = t0 + plan[i][0] / speedup - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)

            def on_token() -> None:
                if not gate.is_set() and all(q.times or q.error for q in first_wave):
                    gate.set()

            try:
                await _stream(c, bodies[i], reqs[i], on_token)
            finally:
                if not gate.is_set() and all(q.times or q.error or q.done for q in first_wave):
                    gate.set()

        async def scrape_loop() -> None:
            prev = frozenset()
            while True:
                try:
                    g = gauges_from_metrics((await c.get("/metrics")).text, prev)
                    g["t"] = time.perf_counter()
                    prev = frozenset(g["lora_running"])
                    scrapes.append(g)
                except (httpx.HTTPError, PromParseError):
                    pass
                await asyncio.sleep(scrape_s)

        hist0 = await self._itl_hist(c) if scrape else None
        scraper = asyncio.create_task(scrape_loop()) if scrape else None
        await asyncio.gather(*(one(i) for i in range(len(plan))))
        wall = time.perf_counter() - t0
        if scraper is not None:
            scraper.cancel()
            await asyncio.gather(scraper, return_exceptions=True)
        means = {}
        if hist0 is not None:
            hist1 = await self._itl_hist(c)
            for name in HISTOGRAMS:
                if hist1 and name in hist0 and name in hist1 and hist1[name][1] > hist0[name][1]:
                    means[name] = (hist1[name][0] - hist0[name][0]) / (hist1[name][1] - hist0[name][1]) * 1e3
        return Shot(reqs, scrapes, wall, speedup, server_itl_ms=means.get(HISTOGRAMS[0], math.nan),
                    server_ttft_ms=means.get(HISTOGRAMS[1], math.nan))

    def staged_shot(self, holders: list, waiting: list, batch: list, ready_timeout_s: float = 120.0) -> "Staged":
        """The scheduler experiment's shot; each list holds (model, prompt tokens, output tokens). ``holders`` go
        first; once each has its first token the ``waiting`` ones are sent; once ``/metrics`` shows them all
        waiting, the server's histograms are read (a), the ``batch`` is sent, and read again (b) as soon as the
        batch is done. Every gap the histograms gain between a and b is a decode step with exactly the waiting
        requests queued (as long as the holders outlive the batch: ``Staged.waiting_b``)."""
        import asyncio

        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(self._staged(holders, waiting, batch, ready_timeout_s))

    async def _staged(self, holders: list, waiting: list, batch: list, ready_timeout_s: float) -> "Staged":
        import asyncio

        import httpx

        from adaptwin.replay.backends.promtext import PromParseError
        from adaptwin.replay.backends.vllm import gauges_from_metrics

        c = self._get_client(len(holders) + len(waiting) + len(batch))
        speedup = self.info.speedup
        hold = [Timed(o) for _, _, o in holders]
        wait = [Timed(o) for _, _, o in waiting]
        runs = [Timed(o) for _, _, o in batch]
        first = asyncio.Event()

        def holders_started() -> None:
            if all(q.times or q.error or q.done for q in hold):
                first.set()

        async def holder(body: dict, r: Timed) -> None:
            try:
                await _stream(c, body, r, holders_started)
            finally:
                holders_started()

        async def gauges() -> dict:
            return gauges_from_metrics((await c.get("/metrics")).text)

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(holder(self._body(m, p, o), r)) for (m, p, o), r in zip(holders, hold)]
        await asyncio.wait_for(first.wait(), ready_timeout_s)
        bad = [r.error for r in hold if r.error]
        if bad:
            await asyncio.gather(*tasks, return_exceptions=True)
            raise ServerError(f"scheduler: {len(bad)} of {len(hold)} holder requests failed (first: {bad[0]})")
        tasks += [asyncio.create_task(_stream(c, self._body(m, p, o), r)) for (m, p, o), r in zip(waiting, wait)]
        deadline = time.perf_counter() + min(ready_timeout_s, 30.0 + 10 * SEND_S * len(wait))
        waiting_a = running_b = math.nan
        while True:  # until the server has queued every waiting request (or one of them ended: not waiting)
            try:
                waiting_a = (await gauges())["waiting"]
            except (httpx.HTTPError, PromParseError):
                pass
            if (waiting_a >= len(wait) or time.perf_counter() > deadline
                    or any(r.error or r.done for r in wait + hold)):
                break
            await asyncio.sleep(0.02)
        hist_a = await self._itl_hist(c)
        t_a = time.perf_counter()
        batch_tasks = [asyncio.create_task(_stream(c, self._body(m, p, o), r)) for (m, p, o), r in zip(batch, runs)]
        samples: list[float] = []

        async def sample() -> None:
            while True:
                try:
                    samples.append((await gauges())["waiting"])
                except (httpx.HTTPError, PromParseError):
                    pass
                await asyncio.sleep(0.2)

        sampler = asyncio.create_task(sample())
        await asyncio.gather(*batch_tasks)
        hist_b = await self._itl_hist(c)
        try:
            g = await gauges()
            waiting_b, running_b = g["waiting"], g["running"]
        except (httpx.HTTPError, PromParseError):
            waiting_b = math.nan
        t_b = time.perf_counter()
        sampler.cancel()
        await asyncio.gather(sampler, *tasks, return_exceptions=True)
        itl = (math.nan, 0.0)
        name = HISTOGRAMS[0]
        if hist_a and hist_b and name in hist_a and name in hist_b:
            itl = (hist_b[name][0] - hist_a[name][0], hist_b[name][1] - hist_a[name][1])
        shot = Shot(hold + wait + runs, [], time.perf_counter() - t0, speedup)
        return Staged(shot, runs, itl, waiting_a, waiting_b, _mean(samples) if samples else math.nan,
                      (t_b - t_a) * speedup, running_b)

    async def _itl_hist(self, c) -> dict[str, tuple[float, float]] | None:
        """(sum s, count) of the server's ITL and TTFT histograms now (None when /metrics fails)."""
        import httpx

        from adaptwin.replay.backends.promtext import PromParseError, parse

        try:
            fams = parse((await c.get("/metrics")).text)
        except (httpx.HTTPError, PromParseError):
            return None
        out: dict[str, list[float]] = {}
        for fam in fams.values():
            for smp in fam.samples:
                for name in (*HISTOGRAMS, OLD_ITL):
                    if smp.name in (name + "_sum", name + "_count"):
                        out.setdefault(name, [0.0, 0.0])[0 if smp.name.endswith("_sum") else 1] += smp.value
        if OLD_ITL in out:  # vLLM 0.8.x: the same per-token gaps under their old name
            out.setdefault(HISTOGRAMS[0], out[OLD_ITL])
            del out[OLD_ITL]
        return {k: (v[0], v[1]) for k, v in out.items()}


async def _stream(c, body: dict, r: Timed, on_token: Callable[[], None] | None = None) -> None:
    """POST one streamed completion and time its tokens into ``r`` (errors are kept in ``r.error``). A kept-alive
    connection that the server closed meanwhile (uvicorn drops idle ones after 5 s) fails before any answer: that
    request is sent once more."""
    import httpx

    for attempt in range(2):
        r.sent = time.perf_counter()
        try:
            await _stream_once(c, body, r, on_token)
            return
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ConnectError) as exc:
            if r.times or attempt == 1:
                r.error = f"{type(exc).__name__}: {exc}"
                return
        except (httpx.HTTPError, ValueError) as exc:
            r.error = f"{type(exc).__name__}: {exc}"
            return


async def _stream_once(c, body: dict, r: Timed, on_token: Callable[[], None] | None) -> None:
    async with c.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            r.error = f"http {resp.status_code}: {(await resp.aread())[:160]!r}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                r.done = True
                continue
            t = time.perf_counter()
            obj = json.loads(data)
            usage, choices = obj.get("usage") or {}, obj.get("choices")
            n = usage.get("completion_tokens") if isinstance(usage, dict) else None
            if not isinstance(n, int):
                n = r.tokens + (1 if choices else 0)
            if n > r.tokens:
                r.times.append((t, n))
                if on_token is not None:
                    on_token()


@dataclass
class Staged:
    """What :meth:`Prober.staged_shot` saw: the batch's requests, the server's ITL histogram (sum s, count) gained
    between a and b, the waiting gauge at a, at b and sampled in between, the a → b span and the running gauge at b."""

    shot: Shot
    batch: list[Timed]
    itl: tuple[float, float]
    waiting_a: float
    waiting_b: float
    waiting_mean: float
    span_s: float  # a -> b, server s
    running_b: float = math.nan


def _robust_gap(points: list[tuple[float, int]]) -> float:
    """Seconds per token of one stream: the median slope over pairs of its token times at least a quarter of the
    window apart (Theil–Sen). A client or server descheduled for a moment shows up as one long gap and a burst; the
    median of pair slopes ignores both, where the two end points alone would not."""
    if len(points) > 64:  # O(n²) pairs: an even subsample keeps it cheap for long streams
        step = len(points) / 64
        points = [points[int(i * step)] for i in range(64)] + [points[-1]]
    span = points[-1][1] - points[0][1]
    gap = max(1, span // 4)
    slopes = [(tj - ti) / (nj - ni) for i, (ti, ni) in enumerate(points) for tj, nj in points[i + 1:]
              if nj - ni >= gap]
    return statistics.median(slopes) if slopes else (points[-1][0] - points[0][0]) / span


def _mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def _p99(xs: list[float]) -> float:
    if not xs:
        return math.nan
    ys = sorted(xs)
    return ys[min(len(ys) - 1, int(math.ceil(0.99 * len(ys))) - 1)]


# ----------------------------------------------------------------------------------------------------------
# the experiments
class Profiler:
    """Runs the experiments against one server and collects rows per CSV."""

    def __init__(self, info: ServerInfo, settings: ProfileSettings, progress: Callable[[str], None] | None = None):
        self.info, self.s = info, settings
        self.probe = Prober(info, settings)
        self.model = settings.model or info.base_model or "unknown-model"
        self.max_loras = settings.max_loras or info.max_loras
        self.max_lora_rank = settings.max_lora_rank or max(info.adapter_ranks.values())
        self.rows: dict[str, list[dict]] = {name: [] for name in CSV_COLUMNS}
        self.notes: list[str] = list(info.notes)
        self.base_ok: bool | None = None
        self._progress = progress or (lambda msg: None)

    # -- helpers
    def _cap_prompt(self, p: int, output: int) -> int:
        mml = self.info.max_model_len
        return max(1, min(p, mml - output - 1)) if mml else p

    def _check(self, shot: Shot, what: str) -> None:
        bad = shot.failures()
        if bad:
            raise ServerError(f"{what}: {len(bad)} of {len(shot.requests)} requests failed (first: {bad[0]})")

    def warm(self) -> None:
        """One request per adapter (loads them, compiles kernels) and learns whether the base model answers."""
        self._progress("warm-up")
        shot = self.probe.shot([(0.0, a, 8, 4) for a in self.info.adapters])
        self._check(shot, "warm-up")
        if self.max_loras is None:
            self.max_loras = kv_max_lora(self.info.url)
        if self.max_loras is None:
            raise ServerError("cannot tell the server's --max-loras (no vllm:lora_requests_info); pass --max-loras")
        if self.info.base_model:
            b = self.probe.shot([(0.0, self.info.base_model, 8, 4)])
            self.base_ok = not b.failures()
            if not self.base_ok:
                self.notes.append(f"the base model {self.info.base_model!r} refused completions "
                                  f"({b.failures()[0][:120]}): no-LoRA runs skipped, the LoRA runs carry the step "
                                  "constants (the twin only runs LoRA batches)")
        else:
            self.base_ok = False

    def _decode_row(self, shot: Shot, n: int, out: int, prompt: int) -> dict:
        row = self._decode_row_client(shot, n, out, prompt)
        if self.s.itl_from == "server" and shot.server_itl_ms == shot.server_itl_ms:
            # the server's ITL over the shot (vLLM stamps tokens in the engine core: a slow API process that
            # delivers them in bursts does not distort it)
            row.update(mean_itl_ms=shot.server_itl_ms, median_itl_ms=math.nan, mean_tpot_ms=shot.server_itl_ms,
                       itl_source="server histogram")
            # x stays the controlled N: a shot is a few /metrics samples long, too few for a mean of the gauge
            # (kept in gauge_mean_running)
        else:
            row["itl_source"] = "client window"
        return row

    def _decode_row_client(self, shot: Shot, n: int, out: int, prompt: int) -> dict:
        itl, ttft = shot.itl(), shot.ttft()
        dur = shot.wall_s * shot.speedup
        ok = shot.ok
        return {"model": self.model, "set_input_length": prompt, "set_output_length": out, "status": "ok",
                "num_prompts": n, "completed": len(ok), "total_input_tokens": prompt * len(ok),
                "total_output_tokens": out * len(ok), "duration": dur, "mean_ttft_ms": _mean(ttft),
                "median_ttft_ms": _median(ttft), "mean_tpot_ms": _mean(itl), "mean_itl_ms": _mean(itl),
                "median_itl_ms": _median(itl), "p99_itl_ms": _p99(itl), "request_throughput": len(ok) / dur,
                "input_throughput": prompt * len(ok) / dur, "output_throughput": out * len(ok) / dur,
                "mean_batch_size": n, "max_batch_size": n, "gauge_mean_running": shot.mean_running(),
                "client_itl_ms": _mean(itl), "server_itl_ms": shot.server_itl_ms,
                "request_rate": "inf", "dataset": "random-token-ids", "path": self.info.url}

    def _batch(self, models: list[str], p: int, what: str) -> tuple[Shot, int]:
        """N requests sent together; longer outputs when their decode windows did not overlap (on a busy machine
        the client or the server takes a while to start all of them)."""
        out = self.s.output_tokens
        for attempt in range(3):
            good: list[Shot] = []
            for _ in range(max(1, self.s.batch_repeats)):
                shot = self.probe.shot([(0.0, m, p, out) for m in models])
                self._check(shot, what)
                if self.s.itl_from == "server" and shot.server_itl_ms == shot.server_itl_ms:
                    good.append(shot)
                elif len(shot.itl()) >= max(1, len(models) // 2):
                    good.append(shot)
            if good:  # the median shot: a busy machine both slows steps and bunches token deliveries
                key = (lambda sh: sh.server_itl_ms) if self.s.itl_from == "server" else (lambda sh: _median(sh.itl()))
                return sorted(good, key=key)[len(good) // 2], out
            out = min(2 * out, (self.info.max_model_len or 1 << 30) - p - 1)
            log.warning("%s: the %d requests never decoded together for %d tokens; again with %d output tokens",
                        what, len(models), shot.min_window_tokens, out)
        raise ServerError(f"{what}: the requests never decoded together (the machine is too busy, or the server "
                          "admits them one by one); try fewer --decode-batches / --lora-batches or a lower "
                          "twin serve --speedup")

    def decode(self) -> None:
        s, p = self.s, self._cap_prompt(self.s.prompt_tokens, self.s.output_tokens)
        adapter = self.info.adapters[0]
        for n in s.decode_batches:
            if self.base_ok:
                self._progress(f"decode N={n} (base model)")
                shot, out = self._batch([self.info.base_model] * n, p, f"decode N={n}")
                row = self._decode_row(shot, n, out, p)
                row.update(experiment="decode", max_num_seqs="", req_output_length=out, adapter="")
                self.rows["est_default_latency.csv"].append(row)
            self._progress(f"decode N={n} (one adapter)")
            shot, out = self._batch([adapter] * n, p, f"decode N={n} ({adapter})")
            self.rows["est_latency_overhead.csv"].append(self._lora_row(shot, n, 1, p, "decode_lora", out))

    def _lora_row(self, shot: Shot, n: int, a: int, p: int, experiment: str, out: int) -> dict:
        row = self._decode_row(shot, n, out, p)
        row.pop("request_rate"), row.pop("dataset")
        base = [r for r in self.rows["est_default_latency.csv"]
                if r["experiment"] == "decode" and r["max_batch_size"] == n]
        base_itl = base[0]["mean_itl_ms"] if base else math.nan
        row.update(experiment=experiment, max_loras=self.max_loras, max_lora_rank=self.max_lora_rank,
                   throughput_tok_s=row["input_throughput"] + row["output_throughput"], server_log_available=False,
                   adapters_with_traffic=a, mean_loras_by_batch=shot.mean_running_adapters(),
                   baseline_itl_ms=base_itl,
                   itl_overhead_pct=100 * row["mean_itl_ms"] / base_itl if base_itl == base_itl else math.nan)
        return row

    def lora(self) -> None:
        s, p = self.s, self._cap_prompt(self.s.prompt_tokens, self.s.output_tokens)
        counts = sorted({a for a in s.adapter_counts if a <= min(self.max_loras, len(self.info.adapters))})
        if len(counts) < 2:
            self.notes.append(f"LoRA overhead: the server allows {min(self.max_loras, len(self.info.adapters))} "
                              "distinct adapters per batch; at least 2 are needed to vary it")
        for n in s.lora_batches:
            for a in counts:
                if a > n:
                    continue
                self._progress(f"LoRA overhead N={n} A={a}")
                shot, out = self._batch([self.info.adapters[i % a] for i in range(n)], p,
                                        f"LoRA overhead N={n} A={a}")
                self.rows["est_latency_overhead.csv"].append(self._lora_row(shot, n, a, p, "overhead_small", out))

    def prefill(self) -> None:
        s = self.s
        models = [(self.info.adapters[0], "prefill_lora")]
        if self.base_ok:
            models.insert(0, (self.info.base_model, "prefill"))
        for model, experiment in models:
            for tokens in sorted({self._cap_prompt(t, 2) for t in s.prefill_tokens}):
                self._progress(f"prefill P={tokens} ({model})")
                ttft = []
                for _ in range(s.repeats):  # one at a time: each TTFT is one prefill step on an idle server
                    shot = self.probe.shot([(0.0, model, tokens, 2)])
                    self._check(shot, f"prefill P={tokens}")
                    value, source = shot.ttft_one()
                    ttft.append(value)
                self.rows["est_default_latency.csv"].append({
                    "model": self.model, "experiment": experiment, "set_input_length": tokens,
                    "set_output_length": 2, "status": "ok", "num_prompts": len(ttft), "completed": len(ttft),
                    "total_input_tokens": tokens * len(ttft), "total_output_tokens": 2 * len(ttft),
                    "mean_ttft_ms": _mean(ttft), "median_ttft_ms": _median(ttft), "min_ttft_ms": min(ttft),
                    "request_rate": "sequential",
                    "dataset": "random-token-ids", "path": self.info.url,
                    "adapter": model if experiment == "prefill_lora" else "", "ttft_source": source})

    def loading(self) -> None:
        """TTFT of requests that force an adapter load minus TTFT of requests that find theirs resident."""
        g = self.max_loras
        names = self.info.adapters
        if len(names) < g + 1:
            self.notes.append(f"loading: needs more adapters ({len(names)}) than --max-loras ({g}); skipped")
            return
        cycle = names[:g + 1]
        # a load is a few ms on a TTFT whose noise only adds: many tries
        reps = max(2, self.s.loading_repeats or 2 * self.s.repeats)
        by_rank: dict[int, list[float]] = {}
        same: list[float] = []
        self._progress(f"loading: cycling {len(cycle)} adapters over {g} slots")
        for a in cycle:  # on the server's CPU side first
            self._check(self.probe.shot([(0.0, a, 8, 2)]), "loading warm-up")
        for _ in range(reps):
            for a in cycle:
                shot = self.probe.shot([(0.0, a, 8, 2)])
                self._check(shot, "loading (cycle)")
                by_rank.setdefault(self.info.adapter_ranks[a], []).append(shot.ttft_one()[0])
        hot = cycle[-1]
        for _ in range(reps * 2):
            shot = self.probe.shot([(0.0, hot, 8, 2)])
            self._check(shot, "loading (resident)")
            value, source = shot.ttft_one()
            same.append(value)
        base = min(same)  # the overhead of a client and HTTP only adds: the fastest answer is the cleanest
        for rank, ttfts in sorted(by_rank.items()):
            load = min(ttfts) - base
            self.rows["est_loading_time.csv"].append({
                "model": self.model, "adapter_rank": rank, "max_lora_rank": self.max_lora_rank, "max_loras": g,
                "max_cpu_loras": len(names), "path": self.info.url, "status": "ok", "num_prompts": len(ttfts),
                "n_disk_loads": 0, "n_mem_loads": len(ttfts), "mean_activation_time_ms": load, "constant_ms": load,
                "ttft_cycle_ms": min(ttfts), "ttft_same_ms": base, "ttft_source": source})

    def scheduler(self) -> None:
        """Step time while W requests wait that vLLM's scheduler scans and skips every step (their adapters are
        not in a batch that already holds max_loras adapters), against W.

        Holders (one request per adapter, max_loras adapters) take the slots; W requests of other adapters are
        sent and, once ``/metrics`` shows them all waiting, one probe request of a holder's adapter (which the
        scheduler admits past the skipped ones) runs L tokens. y = the mean gap the server's
        ``vllm:inter_token_latency_seconds`` gained while it ran (no client timing in it), x = W (the waiting
        gauge, checked at both ends). The holders outlive the probe, so no slot frees and nothing else is admitted
        in between, and every step measured runs the same max_loras + 1 requests. A server without the histogram
        falls back to the probe's token times."""
        g, names = self.max_loras, self.info.adapters
        if len(names) < g + 1:
            self.notes.append("scheduler: needs more adapters than --max-loras to keep requests waiting; skipped")
            return
        s = self.s
        out = self._cap_prompt(s.output_tokens * (1 if s.quick else 2), s.prompt_tokens)
        base_itl = math.nan
        for w in sorted(set(s.waiting) | {0}):
            # steps the holders run beyond the probe: starting, sending W requests and seeing them queued takes
            # wall time (SEND_S per request, generous), i.e. more steps on a faster server
            step_s = base_itl * 1e-3 if base_itl == base_itl else 0.02
            margin = max(32, math.ceil((HOLD_S + w * SEND_S) * self.info.speedup / step_s))
            for attempt in range(3):
                self._progress(f"scheduler: {g} holders + 1 probe, {w} waiting")
                hold = self._cap_prompt(out + margin, s.prompt_tokens)
                st = self.probe.staged_shot([(names[i], s.prompt_tokens, hold) for i in range(g)],
                                            [(names[g + (i % (len(names) - g))], s.prompt_tokens, 1)
                                             for i in range(w)],
                                            [(names[0], s.prompt_tokens, out)], self.s.request_timeout_s)
                self._check(st.shot, f"scheduler W={w}")
                # W queued when the probe started and still when it ended, the holders still running at the end
                steady = st.waiting_a >= w and st.waiting_b >= w and st.running_b >= g
                if steady or attempt == 2:
                    break
                margin *= 3  # the holders ended (or the W were not all queued) before the probe was done
                log.warning("scheduler W=%d: %g waiting when the probe started, %g (and %g running) when it ended; "
                            "again with holders %d steps longer than the probe", w, st.waiting_a, st.waiting_b,
                            st.running_b, margin)
            row = self._scheduler_row(st, w, out)
            if not steady:  # kept in the CSV, left out of the fit
                row["status"] = "failed:waiting_not_steady"
                self.notes.append(f"scheduler W={w}: the waiting queue was not {w} throughout the probe, or the "
                                  f"holders ended first ({st.waiting_a:g} waiting at its start, {st.waiting_b:g} "
                                  f"waiting and {st.running_b:g} running at its end); row not fitted")
            if w == 0:
                base_itl = row["mean_itl_ms"]
            row["baseline_itl_ms"] = base_itl
            self.rows["est_scheduler_overhead.csv"].append(row)

    def _scheduler_row(self, st: "Staged", w: int, out: int) -> dict:
        row = {"source": "profile_vllm", "gpu_loras": self.max_loras, "cpu_loras": len(self.info.adapters),
               "cpu_gpu_diff": len(self.info.adapters) - self.max_loras, "rank": self.max_lora_rank,
               "rate": "burst", "completed_requests": len(st.shot.ok), "avg_batch_size": self.max_loras + 1,  # holders + the probe
               "avg_waiting_queue": (st.waiting_a + st.waiting_b) / 2, "duration": st.span_s,
               "mean_loras_by_batch": self.max_loras,
               "set_waiting": w, "output_tokens": out, "waiting_at_start": st.waiting_a,
               "waiting_at_end": st.waiting_b, "waiting_sampled": st.waiting_mean, "status": "ok"}
        if st.itl[1] > 0:
            row.update(mean_itl_ms=st.itl[0] / st.itl[1] * 1e3, steps=st.itl[1], itl_source="server histogram")
        else:
            gaps = Shot(st.batch, [], st.shot.wall_s, st.shot.speedup).itl(out)
            row.update(mean_itl_ms=_mean(gaps), itl_source="client window")
            self.notes.append(f"scheduler W={w}: the server has no {HISTOGRAMS[0]} histogram; ITL read from the "
                              "client's token times (noisy, see docs/profiler.md)")
        return row

    def kv_here(self, info: ServerInfo, max_loras: int, max_lora_rank: int, log_tokens: int | None = None,
                status: str = "ok") -> None:
        tokens, source = info.kv_tokens, "vllm:cache_config_info"
        if tokens is None and log_tokens is not None:
            tokens, source = log_tokens, "start-up log"
        if tokens is None and status == "ok":
            status = "failed:no_kv_figure"
        self.rows["est_kv_capacity.csv"].append({
            "model": self.model, "max_loras": max_loras, "max_lora_rank": max_lora_rank, "path": info.url,
            "kv_cache_tokens": tokens if status == "ok" else "", "status": status, "source": source})

    def run(self) -> None:
        self.warm()
        steps = {"decode": self.decode, "lora": self.lora, "prefill": self.prefill, "loading": self.loading,
                 "scheduler": self.scheduler}
        try:
            for name in EXPERIMENTS:
                if name in steps and name in self.s.experiments:
                    steps[name]()
        finally:
            self.probe.close()
        if "kv" in self.s.experiments:
            self.kv_here(self.info, self.max_loras, self.max_lora_rank)


def kv_max_lora(url: str) -> int | None:
    import httpx

    from adaptwin.profiler.vllm_profile_server import kv_from_metrics

    return kv_from_metrics(httpx.get(url + "/metrics", timeout=30).text)[2]


# ----------------------------------------------------------------------------------------------------------
# output
def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_csvs(rows: dict[str, list[dict]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, cols in CSV_COLUMNS.items():
        if not rows.get(name):
            continue
        path = out / name
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for r in rows[name]:
                w.writerow([_cell(r.get(c)) for c in cols])
        written.append(path)
    return written


def run_profile(settings: ProfileSettings, progress: Callable[[str], None] | None = None) -> dict:
    """Run every experiment; write the CSVs and ``profile_vllm.json`` into ``settings.out``; return the summary."""
    t0 = time.perf_counter()
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    launched: Launched | None = None
    try:
        if settings.url:
            info = discover(settings.url, speedup=settings.speedup, ranks=settings.ranks, api_key=settings.api_key,
                            timeout_s=settings.ready_timeout_s)
        elif settings.launch:
            g, r = settings.max_loras or 1, settings.max_lora_rank or max(settings.ranks or [8])
            if progress:
                progress(f"launching the server (max_loras {g}, max_lora_rank {r})")
            launched = Launched(settings.launch, g, r, out / "logs" / "main.log", settings.ready_timeout_s).start()
            info = discover(launched.url, speedup=settings.speedup, ranks=settings.ranks, api_key=settings.api_key)
            settings.max_loras, settings.max_lora_rank = g, r
        else:
            raise ServerError("give --url URL (a running server) or --launch -- COMMAND")
        prof = Profiler(info, settings, progress)
        prof.run()
        if launched is not None and prof.rows["est_kv_capacity.csv"] and info.kv_tokens is None:
            prof.rows["est_kv_capacity.csv"].clear()
            prof.kv_here(info, prof.max_loras, prof.max_lora_rank, launched.kv_tokens_from_log())
    finally:
        if launched is not None:
            launched.stop()
    if settings.launch:
        _launch_experiments(prof, settings, out, progress)
    elif settings.kv_grid or settings.loading_ranks:
        prof.notes.append("--kv-grid / --loading-ranks need --launch (one server start-up per configuration)")
    files = write_csvs(prof.rows, out)
    meta = {"schema": 1, "written_by": "adaptwin profile vllm", "model": prof.model, "server": info.to_json(),
            "max_loras": prof.max_loras, "max_lora_rank": prof.max_lora_rank, "base_model_served": prof.base_ok,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(settings).items()
                         if k != "api_key"},
            "notes": prof.notes, "wall_s": time.perf_counter() - t0,
            "files": [p.name for p in files]}
    (out / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return {"out": str(out), "model": prof.model, "files": meta["files"], "rows": {k: len(v) for k, v in
            prof.rows.items() if v}, "notes": prof.notes, "wall_s": round(meta["wall_s"], 2),
            "speedup": info.speedup, "twin": info.is_twin}


def _launch_experiments(prof: Profiler, s: ProfileSettings, out: Path, progress) -> None:
    """KV capacity per (max_loras, max_lora_rank) and loading time per max_lora_rank: one start-up each."""
    say = progress or (lambda m: None)
    for g, r in s.kv_grid:
        say(f"KV capacity: starting the server with max_loras {g}, max_lora_rank {r}")
        launched = Launched(s.launch, g, r, out / "logs" / f"kv_{g}_{r}.log", s.ready_timeout_s)
        try:
            launched.start()
            info = discover(launched.url, speedup=s.speedup, ranks=s.ranks, api_key=s.api_key)
            prof.kv_here(info, g, r, launched.kv_tokens_from_log())
        except ServerError as err:
            log.warning("KV capacity (%d, %d): %s", g, r, str(err).splitlines()[0])
            prof.rows["est_kv_capacity.csv"].append({"model": prof.model, "max_loras": g, "max_lora_rank": r,
                                                     "status": "failed:start-up", "source": "launch"})
        finally:
            launched.stop()
    for r in s.loading_ranks:
        say(f"loading time: starting the server with max_loras 1, max_lora_rank {r}")
        launched = Launched(s.launch, 1, r, out / "logs" / f"loading_{r}.log", s.ready_timeout_s)
        try:
            launched.start()
            info = discover(launched.url, speedup=s.speedup, ranks=s.ranks, api_key=s.api_key)
            # only adapters this max rank can hold
            info.adapters = [a for a in info.adapters if info.adapter_ranks[a] <= r]
            sub = Profiler(info, ProfileSettings(**{**asdict(s), "max_loras": 1, "max_lora_rank": r}), progress)
            sub.model = prof.model
            sub.max_loras, sub.max_lora_rank = 1, r
            try:
                sub.loading()
            finally:
                sub.probe.close()
            prof.rows["est_loading_time.csv"] = [row for row in prof.rows["est_loading_time.csv"]
                                                 if row["max_lora_rank"] != r] + sub.rows["est_loading_time.csv"]
            prof.notes += [n for n in sub.notes if n not in prof.notes]
        except ServerError as err:
            log.warning("loading time at max_lora_rank %d: %s", r, str(err).splitlines()[0])
            prof.notes.append(f"loading time at max_lora_rank {r}: {str(err).splitlines()[0]}")
        finally:
            launched.stop()
