"""The ``vllm`` backend: a real vLLM server (or ``adaptwin twin serve``) over its OpenAI-compatible HTTP API.

Open loop: each request leaves at its own trace time, scaled to wall time (``ts / speedup`` after :meth:`start`),
whatever the server does. It is a streamed ``/v1/completions`` with the adapter as the model, a prompt of exactly
``prompt_tokens`` token ids (random ids from ``token_ids``, so vLLM's prefix cache does not turn repeated prompts
into free prefills), ``max_tokens`` = the request's output tokens and ``ignore_eos``. TTFT, ITL and end-to-end come
from the stream (``stream_options.continuous_usage_stats`` gives the exact token count of each event, otherwise
each event counts as one token), converted to trace milliseconds (wall × speedup) and measured from the moment the
request was sent (vLLM's benchmark does the same) to when each event's bytes reached this host (the kernel's receive
time on plain HTTP, :mod:`adaptwin.replay.netstamp`); how late requests left — the client's own backlog — is
reported by :meth:`VllmBackend.stats`, never folded in silently.

Failures never stop a replay: a 4xx/5xx, a timeout, a refused or reset connection comes back as a failed
:class:`~adaptwin.replay.backends.base.Completion` with the reason. Failures before the first token (connect
errors, 408/429/5xx, resets) are retried ``retries`` times with exponential back-off; a failure after tokens
arrived is not (the tokens were served). At most ``max_in_flight`` requests are open; due requests beyond that wait
in a backlog whose size and wait are in :meth:`stats` and in warnings.

``/metrics`` is scraped every ``scrape_interval_s`` (running, waiting, ``vllm:kv_cache_usage_perc``,
``vllm:lora_requests_info``) with :mod:`adaptwin.replay.backends.promtext`. Adapters ``lora-0 …`` that the server
does not list are registered through ``/v1/load_lora_adapter`` at start (vLLM needs
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=1`` for that; otherwise start it with ``--lora-modules``).

The API key comes from ``api_key`` or the environment: ``ADAPTWIN_VLLM_API_KEY``, ``VLLM_API_KEY``,
``ADAPTWIN_API_KEY``, ``VLLM_API_KEY``, ``OPENAI_API_KEY`` (first set wins).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import math
import os
import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import httpx

from adaptwin.replay.aio import new_event_loop
from adaptwin.replay.backends.base import Completion, Gauges, ReplayRequest, ServingConfig
from adaptwin.replay.backends.promtext import PromParseError, parse
from adaptwin.replay.netstamp import open_stamped_connection

__all__ = ["VllmBackend", "VllmBackendError", "api_key_from_env", "gauges_from_metrics"]

log = logging.getLogger("adaptwin.replay.backends.vllm")

API_KEY_ENV = ("ADAPTWIN_VLLM_API_KEY", "ADAPTWIN_API_KEY", "VLLM_API_KEY", "OPENAI_API_KEY")
RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
POOL_SIZE = 1 << 18  # random token ids prompts are cut from (longer prompts repeat it)


class VllmBackendError(RuntimeError):
    """The server cannot be used for this replay (unreachable, adapters cannot be registered …)."""


def api_key_from_env() -> str | None:
    for name in API_KEY_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return None


@dataclass
class _Progress:
    """What the stream of one request has shown so far (wall times, perf_counter)."""

    sent: float | None = None
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    finish_reason: str | None = None
    done: bool = False


@dataclass(frozen=True)
class _Outcome:
    error: str | None = None
    retryable: bool = False


def _error_message(raw: bytes) -> str:
    """The message of vLLM's error JSON (new ``{"error": {...}}`` and old ``{"message": ...}`` forms)."""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw[:200].decode("utf-8", "replace").strip()
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])[:300]
        if "message" in obj:
            return str(obj["message"])[:300]
        if "detail" in obj:
            return str(obj["detail"])[:300]
    return str(obj)[:200]


def gauges_from_metrics(text: str, previous_running: frozenset = frozenset(), loads_so_far: int = 0) -> dict:
    """Read vLLM's gauges from a ``/metrics`` page.

    Running/waiting add up over engines; KV usage is their mean (``vllm:kv_cache_usage_perc``, or the legacy
    ``vllm:gpu_cache_usage_perc``). ``vllm:lora_requests_info`` is one series per label set that vLLM never removes:
    the series with the largest value (the newest update time) is the current state. Adapter loads: the twin's
    ``adaptwin:adapter_loads_total`` when served, otherwise an estimate (adapters that joined the running set since
    the previous scrape; a lower bound).
    """
    fams = parse(text)
    by_name: dict[str, list] = {}
    for fam in fams.values():
        for s in fam.samples:
            by_name.setdefault(s.name, []).append(s)

    def values(name: str) -> list[float]:
        return [s.value for s in by_name.get(name, ())]

    running, waiting = values("vllm:num_requests_running"), values("vllm:num_requests_waiting")
    kv = values("vllm:kv_cache_usage_perc") or values("vllm:gpu_cache_usage_perc")
    out = {"running": float(sum(running)), "waiting": float(sum(waiting)),
           "kv_usage": float(sum(kv) / len(kv)) if kv else math.nan,
           "lora_running": [], "lora_waiting": [], "max_lora": None, "has_vllm_metrics": bool(running or waiting)}
    info = by_name.get("vllm:lora_requests_info")
    if info:
        best = max(info, key=lambda s: s.value)
        split = (lambda v: [x for x in v.split(",") if x])
        out["lora_running"] = split(best.labels.get("running_lora_adapters", ""))
        out["lora_waiting"] = split(best.labels.get("waiting_lora_adapters", ""))
        ml = best.labels.get("max_lora")
        out["max_lora"] = int(ml) if ml and ml.isdigit() else None
    loads = values("adaptwin:adapter_loads_total")
    if loads:
        out["adapter_loads"] = int(sum(loads))
        out["adapter_loads_estimated"] = False
    else:
        new = set(out["lora_running"]) - set(previous_running)
        out["adapter_loads"] = loads_so_far + len(new)
        out["adapter_loads_estimated"] = True
    return out


class _Pool:
    """Kept-alive HTTP/1.1 connections to one server (the completions path is hand-written on asyncio streams:
    httpx costs several times more CPU per streamed request, which capped the client near 250 requests/s)."""

    def __init__(self, host: str, port: int, ssl, connect_timeout_s: float):
        self.host, self.port, self.ssl, self.connect_timeout_s = host, port, ssl, connect_timeout_s
        self.idle: list = []

    async def get(self, fresh: bool = False):
        while self.idle and not fresh:
            conn = self.idle.pop()
            if not conn[1].is_closing() and not conn[0].at_eof():
                return conn, True
            conn[1].close()
        async with asyncio.timeout(self.connect_timeout_s):  # tokens get the time their bytes reached this host
            return await open_stamped_connection(self.host, self.port, limit=1 << 20, ssl=self.ssl), False

    def put(self, conn, headers: dict) -> None:
        if headers.get("connection", "").lower() == "close" or conn[1].is_closing():
            conn[1].close()
        else:
            self.idle.append(conn)

    def close(self) -> None:
        for _, w in self.idle:
            w.close()
        self.idle.clear()


async def _read_headers(reader: asyncio.StreamReader) -> dict:
    headers = {}
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionResetError("connection closed inside the response headers")
        if line in (b"\r\n", b"\n"):
            return headers
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()


async def _iter_chunks(reader: asyncio.StreamReader, headers: dict):
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"x", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:  # body until the server closes
        while True:
            data = await reader.read(65536)
            if not data:
                return
            yield data


async def _read_body(reader: asyncio.StreamReader, headers: dict, limit: int) -> bytes:
    out = b""
    async for data in _iter_chunks(reader, headers):
        if len(out) < limit:
            out += data[: limit - len(out)]
    return out


async def _iter_lines(reader: asyncio.StreamReader, headers: dict):
    buf = b""
    async for data in _iter_chunks(reader, headers):
        buf += data
        if b"\n" in buf:
            *lines, buf = buf.split(b"\n")
            for line in lines:
                yield line.rstrip(b"\r")
    if buf:
        yield buf.rstrip(b"\r")


class VllmBackend:
    """Replays requests against a vLLM server (see the module docstring).

    ``speedup`` scales trace time to wall time (10: a trace hour takes six minutes) and the measured wall
    latencies back to trace milliseconds; use the same value ``twin serve --speedup`` runs with, and 1 against a
    real vLLM.
    """

    name = "vllm"

    def __init__(self, url: str, speedup: float = 1.0, api_key: str | None = None, max_in_flight: int = 512,
                 timeout_s: float = 600.0, retries: int = 2, *, connect_timeout_s: float = 10.0,
                 retry_backoff_s: float = 0.05, scrape_interval_s: float = 2.0, register_adapters: bool = True,
                 lora_path_template: str = "{name}", token_ids: tuple[int, int] = (100, 500), seed: int = 0,
                 ignore_eos: bool = True, latency_origin: str = "send", ready_timeout_s: float = 30.0):
        if not (math.isfinite(speedup) and speedup > 0):
            raise ValueError(f"speedup must be a positive number, got {speedup}")
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if latency_origin not in ("send", "arrival"):
            raise ValueError("latency_origin must be 'send' (when the request left) or 'arrival' (its trace time)")
        lo, hi = token_ids
        if not (0 <= lo < hi):
            raise ValueError(f"token_ids must be a range lo < hi of token ids, got {token_ids}")
        self.url = url.rstrip("/")
        self.speedup = float(speedup)
        self.api_key = api_key if api_key is not None else api_key_from_env()
        self.max_in_flight, self.timeout_s, self.retries = int(max_in_flight), float(timeout_s), int(retries)
        self.connect_timeout_s, self.retry_backoff_s = float(connect_timeout_s), float(retry_backoff_s)
        self.scrape_interval_s = float(scrape_interval_s)
        self.register_adapters, self.lora_path_template = register_adapters, lora_path_template
        self.ignore_eos, self.latency_origin = ignore_eos, latency_origin
        self.ready_timeout_s = float(ready_timeout_s)
        rnd = random.Random(seed)
        self._token_pool = [rnd.randrange(lo, hi) for _ in range(POOL_SIZE)]
        self._rnd = rnd
        self.config: ServingConfig | None = None
        self.model_ids: list[str] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._done: deque[Completion] = deque()
        self._pending: list = []  # heap (ts, seq, request): submitted, not yet due
        self._seq = itertools.count()
        self._backlog: deque = deque()  # (request, due wall time): due, waiting for an in-flight slot
        self._inflight: dict[str, tuple[asyncio.Task, ReplayRequest, _Progress]] = {}
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task] = []
        self._pool: _Pool | None = None
        self._hostport = self._prefix = self._auth = ""
        self._control: httpx.AsyncClient | None = None
        self._gauges = Gauges(0.0, 0.0, 0.0, 0)
        self.last_scrape: dict | None = None
        self.scrapes: deque = deque(maxlen=100_000)
        self._closed = False
        # counters (written on the loop thread only)
        self.n_submitted = self.n_sent = self.n_finished = self.n_failed = self.n_retries = 0
        self.max_backlog = 0
        self.scrape_ok = self.scrape_errors = 0
        self._lag_sum = 0.0
        self._lag_max = 0.0
        self._lag_n = 0
        self._last_backlog_warning = 0.0

    # ------------------------------------------------------------------------------------------------------
    # the Backend protocol (called from the replay engine's thread)
    def start(self, config: ServingConfig) -> None:
        if self._thread is not None:
            raise VllmBackendError("this backend was already started; make a new one per run")
        self.config = config
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-backend", daemon=True)
        self._thread.start()
        try:
            self._call(self._astart(config), timeout=self.ready_timeout_s + 60 + 2 * config.served)
        except BaseException:
            self._stop_loop()
            raise

    def submit(self, requests: Sequence[ReplayRequest]) -> None:
        reqs = list(requests)
        if reqs:
            self._loop.call_soon_threadsafe(self._enqueue, reqs)

    def advance(self, until_ts: float) -> list[Completion]:
        self._sleep_until(until_ts)
        return self._drain()

    def gauges(self) -> Gauges:
        return self._gauges

    def finish(self, end_ts: float) -> list[Completion]:
        self._sleep_until(end_ts)
        if self._loop is not None and not self._closed:
            self._call(self._ashutdown(), timeout=60)
            self._stop_loop()
        return self._drain()

    def close(self) -> None:
        """Stop without waiting (anything open is cancelled and comes back from the next :meth:`finish`)."""
        if self._loop is not None and not self._closed:
            self._call(self._ashutdown(), timeout=60)
            self._stop_loop()

    def stats(self) -> dict:
        """Client-side view: what was sent, failed, retried, and how late requests left (the backlog)."""
        return {"submitted": self.n_submitted, "sent": self.n_sent, "finished": self.n_finished,
                "failed": self.n_failed, "retries": self.n_retries, "in_flight": len(self._inflight),
                "backlog": len(self._backlog), "max_backlog": self.max_backlog, "max_in_flight": self.max_in_flight,
                "send_lag_ms_mean": (self._lag_sum / self._lag_n * 1e3) if self._lag_n else 0.0,
                "send_lag_ms_max": self._lag_max * 1e3, "scrapes_ok": self.scrape_ok,
                "scrape_errors": self.scrape_errors}

    # ------------------------------------------------------------------------------------------------------
    # plumbing between the caller's thread and the loop
    def _call(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _stop_loop(self) -> None:
        self._closed = True
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def _trace_now(self) -> float:
        return (time.perf_counter() - self._t0) * self.speedup

    def _sleep_until(self, ts: float) -> None:
        if self._t0 == 0.0:
            raise VllmBackendError("call start() before advance()/finish()")
        delay = self._t0 + ts / self.speedup - time.perf_counter()
        if delay > 0:
            time.sleep(delay)

    def _drain(self) -> list[Completion]:
        out = []
        while self._done:
            out.append(self._done.popleft())
        return out

    # ------------------------------------------------------------------------------------------------------
    # start-up: the server answers, adapters are registered, metrics are readable
    async def _astart(self, config: ServingConfig) -> None:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        u = httpx.URL(self.url)
        ssl_ctx = None
        if u.scheme == "https":
            import ssl

            ssl_ctx = ssl.create_default_context()
        self._pool = _Pool(u.host, u.port or (443 if ssl_ctx else 80), ssl_ctx, self.connect_timeout_s)
        self._hostport = u.netloc.decode()
        self._prefix = u.path.rstrip("/")
        self._auth = f"authorization: Bearer {self.api_key}\r\n" if self.api_key else ""
        self._control = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=httpx.Timeout(
            30.0, connect=self.connect_timeout_s), limits=httpx.Limits(max_connections=4))
        self._wake = asyncio.Event()
        self.model_ids = await self._models()
        if config.model not in self.model_ids:
            log.warning("the server lists no base model %r (it lists %s); replaying anyway", config.model,
                        self.model_ids[:3])
        missing = [f"lora-{k}" for k in range(config.served) if f"lora-{k}" not in self.model_ids]
        if missing:
            if not self.register_adapters:
                raise VllmBackendError(f"the server does not serve {len(missing)} of the {config.served} adapters "
                                       f"(first: {missing[0]}); start it with --lora-modules or allow registration")
            await self._register(missing)
        await self._scrape_once()
        self._t0 = time.perf_counter()
        self._tasks = [asyncio.create_task(self._dispatch(), name="dispatch"),
                       asyncio.create_task(self._scrape_loop(), name="scrape")]

    async def _models(self) -> list[str]:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            try:
                r = await self._control.get("/v1/models")
                if r.status_code == 200:
                    return [m["id"] for m in r.json().get("data", [])]
                err = f"http {r.status_code}: {_error_message(r.content)}"
                if r.status_code in (401, 403):
                    raise VllmBackendError(f"{self.url}/v1/models: {err}; set the API key "
                                           f"({' or '.join(API_KEY_ENV)})")
            except httpx.HTTPError as exc:
                err = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise VllmBackendError(f"{self.url} did not answer /v1/models within {self.ready_timeout_s:g} s "
                                       f"({err}); is the server up?")
            await asyncio.sleep(0.5)

    async def _register(self, names: list[str]) -> None:
        for name in names:
            k = int(name.split("-")[1])
            ranks = self.config.adapter_ranks if self.config is not None else ()
            path = self.lora_path_template.format(name=name, k=k, rank=ranks[k] if k < len(ranks) else "")
            r = await self._control.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
            if r.status_code in (404, 405):
                raise VllmBackendError(f"the server does not serve {name} and does not allow runtime LoRA loading "
                                       f"({r.status_code} on /v1/load_lora_adapter): start vLLM with "
                                       "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, or register the adapters with "
                                       "--lora-modules")
            if r.status_code != 200 and "already been loaded" not in r.text:
                raise VllmBackendError(f"registering {name} (lora_path={path!r}) failed: http {r.status_code}: "
                                       f"{_error_message(r.content)}")
        log.info("registered %d adapters through /v1/load_lora_adapter", len(names))

    # ------------------------------------------------------------------------------------------------------
    # open-loop dispatch
    def _enqueue(self, reqs: list[ReplayRequest]) -> None:
        for r in reqs:
            heapq.heappush(self._pending, (r.ts, next(self._seq), r))
        self.n_submitted += len(reqs)
        self._wake.set()

    async def _dispatch(self) -> None:
        pending, backlog = self._pending, self._backlog
        while True:
            now = time.perf_counter()
            now_ts = (now - self._t0) * self.speedup
            while pending and pending[0][0] <= now_ts:
                r = heapq.heappop(pending)[2]
                backlog.append((r, self._t0 + r.ts / self.speedup))
            while backlog and len(self._inflight) < self.max_in_flight:
                r, due = backlog.popleft()
                self._launch(r, due)
            if len(backlog) > self.max_backlog:
                self.max_backlog = len(backlog)
            if backlog and now - self._last_backlog_warning > 5.0:
                self._last_backlog_warning = now
                log.warning("client backlog: %d due requests wait for one of %d in-flight slots (oldest %.2f s "
                            "late)", len(backlog), self.max_in_flight, now - backlog[0][1])
            timeout = None
            if pending and not backlog:
                timeout = max(0.0, (pending[0][0] - now_ts) / self.speedup)
            self._wake.clear()
            if timeout == 0.0:
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def _launch(self, r: ReplayRequest, due: float) -> None:
        prog = _Progress()
        task = asyncio.get_running_loop().create_task(self._run_one(r, due, prog))
        self._inflight[r.request_id] = (task, r, prog)

    async def _run_one(self, r: ReplayRequest, due: float, prog: _Progress) -> None:
        outcome = _Outcome("not sent")
        try:
            attempt = 0
            while True:
                try:
                    outcome = await self._attempt(r, prog, due)
                except Exception as exc:  # a client bug must not lose the request
                    log.exception("request %s: unexpected client error", r.request_id)
                    outcome = _Outcome(f"client error: {type(exc).__name__}: {exc}")
                if outcome.error is None or not outcome.retryable or prog.tokens or attempt >= self.retries:
                    break
                attempt += 1
                self.n_retries += 1
                await asyncio.sleep(min(2.0, self.retry_backoff_s * 2 ** (attempt - 1)))
        except asyncio.CancelledError:
            self._done.append(self._completion(r, prog, due, unfinished=True))
            raise
        finally:
            self._inflight.pop(r.request_id, None)
            if self._backlog:
                self._wake.set()
        c = self._completion(r, prog, due, error=outcome.error)
        if c.finished:
            self.n_finished += 1
        else:
            self.n_failed += 1
        self._done.append(c)

    def _completion(self, r: ReplayRequest, prog: _Progress, due: float, error: str | None = None,
                    unfinished: bool = False) -> Completion:
        origin = prog.sent if (self.latency_origin == "send" and prog.sent is not None) else due
        scale = self.speedup * 1e3
        ttft = (prog.first - origin) * scale if prog.first is not None else None
        itl = ((prog.last - prog.first) / (prog.tokens - 1) * scale
               if prog.first is not None and prog.tokens > 1 else None)
        finished = False
        if not unfinished and error is None:
            if prog.done and prog.tokens >= r.output_tokens:
                finished = True
            elif prog.done:
                error = (f"short output: {prog.tokens} of {r.output_tokens} tokens "
                         f"(finish_reason={prog.finish_reason})")
            else:
                error = f"stream ended without [DONE] after {prog.tokens} tokens"
        e2e = (prog.last - origin) * scale if finished and prog.last is not None else None
        return Completion(r.request_id, finished, ttft, itl, e2e, prog.tokens, 0, error)

    def _body(self, r: ReplayRequest) -> dict:
        n = max(1, int(r.prompt_tokens))
        if n < POOL_SIZE:
            off = self._rnd.randrange(0, POOL_SIZE - n)
            prompt = self._token_pool[off:off + n]
        else:
            prompt = (self._token_pool * (n // POOL_SIZE + 1))[:n]
        body = {"model": r.adapter_id, "prompt": prompt, "max_tokens": int(r.output_tokens), "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body

    async def _attempt(self, r: ReplayRequest, prog: _Progress, due: float) -> _Outcome:
        body = json.dumps(self._body(r), separators=(",", ":")).encode()
        request = (f"POST {self._prefix}/v1/completions HTTP/1.1\r\nhost: {self._hostport}\r\n"
                   f"content-type: application/json\r\naccept: text/event-stream\r\n{self._auth}"
                   f"x-request-id: {r.request_id}\r\ncontent-length: {len(body)}\r\n\r\n").encode() + body
        if prog.sent is None:  # latencies start when the request is first ready to leave (connection set-up counts)
            prog.sent = now = time.perf_counter()
            self.n_sent += 1
            lag = max(0.0, now - due)
            self._lag_sum += lag
            self._lag_n += 1
            self._lag_max = max(self._lag_max, lag)
        conn = None
        try:
            async with asyncio.timeout(self.timeout_s):
                for fresh in (False, True):  # a kept-alive connection the server closed meanwhile: once more, fresh
                    try:
                        conn, reused = await self._pool.get(fresh)
                    except (OSError, asyncio.TimeoutError) as exc:
                        return _Outcome(f"connect error: {type(exc).__name__}: {exc}", True)
                    conn[1].write(request)
                    status_line = await conn[0].readline()
                    if status_line or not reused:
                        break
                    conn[1].close()
                if not status_line:
                    raise ConnectionResetError("server closed the connection before answering")
                status = int(status_line.split(b" ", 2)[1])
                headers = await _read_headers(conn[0])
                if status != 200:
                    raw = await _read_body(conn[0], headers, limit=4096)
                    self._pool.put(conn, headers)
                    conn = None
                    return _Outcome(f"http {status}: {_error_message(raw)}", status in RETRY_STATUS)
                error = None
                async for line in _iter_lines(conn[0], headers):
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        prog.done = True
                        continue
                    t = conn[0].arrived
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        error = f"bad SSE event after {prog.tokens} tokens: {data[:80]!r}"
                        break
                    if "error" in obj:
                        err = obj["error"]
                        msg = err.get("message") if isinstance(err, dict) else err
                        error = f"error event after {prog.tokens} tokens: {msg}"
                        break
                    usage = obj.get("usage")
                    choices = obj.get("choices")
                    if choices:
                        if usage and isinstance(usage.get("completion_tokens"), int):
                            n = usage["completion_tokens"]
                        else:  # one token per event, except an empty closing event that only carries the reason
                            n = prog.tokens + (1 if (choices[0].get("text") or choices[0].get("finish_reason")
                                                     is None) else 0)
                        if n > prog.tokens:
                            if prog.first is None:
                                prog.first = t
                            prog.last = t
                            prog.tokens = n
                        if choices[0].get("finish_reason"):
                            prog.finish_reason = choices[0]["finish_reason"]
                    elif usage and isinstance(usage.get("completion_tokens"), int):
                        prog.tokens = max(prog.tokens, usage["completion_tokens"])
                if error is None:
                    self._pool.put(conn, headers)
                    conn = None
                return _Outcome(error)
        except TimeoutError:
            return _Outcome(f"timeout after {self.timeout_s:g} s ({prog.tokens} tokens received)")
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            return _Outcome(f"connection reset after {prog.tokens} tokens: {type(exc).__name__}: {exc}", True)
        finally:
            if conn is not None:
                conn[1].close()

    # ------------------------------------------------------------------------------------------------------
    # metrics
    async def _scrape_loop(self) -> None:
        while True:
            await asyncio.sleep(self.scrape_interval_s)
            await self._scrape_once()

    async def _scrape_once(self) -> None:
        try:
            r = await self._control.get("/metrics")
            r.raise_for_status()
            prev = self.last_scrape or {}
            g = gauges_from_metrics(r.text, frozenset(prev.get("lora_running", ())), prev.get("adapter_loads", 0))
        except (httpx.HTTPError, PromParseError) as exc:
            self.scrape_errors += 1
            log.warning("scraping %s/metrics failed: %s", self.url, exc)
            return
        self.scrape_ok += 1
        g["t"] = self._trace_now() if self._t0 else 0.0
        self.last_scrape = g
        self.scrapes.append(g)
        self._gauges = Gauges(g["running"], g["waiting"], 0.0 if math.isnan(g["kv_usage"]) else g["kv_usage"],
                              g["adapter_loads"])

    async def _ashutdown(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, _, r in self._pending:
            self._done.append(Completion(r.request_id, False, None, None, None, 0, 0,
                                         "not sent: due after the end of the replay"))
        self._pending.clear()
        for r, _ in self._backlog:
            self._done.append(Completion(r.request_id, False, None, None, None, 0, 0,
                                         f"not sent: client backlog (max_in_flight={self.max_in_flight})"))
        self._backlog.clear()
        tasks = [t for t, _, _ in self._inflight.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._pool is not None:
            self._pool.close()
        if self._control is not None:
            await self._control.aclose()
