"""``twin serve``: the twin behind vLLM's OpenAI-compatible HTTP API, in scaled real time.

One asyncio event loop owns everything (no locks): the HTTP server (:mod:`.http`) turns each completion request
into one twin arrival at the current twin time ``(wall − start) × speedup``; the driver (:meth:`TwinServer._drive`)
runs the twin :class:`~adaptwin.twin.engine.Engine` one engine step at a time, sleeps until the wall clock reaches
the step's end, then sends every token the step produced — one SSE ``data:`` event per token, as DESIGN.md asks.
When the twin falls behind the wall clock (too much traffic for this machine at this speedup), steps run back to
back until it has caught up, their tokens go out late, and ``adaptwin:twin_lag_seconds`` says by how much.

Request mapping (documented in docs/twin-serve.md):

* ``model`` names an adapter (``lora-k``); unknown names get vLLM's 404 error JSON. The base model is listed by
  ``/v1/models`` but the twin simulates adapter traffic only, so a request to it gets a 400 that says so.
* prompt length: a string counts its whitespace-separated words; a list of token ids counts its ids (a batch
  of one prompt is accepted in both forms). Prompt + ``max_tokens`` above ``max_model_len`` is a 400, as vLLM.
* output length: always ``max_tokens`` (default 16, as vLLM's completions API) — with ``ignore_eos`` as vLLM would,
  and without it too, since the twin has no end-of-sequence model.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from adaptwin.replay.aio import WallTimer, new_event_loop
from adaptwin.replay.serve.config import FaultError, Faults, ServeConfig
from adaptwin.replay.serve.http import HttpServer, Request, Responder
from adaptwin.replay.serve.metrics import VllmMetrics

__all__ = ["TwinServer", "ServerThread"]

log = logging.getLogger("adaptwin.replay.serve")

STALL_MAX_S = 600.0  # a stalled request's connection is reset after this long (wall s)
TOKEN_TEXT = " tok"


def vllm_error(status: int, message: str, type_: str, param: str | None = None) -> dict:
    """vLLM's error body (``ErrorResponse``)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


@dataclass
class _Live:
    """A completion request the twin is working on, and the connection its tokens go to."""

    rid: int
    request_id: str
    model: str
    prompt: int
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    resp: Responder
    created: int
    sent: int = 0
    scheduled: float | None = None  # twin time the request first entered the running batch
    reset_after: int | None = None  # mid-stream fault: reset the connection after this many tokens
    text: list = field(default_factory=list)


class TwinServer:
    """The server. ``await start()`` binds and starts the driver; ``await close()`` stops both.

    Use :class:`ServerThread` to run one in a background thread (tests, benchmarks).
    """

    def __init__(self, config: ServeConfig, profile=None):
        from adaptwin.twin.config import ServerConfig
        from adaptwin.twin.engine import Engine
        from adaptwin.twin.profile import load_profile

        self.config = cfg = config
        prof = profile if profile is not None else load_profile(cfg.model, path=cfg.profile)
        self.server_config = ServerConfig(
            model=cfg.model, served=cfg.max_cpu_loras, max_loras=cfg.max_loras, adapter_ranks=cfg.adapter_ranks(),
            max_lora_rank=cfg.max_lora_rank, max_num_seqs=cfg.max_num_seqs,
            max_num_batched_tokens=cfg.max_num_batched_tokens, max_model_len=cfg.max_model_len,
            client_max_waiting=None)  # a server has no client-side backlog: every request reaches the queue
        self.engine = Engine(self.server_config, prof, window_s=3600.0)
        self.max_model_len = self.engine.max_model_len
        self.metrics = VllmMetrics(cfg.model, cfg.max_loras, self.engine.block_size, self.engine.capacity_blocks)
        self.adapters: dict[str, int] = {}  # adapter name -> twin adapter index
        if cfg.register_at_start:
            self.adapters = {f"lora-{k}": k for k in range(cfg.max_cpu_loras)}
        self.adapter_paths: dict[str, str] = {n: f"/adapters/{n}" for n in self.adapters}
        self.faults = cfg.faults
        self._fault_rng = random.Random(cfg.faults.seed)
        self._forced = deque(cfg.faults.next)
        self._live: dict[int, _Live] = {}
        self._n_added = 0
        self._last_arrival = 0.0
        self._finished_seen = 0
        self.served: deque = deque(maxlen=cfg.served_log)
        self.http = HttpServer(self._handle)
        self._t0 = 0.0
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task | None = None
        self._closing = False
        self.created = int(time.time())
        self._ids = itertools.count()

    # ------------------------------------------------------------------------------------------------------
    # clock
    def sim_now(self) -> float:
        """Twin time now: wall seconds since start × speedup."""
        return (time.perf_counter() - self._t0) * self.config.speedup

    @property
    def port(self) -> int:
        return self.http.port

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.http.port}"

    async def start(self) -> None:
        self._wake = asyncio.Event()
        await self.http.start(self.config.host, self.config.port)
        self._t0 = time.perf_counter()
        self._driver = asyncio.create_task(self._drive(), name="twin-driver")
        log.info("twin serve: %s on %s (%d adapters, max_loras %d, speedup %g)", self.config.model, self.url,
                 self.config.max_cpu_loras, self.config.max_loras, self.config.speedup)

    async def close(self) -> None:
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._driver is not None:
            self._driver.cancel()
            try:
                await self._driver
            except asyncio.CancelledError:
                pass
        await self.http.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ------------------------------------------------------------------------------------------------------
    # the twin in real time
    async def _drive(self) -> None:
        eng, speedup = self.engine, self.config.speedup
        timer = WallTimer()
        try:
            while not self._closing:
                if not self._live:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), timeout=1.0)
                    except TimeoutError:
                        pass
                    continue
                now = self.sim_now()
                before = list(eng.running)
                step_start = eng.time
                eng.advance_until(max(now, eng.time + 1e-9))  # one step when on time, back to back when behind
                # The step's events are built before the wait, so that at its end only the writes are left.
                sends, done = self._collect(before, step_start)
                await timer.sleep_until(self._t0 + eng.time / speedup)
                self.metrics.lag_s = self.sim_now() - eng.time  # < 0: tokens go out a little early
                self._flush(sends)
                await asyncio.sleep(0)  # let requests that came in meanwhile in before the bookkeeping
                for lv in done:
                    self._finish(lv)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("twin driver failed; the server stops serving completions")
            for lv in list(self._live.values()):
                lv.resp.reset()
            self._live.clear()
            raise
        finally:
            timer.close()

    def _collect(self, before: list[int], step_start: float) -> tuple[list[tuple[_Live, list[bytes]]], list[_Live]]:
        """The tokens the last step(s) produced, as the events to send per request, and the requests now done."""
        from adaptwin.twin.engine import FINISHED, RUNNING

        eng, live = self.engine, self._live
        eng.sync()
        touched = set(before)
        touched.update(eng.running)
        if eng.finished_count - self._finished_seen > sum(1 for r in before if eng.status[r] == FINISHED):
            touched.update(live)  # something was admitted and finished within one advance: look at everyone
        self._finished_seen = eng.finished_count
        status, generated = eng.status, eng.generated
        firsts: list[tuple[_Live, list[bytes]]] = []
        sends: list[tuple[_Live, list[bytes]]] = []
        done: list[_Live] = []
        new_tokens = 0
        for rid in touched:
            lv = live.get(rid)
            if lv is None:
                continue
            st = status[rid]
            if lv.scheduled is None and st >= RUNNING:
                lv.scheduled = step_start
                self.metrics.prompt_tokens += lv.prompt
            g = generated[rid]
            if g > lv.sent:
                new_tokens += g - lv.sent
                (firsts if lv.sent == 0 else sends).append((lv, self._events(lv, g)))
            if st == FINISHED:
                done.append(lv)
        self.metrics.generation_tokens += new_tokens
        # A step's tokens all come out at its end. First tokens go first: a first token carries its request's
        # whole TTFT, while a later one moves the mean ITL by 1/(tokens − 1) of the same delay.
        return firsts + sends, done

    @staticmethod
    def _flush(sends: list[tuple[_Live, list[bytes]]]) -> None:
        for lv, parts in sends:
            if parts:
                lv.resp.chunks(parts)
            if lv.reset_after is not None and lv.sent >= lv.reset_after and lv.resp.alive:
                lv.resp.reset()

    def _event(self, lv: _Live, i: int, last: bool) -> bytes:
        usage = "null"
        if lv.continuous_usage:
            usage = f'{{"prompt_tokens":{lv.prompt},"total_tokens":{lv.prompt + i},"completion_tokens":{i}}}'
        fin = '"length"' if last else "null"
        return (f'data: {{"id":"{lv.request_id}","object":"text_completion","created":{lv.created},'
                f'"model":{json.dumps(lv.model)},"choices":[{{"index":0,"text":"{TOKEN_TEXT}","logprobs":null,'
                f'"finish_reason":{fin},"stop_reason":null}}],"usage":{usage}}}\n\n').encode()

    def _events(self, lv: _Live, g: int) -> list[bytes]:
        """The SSE events for tokens ``lv.sent + 1 … g`` (none past a mid-stream fault's cut), and mark them sent."""
        stop = g if lv.reset_after is None else min(g, lv.reset_after)
        parts = [self._event(lv, i, i == lv.max_tokens) for i in range(lv.sent + 1, stop + 1)] if lv.stream else []
        lv.sent = g
        return parts

    def _finish(self, lv: _Live) -> None:
        eng, rid = self.engine, lv.rid
        del self._live[rid]
        arrival, first, last = eng.arrival[rid], eng.first_token[rid], eng.finish_time[rid]
        n = lv.max_tokens
        sched = lv.scheduled if lv.scheduled is not None else arrival
        self.metrics.observe_finished(first - arrival, last - first, n - 1, last - arrival, sched - arrival,
                                      lv.prompt, n)
        self.served.append({"id": lv.request_id, "model": lv.model, "prompt_tokens": lv.prompt, "output_tokens": n,
                            "arrival_s": arrival, "ttft_ms": (first - arrival) * 1e3,
                            "itl_ms": (last - first) / (n - 1) * 1e3 if n > 1 else None,
                            "e2e_ms": (last - arrival) * 1e3, "preemptions": int(eng.preemptions[rid])})
        if lv.stream:
            tail = []
            if lv.include_usage:
                usage = {"prompt_tokens": lv.prompt, "total_tokens": lv.prompt + n, "completion_tokens": n}
                tail.append(b"data: " + json.dumps({"id": lv.request_id, "object": "text_completion",
                                                    "created": lv.created, "model": lv.model, "choices": [],
                                                    "usage": usage}, separators=(",", ":")).encode() + b"\n\n")
            tail.append(b"data: [DONE]\n\n")
            lv.resp.chunks(tail)
            lv.resp.end_stream()
        else:
            lv.resp.send_json(200, {
                "id": lv.request_id, "object": "text_completion", "created": lv.created, "model": lv.model,
                "choices": [{"index": 0, "text": TOKEN_TEXT * n, "logprobs": None, "finish_reason": "length",
                             "stop_reason": None, "prompt_logprobs": None}],
                "usage": {"prompt_tokens": lv.prompt, "total_tokens": lv.prompt + n, "completion_tokens": n,
                          "prompt_tokens_details": None}})

    # ------------------------------------------------------------------------------------------------------
    # HTTP routes
    async def _handle(self, req: Request, resp: Responder) -> None:
        route = (req.method, req.path)
        key = self.config.api_key
        if key and req.path.startswith("/v1") and req.headers.get("authorization") != f"Bearer {key}":
            return resp.send_json(401, {"error": "Unauthorized"})
        if route == ("POST", "/v1/completions"):
            await self._completions(req, resp)
        elif route == ("GET", "/v1/models"):
            resp.send_json(200, self._models())
        elif route in (("GET", "/health"), ("GET", "/ping")):
            resp.send(200, b"", "text/plain")
        elif route == ("GET", "/metrics"):
            self._refresh_gauges()
            resp.send(200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        elif route == ("GET", "/version"):
            resp.send_json(200, {"version": "0.33.0+adaptwin.twin"})
        elif route == ("POST", "/v1/load_lora_adapter") and self.config.runtime_lora_updating:
            self._load_lora(req, resp)
        elif route == ("POST", "/v1/unload_lora_adapter") and self.config.runtime_lora_updating:
            self._unload_lora(req, resp)
        elif route == ("GET", "/adaptwin/served"):
            self._served(req, resp)
        elif req.path == "/fault" and self.config.fault_endpoint and req.method in ("GET", "POST"):
            self._fault(req, resp)
        elif req.path in ("/v1/completions", "/v1/models", "/metrics", "/health"):
            resp.send_json(405, {"detail": "Method Not Allowed"})
        else:
            resp.send_json(404, {"detail": "Not Found"})

    def _models(self) -> dict:
        base = {"id": self.config.model, "object": "model", "created": self.created, "owned_by": "vllm",
                "root": self.config.model, "parent": None, "max_model_len": self.max_model_len, "permission": []}
        data = [base]
        for name, k in sorted(self.adapters.items(), key=lambda kv: kv[1]):
            data.append({"id": name, "object": "model", "created": self.created, "owned_by": "vllm",
                         "root": self.adapter_paths.get(name, name), "parent": self.config.model,
                         "max_model_len": None, "permission": []})
        return {"object": "list", "data": data}

    def _bad(self, resp: Responder, message: str, param: str | None = None) -> None:
        resp.send_json(400, vllm_error(400, message, "BadRequestError", param))

    def _draw_fault(self) -> str:
        if self._forced:
            return self._forced.popleft()
        f = self.faults
        u = self._fault_rng.random()
        for kind, rate in (("5xx", f.error_rate), ("reset", f.reset_rate), ("midstream", f.midstream_reset_rate),
                           ("stall", f.stall_rate)):
            if u < rate:
                return kind
            u -= rate
        return "ok"

    async def _completions(self, req: Request, resp: Responder) -> None:
        try:
            body = req.json()
        except (ValueError, UnicodeDecodeError) as err:
            return self._bad(resp, f"request body is not valid JSON: {err}")
        if not isinstance(body, dict):
            return self._bad(resp, "request body must be a JSON object")
        model = body.get("model")
        if model == self.config.model:
            return self._bad(resp, f"twin serve simulates adapter traffic only: name an adapter (lora-0 … "
                                   f"lora-{self.config.max_cpu_loras - 1}) as the model, not the base model "
                                   f"{model!r}", "model")
        adapter = self.adapters.get(model) if isinstance(model, str) else None
        if adapter is None:
            return resp.send_json(404, vllm_error(404, f"The model `{model}` does not exist.", "NotFoundError",
                                                  "model"))
        prompt = _prompt_tokens(body.get("prompt"))
        if isinstance(prompt, str):
            return self._bad(resp, prompt, "prompt")
        max_tokens = body.get("max_tokens", 16)
        if max_tokens is None:
            max_tokens = 16
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            return self._bad(resp, f"max_tokens must be an integer >= 1, got {max_tokens!r}", "max_tokens")
        if body.get("n", 1) != 1:
            return self._bad(resp, "twin serve supports n=1 only", "n")
        if prompt + max_tokens > self.max_model_len:
            return self._bad(resp, f"This model's maximum context length is {self.max_model_len} tokens. However, "
                                   f"you requested {prompt + max_tokens} tokens ({prompt} in the messages, "
                                   f"{max_tokens} in the completion). Please reduce the length of the messages or "
                                   "completion.", "input_tokens")
        stream = bool(body.get("stream", False))
        opts = body.get("stream_options") or {}
        if not isinstance(opts, dict):
            return self._bad(resp, "stream_options must be an object", "stream_options")
        if opts and not stream:
            return self._bad(resp, "Stream options can only be defined when `stream=True`.", "stream_options")

        kind = self._draw_fault() if (self.faults.active or self._forced) else "ok"
        if self.faults.latency_ms:
            await asyncio.sleep(self.faults.latency_ms / 1e3)
        if kind == "5xx":
            st = self.faults.error_status
            return resp.send_json(st, vllm_error(st, "injected fault (twin serve)", "InternalServerError"
                                                 if st >= 500 else "BadRequestError"))
        if kind == "reset":
            return resp.reset()
        if kind == "stall":
            asyncio.get_running_loop().call_later(STALL_MAX_S, resp.reset)
            return

        rid_header = req.headers.get("x-request-id")
        request_id = f"cmpl-{rid_header}" if rid_header else f"cmpl-{uuid.uuid4().hex}"
        # Arrival is when the request reached the process, not when its body had been parsed and checked.
        t = max(((req.received or time.perf_counter()) - self._t0) * self.config.speedup, self._last_arrival)
        self._last_arrival = t
        from adaptwin.twin.config import Arrivals

        self.engine.add_arrivals(Arrivals([t], [adapter], [prompt], [max_tokens]))
        rid = self._n_added
        self._n_added += 1
        lv = _Live(rid, request_id, model, prompt, max_tokens, stream, bool(opts.get("include_usage")),
                   bool(opts.get("continuous_usage_stats")), resp, int(time.time()))
        if kind == "midstream" and stream:
            lv.reset_after = max(1, max_tokens // 2)
        self._live[rid] = lv
        if stream:
            resp.start_stream()
        self._wake.set()

    def _lora_body(self, req: Request, resp: Responder) -> dict | None:
        try:
            body = req.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("lora_name"), str) or not body["lora_name"]:
            self._bad(resp, "body must be a JSON object with a non-empty 'lora_name'", "lora_name")
            return None
        return body

    def _load_lora(self, req: Request, resp: Responder) -> None:
        body = self._lora_body(req, resp)
        if body is None:
            return
        name = body["lora_name"]
        if name in self.adapters:
            return self._bad(resp, f"The lora adapter '{name}' has already been loaded.", "lora_name")
        free = sorted(set(range(self.config.max_cpu_loras)) - set(self.adapters.values()))
        if not free:
            return self._bad(resp, f"twin serve holds at most --max-cpu-loras={self.config.max_cpu_loras} "
                                   "adapters; unload one first or start it with a larger --max-cpu-loras",
                             "lora_name")
        self.adapters[name] = free[0]
        self.adapter_paths[name] = str(body.get("lora_path") or name)
        resp.send(200, f"Success: LoRA adapter '{name}' added successfully.".encode(), "text/plain; charset=utf-8")

    def _unload_lora(self, req: Request, resp: Responder) -> None:
        body = self._lora_body(req, resp)
        if body is None:
            return
        name = body["lora_name"]
        if name not in self.adapters:
            return resp.send_json(404, vllm_error(404, f"The lora adapter '{name}' cannot be found.",
                                                  "NotFoundError", "lora_name"))
        del self.adapters[name]
        self.adapter_paths.pop(name, None)
        resp.send(200, f"Success: LoRA adapter '{name}' removed successfully.".encode(), "text/plain; charset=utf-8")

    def _served(self, req: Request, resp: Responder) -> None:
        rows = list(self.served)
        for part in req.query.split("&"):
            k, _, v = part.partition("=")
            if k == "limit" and v.isdigit():
                rows = rows[-int(v):] if int(v) else []
        resp.send_json(200, {"speedup": self.config.speedup, "lag_s": self.metrics.lag_s,
                             "start_perf_counter": self._t0, "requests": rows})

    def _fault(self, req: Request, resp: Responder) -> None:
        if req.method == "POST":
            try:
                new = Faults.from_json(req.json() or {}, self.faults)
            except (ValueError, FaultError) as err:
                return self._bad(resp, str(err))
            if new.seed != self.faults.seed:
                self._fault_rng = random.Random(new.seed)
            self.faults = new
            self._forced = deque(new.next)
            log.warning("faults now %s", new.to_json())
        resp.send_json(200, self.faults.to_json() | {"next": list(self._forced)})

    def _refresh_gauges(self) -> None:
        from adaptwin.twin.engine import WAITING

        eng, m = self.engine, self.metrics
        m.running = len(eng.running)
        pending = sum(1 for lv in self._live.values() if eng.status[lv.rid] == 0)  # arrived, not yet queued
        m.waiting = eng.n_waiting + pending
        m.kv_usage = eng.used_blocks / eng.capacity_blocks
        m.preemptions = eng.preemption_count
        m.adapter_loads = eng.adapter_loads
        names = {k: n for n, k in self.adapters.items()}
        run = sorted({eng.adapter[r] for r in eng.running})
        wait = sorted({eng.adapter[lv.rid] for lv in self._live.values() if eng.status[lv.rid] in (0, WAITING)})
        m.set_lora_info([names.get(a, f"lora-{a}") for a in run], [names.get(a, f"lora-{a}") for a in wait])


def _prompt_tokens(prompt) -> int | str:
    """Prompt length in tokens, or an error message: a string counts its whitespace-separated words (at least 1),
    a list of ints counts its ids; a batch of exactly one prompt (``[str]``, ``[[int, …]]``) is accepted too."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return max(1, len(prompt.split()))
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        return "twin serve takes one prompt per request (batched prompts are not supported)"
    return "prompt must be a non-empty string or a non-empty list of token ids"


class ServerThread:
    """A :class:`TwinServer` on its own event loop in a daemon thread.

    >>> from adaptwin.replay.serve.config import ServeConfig
    >>> with ServerThread(ServeConfig("llama-3.1-8b-instruct", 2, 1, port=0)) as srv:
    ...     srv.url.startswith("http://127.0.0.1:")
    True
    """

    def __init__(self, config: ServeConfig, profile=None):
        self.server = TwinServer(config, profile)
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._run, name="twin-serve", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.server.start())
        except BaseException as err:  # noqa: BLE001 - re-raised in start()
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.server.close())
        self._loop.close()

    def start(self) -> "ServerThread":
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the server's loop and return its result (for tests)."""
        fut = asyncio.run_coroutine_threadsafe(_call(fn, *args), self._loop)
        return fut.result(10)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    @property
    def url(self) -> str:
        return self.server.url

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def _call(fn, *args):
    return fn(*args)
