"""The stepping engine: one vLLM V1 server with LoRA, advanced step by step or in closed-form jumps.

Mechanisms follow vLLM 0.8.5's V1 scheduler (``vllm/v1/core/sched/scheduler.py``):

* every step first schedules the running requests (one token per decoding request, the rest of a partial prefill),
  then — only if nobody was preempted — waiting requests in FCFS order within the token budget
  (``max_num_batched_tokens``, chunked prefill), ``max_num_seqs`` and the KV cache;
* a waiting request whose adapter is not in the batch when the batch already holds ``max_loras`` adapters is
  skipped, not allowed to block the queue;
* KV cache in blocks of ``block_size`` tokens; when a step cannot get its blocks the newest running request is
  preempted (recompute: its blocks are freed, it goes back to the head of the queue and later recomputes its prompt
  and the tokens it had generated);
* GPU adapter slots are an LRU of ``max_loras`` entries; a miss costs the profile's load time in that step.

Speed: state lives in flat arrays and counters; a decoding request's progress is ``S + offset`` where ``S`` is the
global step counter, so a run of identical decode steps (no arrival, finish, KV shortfall, or admission possible)
is one jump of ``k`` steps: time ``k·dt``, KV blocks from a 16-bin histogram of block phases.
"""

from __future__ import annotations

import heapq
import logging
import math
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from adaptwin.twin.config import Arrivals, ConfigError, ServerConfig
from adaptwin.twin.profile import Profile, load_profile, price_rank_kernel

__all__ = ["Engine", "PENDING", "WAITING", "RUNNING", "FINISHED", "REJECTED"]

log = logging.getLogger("adaptwin.twin.engine")

# request states (ordered like vLLM's RequestStatus)
PENDING, WAITING, RUNNING, FINISHED, REJECTED = 0, 1, 2, 3, 4


@dataclass
class _Window:
    """Time-weighted accumulators of one statistics window."""

    busy_s: float = 0.0
    running_s: float = 0.0
    waiting_s: float = 0.0
    kv_s: float = 0.0
    loads: int = 0
    preemptions: int = 0
    steps: int = 0


class Engine:
    """A twin server. Feed it arrivals (:meth:`add_arrivals`), move its clock (:meth:`advance_until`), read
    per-request state (:meth:`request_arrays`) — the replay engine drives it incrementally this way; the batch
    :func:`adaptwin.twin.simulate` sits on top.

    >>> from adaptwin.twin.config import ServerConfig, Arrivals
    >>> eng = Engine(ServerConfig(model="llama-3.1-8b-instruct", served=2, max_loras=1))
    >>> eng.add_arrivals(Arrivals([0.0, 0.0], [0, 1], [100, 50], [10, 5]))
    >>> eng.advance_until(5.0)
    >>> eng.finished_count
    2
    """

    def __init__(self, config: ServerConfig, profile: Profile | None = None, window_s: float = 60.0,
                 track_completions: bool = False):
        prof = profile if profile is not None else load_profile(config.model)
        self.config, self.profile = config, prof
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ConfigError(f"window_s must be a positive number of seconds, got {window_s}")
        self.window_s = float(window_s)
        self.block_size = bs = config.block_size
        self.max_model_len = config.max_model_len or prof.max_model_len
        if config.kv_capacity_tokens is not None:
            kv_tokens = int(config.kv_capacity_tokens)
        else:
            key = (config.max_loras, config.max_lora_rank)
            if key in prof.kv_failed:
                raise ConfigError(f"vLLM failed to start with max_loras={config.max_loras}, max_lora_rank="
                                  f"{config.max_lora_rank} on {prof.gpu} ({prof.model}): the LoRA buffers leave too "
                                  "little KV cache; lower --max-loras or --max-lora-rank")
            kv_tokens = prof.kv_capacity_tokens(config.max_loras, config.max_lora_rank)
        if kv_tokens < self.max_model_len:
            raise ConfigError(f"KV cache of {kv_tokens} tokens is smaller than max_model_len {self.max_model_len}: "
                              "vLLM refuses to start; lower --max-model-len, --max-loras or --max-lora-rank")
        self.kv_capacity_tokens = kv_tokens
        self.capacity_blocks = kv_tokens // bs
        st = prof.step
        lscale = st.rank_factor(config.max_lora_rank) * prof.family_scale(config.adapter_family)
        self._c_base, self._c_dec, self._c_pre = st.base_ms, st.decode_ms_per_seq, st.prefill_ms_per_token
        self._c_kv = st.kv_read_ms_per_ktoken * 1e-3  # ms per context token a decoder attends to
        self._c_knee, self._knee = st.decode_ms_per_seq_above_knee, st.decode_knee_seqs
        self._l_base, self._l_dec = lscale * st.lora_base_ms, lscale * st.lora_ms_per_seq
        self._l_pre = lscale * st.lora_ms_per_prefill_token
        self._l_ad = lscale * st.adapter_rank_factor(config.max_lora_rank) * st.lora_ms_per_adapter
        self._l_adk = lscale * st.lora_ms_per_adapter_ktoken * 1e-3
        # measured LoRA-kernel cost of the rank blocks beyond 16, by the kernels' tiling (StepTimeModel.rank_kernel_ms)
        self._rk = st.rank_kernel_terms(config.max_lora_rank, config.max_loras)
        self._rk_on = any(self._rk[1]) or any(self._rk[2])
        # adapter family: LoRA terms x a measured multiplier per distinct-adapter count (all 1.0 for lora: exact)
        self._fam = prof.family_multipliers(config.adapter_family, config.max_lora_rank, config.max_loras)
        self._s_base, self._s_run = prof.sched_base_ms, prof.sched_ms_per_running
        self._s_wait = prof.sched_ms_per_waiting_skipped  # per waiting request skipped (batch at max_loras)
        self._load_ms = [prof.load_ms(config.max_lora_rank, r) for r in config.adapter_ranks]
        cap = prof.client_max_waiting if config.client_max_waiting == -1 else config.client_max_waiting
        self.client_max_waiting = cap if cap is not None else 1 << 62

        # ---- per-request state (flat arrays; index = request id in arrival order) ----
        self.arrival = array("d"); self.adapter = array("q"); self.prompt = array("q"); self.output = array("q")
        self.status = bytearray()
        self.first_token = array("d"); self.last_token = array("d"); self.finish_time = array("d")
        self.generated = array("q")  # output tokens produced so far (decoders: gen_off + S)
        self.computed = array("q")  # KV tokens computed (decoders: off + S)
        self.preemptions = array("q")
        self._off = array("q"); self._gen_off = array("q"); self._decoding = bytearray()
        self._wkey = array("q")  # key of the request's current waiting-queue entry
        # with max_loras >= served no waiting request is ever skipped: FCFS on one queue suffices
        self._lora_limited = config.max_loras < config.served
        self._n = 0  # requests added
        self._next = 0  # next request id not yet arrived

        # ---- server state ----
        self.time = 0.0
        self.step = 0  # global step counter S
        self.running: dict[int, None] = {}  # admission order (preemption pops the newest)
        self.prefilling: list[int] = []  # running requests with prompt tokens left, admission order
        self.n_decode = 0
        self._off_sum = 0  # Σ offsets of the decoders: their context tokens are _off_sum + n_decode·S
        self._phase = [0] * bs  # decoders by (off mod block_size)
        self._finish_heap: list[tuple[int, int]] = []  # (finish step, rid)
        self.used_blocks = 0
        self._queue: deque = deque()  # FCFS (key, rid), lazy deletion
        self._by_adapter: list[deque] = [deque() for _ in range(config.served)]
        self._cand: list[tuple[int, int]] = []  # (head key, adapter) for adapters in the batch with waiting requests
        self._cand_key: list[int | None] = [None] * config.served  # the live heap entry of each adapter
        self._tail_key = 0
        self._head_key = 0
        self.n_waiting = 0
        self._backlog: deque = deque()  # requests the client holds back (queue at client_max_waiting)
        self._acount = [0] * config.served  # running requests per adapter
        self._wcount = [0] * config.served  # waiting requests per adapter
        self._w_in_batch = 0  # waiting requests whose adapter is in the batch
        self.n_adapters = 0  # distinct adapters in the batch
        self._resident: set[int] = set()
        self._idle: OrderedDict = OrderedDict()  # resident adapters not in the batch, LRU first
        self.adapter_loads = 0
        self.preemption_count = 0
        self.finished_count = 0
        self.windows: list[_Window] = []
        self._completions: list[int] | None = [] if track_completions else None
        self.max_steps_jumped = 0

    # ------------------------------------------------------------------------------------------------------
    # input
    def add_arrivals(self, arrivals: Arrivals) -> None:
        """Append requests (times >= the last one added); they enter the queue when the clock reaches them."""
        n = len(arrivals)
        if n == 0:
            return
        if int(arrivals.adapter.max()) >= self.config.served:
            raise ConfigError(f"arrival for adapter index {int(arrivals.adapter.max())}, but only "
                              f"{self.config.served} adapters are served (indices 0..{self.config.served - 1})")
        if self._n and arrivals.time[0] < self.arrival[self._n - 1]:
            raise ConfigError("arrivals must be added in time order (the new batch starts before the last one)")
        self.arrival.extend(arrivals.time.tolist()); self.adapter.extend(arrivals.adapter.tolist())
        self.prompt.extend(arrivals.prompt.tolist()); self.output.extend(arrivals.output.tolist())
        self.status.extend(bytes(n))
        nan = array("d", [math.nan]) * n
        self.first_token.extend(nan); self.last_token.extend(nan); self.finish_time.extend(nan)
        zeros = array("q", bytes(8 * n))
        for arr in (self.generated, self.computed, self.preemptions, self._off, self._gen_off, self._wkey):
            arr.extend(zeros)
        self._decoding.extend(bytes(n))
        self._n += n

    # ------------------------------------------------------------------------------------------------------
    # queue helpers
    def _enqueue_arrivals(self, t: float) -> None:
        """Move every request that arrived by ``t`` into the waiting queue (or the client backlog)."""
        arrival, mml = self.arrival, self.max_model_len
        while self._next < self._n and arrival[self._next] <= t:
            rid = self._next
            self._next += 1
            if self.prompt[rid] + self.output[rid] > mml:
                self.status[rid] = REJECTED  # vLLM: "This model's maximum context length is ..." (HTTP 400)
                continue
            if self.n_waiting >= self.client_max_waiting or self._backlog:
                self._backlog.append(rid)
                continue
            self._push_waiting(rid)

    def _push_waiting(self, rid: int, head: bool = False) -> None:
        a = self.adapter[rid]
        if head:
            self._head_key -= 1
            key = self._head_key
            self._queue.appendleft((key, rid))
        else:
            self._tail_key += 1
            key = self._tail_key
            self._queue.append((key, rid))
        self._wkey[rid] = key
        self.status[rid] = WAITING
        self.n_waiting += 1
        self._wcount[a] += 1
        if self._acount[a]:
            self._w_in_batch += 1
        if self._lora_limited:
            q = self._by_adapter[a]
            if head:
                q.appendleft((key, rid))
                new_head = True
            else:
                new_head = not q
                q.append((key, rid))
            if new_head and self._acount[a]:
                self._cand_update(a)

    def _refill_from_backlog(self) -> None:
        while self._backlog and self.n_waiting < self.client_max_waiting:
            self._push_waiting(self._backlog.popleft())

    def _valid(self, entry) -> bool:
        key, rid = entry
        return self.status[rid] == WAITING and self._wkey[rid] == key

    def _next_candidate(self):
        """The waiting request vLLM would schedule next (FCFS, max_loras skip rule), or None."""
        if self.n_adapters < self.config.max_loras or not self._lora_limited:
            q = self._queue
            while q and not self._valid(q[0]):
                q.popleft()
            return q[0][1] if q else None
        cand, cand_key, by_adapter = self._cand, self._cand_key, self._by_adapter
        while cand:
            key, a = cand[0]
            if cand_key[a] == key:
                q = by_adapter[a]
                while q and not self._valid(q[0]):
                    q.popleft()
                if q and q[0][0] == key:
                    return q[0][1]
                heapq.heappop(cand)
                cand_key[a] = None
                self._cand_update(a)
            else:
                heapq.heappop(cand)
        return None

    def _cand_update(self, a: int) -> None:
        """Register adapter ``a``'s oldest waiting request as a candidate while ``a`` is in the batch."""
        if not self._acount[a] or not self._lora_limited:
            return
        q = self._by_adapter[a]
        while q and not self._valid(q[0]):
            q.popleft()
        if q:
            key = q[0][0]
            if self._cand_key[a] != key:
                self._cand_key[a] = key
                heapq.heappush(self._cand, (key, a))
        else:
            self._cand_key[a] = None

    def _take_waiting(self, rid: int) -> None:
        """Remove ``rid`` (the head of its adapter's queue) from the waiting queue."""
        a = self.adapter[rid]
        if self._lora_limited:
            q = self._by_adapter[a]
            while q and not self._valid(q[0]):
                q.popleft()
            q.popleft()
        else:
            q = self._queue
            while q and not self._valid(q[0]):
                q.popleft()
            q.popleft()  # rid is the FCFS head
        self._wkey[rid] = -(1 << 62)
        self.n_waiting -= 1
        self._wcount[a] -= 1
        if self._acount[a]:
            self._w_in_batch -= 1
        self._cand_update(a)

    # ------------------------------------------------------------------------------------------------------
    # adapters
    def _adapter_in(self, a: int) -> float:
        """A request of adapter ``a`` joins the batch; returns the load cost (ms) if ``a`` was not on the GPU."""
        self._acount[a] += 1
        if self._acount[a] > 1:
            return 0.0
        self.n_adapters += 1
        self._w_in_batch += self._wcount[a]
        self._cand_update(a)
        if a in self._resident:
            self._idle.pop(a, None)
            return 0.0
        if len(self._resident) >= self.config.max_loras:
            victim, _ = self._idle.popitem(last=False)
            self._resident.discard(victim)
        self._resident.add(a)
        self.adapter_loads += 1
        self._win().loads += 1
        return self._load_ms[a]

    def _adapter_out(self, a: int) -> None:
        self._acount[a] -= 1
        if self._acount[a] == 0:
            self.n_adapters -= 1
            self._w_in_batch -= self._wcount[a]
            self._cand_key[a] = None
            self._idle[a] = None

    # ------------------------------------------------------------------------------------------------------
    # running-set changes
    def _to_decode(self, rid: int) -> None:
        S = self.step
        off = self.computed[rid] - S
        self._off[rid] = off
        self._gen_off[rid] = self.generated[rid] - S
        self._decoding[rid] = 1
        self._off_sum += off
        self._phase[off % self.block_size] += 1
        self.n_decode += 1
        heapq.heappush(self._finish_heap, (S + self.output[rid] - self.generated[rid], rid))

    def _leave_decode(self, rid: int) -> None:
        S = self.step
        self.computed[rid] = self._off[rid] + S
        self.generated[rid] = self._gen_off[rid] + S
        self._decoding[rid] = 0
        self._off_sum -= self._off[rid]
        self._phase[self._off[rid] % self.block_size] -= 1
        self.n_decode -= 1

    def _blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _finish(self, rid: int) -> None:
        if self._decoding[rid]:
            self._leave_decode(rid)
        self.status[rid] = FINISHED
        self.finish_time[rid] = self.last_token[rid] = self.time
        self.used_blocks -= self._blocks(self.computed[rid])
        del self.running[rid]
        self._adapter_out(self.adapter[rid])
        self.finished_count += 1
        if self._completions is not None:
            self._completions.append(rid)

    def _preempt_newest(self) -> int:
        rid, _ = self.running.popitem()
        if self._decoding[rid]:
            self._leave_decode(rid)
        else:
            self.prefilling.remove(rid)
        self.used_blocks -= self._blocks(self.computed[rid])
        self.computed[rid] = 0
        self.preemptions[rid] += 1
        self.preemption_count += 1
        self._win().preemptions += 1
        self._adapter_out(self.adapter[rid])
        self._push_waiting(rid, head=True)
        return rid

    # ------------------------------------------------------------------------------------------------------
    # windows
    def _win(self) -> _Window:
        w = int(self.time // self.window_s)
        ws = self.windows
        while len(ws) <= w:
            ws.append(_Window())
        return ws[w]

    def _account(self, dt: float, steps: int, prefill_tokens: int = 0) -> None:
        """Charge ``steps`` steps taking ``dt`` s in all to the current window (``prefill_tokens``: the exact step's
        prompt tokens, for the diagnostic engines of :mod:`adaptwin.twin.gauges`)."""
        w = self._win()
        w.busy_s += dt
        w.running_s += dt * len(self.running)
        w.waiting_s += dt * (self.n_waiting + len(self._backlog))
        w.kv_s += dt * self.used_blocks / self.capacity_blocks
        w.steps += steps

    # ------------------------------------------------------------------------------------------------------
    # one exact step
    def _schedule_running(self) -> tuple[int, int, list]:
        """Token budget left, KV blocks needed and ``[rid, chunk]`` of partial prefills for this step."""
        bs, S = self.block_size, self.step
        budget = self.config.max_num_batched_tokens - self.n_decode
        need = self._phase[(-S) % bs] if self.n_decode else 0
        chunks: list = []
        computed, prompt, generated = self.computed, self.prompt, self.generated
        for rid in self.prefilling:
            if budget <= 0:
                break
            c = computed[rid]
            chunk = min(prompt[rid] + generated[rid] - c, budget)
            budget -= chunk
            need += -(-(c + chunk) // bs) + (c // -bs)  # blocks after - blocks before
            chunks.append((rid, chunk))
        return budget, need, chunks

    def _exact_step(self) -> bool:
        """Schedule and run one step; True when the step changed the batch (admission, preemption, prefill)."""
        bs = self.block_size
        budget, need, chunks = self._schedule_running()
        preempted = False
        capacity = self.capacity_blocks
        while need > capacity - self.used_blocks and self.running:
            preempted = True  # allocate_slots() failed: preempt the newest running request, then retry
            self._preempt_newest()
            budget, need, chunks = self._schedule_running()
        free = capacity - self.used_blocks
        load_ms = 0.0
        admitted = 0
        if not preempted and self.n_waiting:
            max_seqs = self.config.max_num_seqs
            running, prefilling, prompt, generated, status = (self.running, self.prefilling, self.prompt,
                                                              self.generated, self.status)
            while budget > 0 and self.n_waiting and len(running) < max_seqs:
                rid = self._next_candidate()
                if rid is None:
                    break  # vLLM scans the rest of the queue and skips it (max_loras)
                chunk = min(prompt[rid] + generated[rid], budget)
                blocks = -(-chunk // bs)
                if need + blocks > free:
                    break  # allocate_slots() returned None: stop scheduling waiting requests
                self._take_waiting(rid)
                status[rid] = RUNNING
                running[rid] = None
                prefilling.append(rid)
                load_ms += self._adapter_in(self.adapter[rid])
                budget -= chunk
                need += blocks
                chunks.append((rid, chunk))
                admitted += 1
            if admitted and self._backlog:
                self._refill_from_backlog()
        if not self.running:
            return preempted
        n_pre = 0
        for _, c in chunks:
            n_pre += c
        n_dec = self.n_decode
        dt_ms = self._decode_ms(n_dec) + self._c_pre * n_pre + load_ms + self._kv_read_ms()
        if self.n_adapters:
            dt_ms += (self._l_base + self._l_dec * n_dec + self._l_pre * n_pre
                      + self.n_adapters * (self._l_ad + self._l_adk * (n_dec + n_pre))) * self._fam[self.n_adapters]
            if self._rk_on:
                dt_ms += price_rank_kernel(self._rk, n_dec + n_pre, self.n_adapters)
        dt_ms += self._sched_ms()
        dt = dt_ms * 1e-3
        self._account(dt, 1, n_pre)
        self.used_blocks += need
        t = self.time = self.time + dt
        self.step += 1
        if chunks:
            computed, prompt, generated, output = self.computed, self.prompt, self.generated, self.output
            for rid, chunk in chunks:
                c = computed[rid] + chunk
                computed[rid] = c
                if c == prompt[rid] + generated[rid]:  # prompt (or recompute) done: one token sampled
                    self.prefilling.remove(rid)
                    g = generated[rid] + 1
                    generated[rid] = g
                    if g == 1:
                        self.first_token[rid] = t
                    self.last_token[rid] = t
                    if g >= output[rid]:
                        self._finish(rid)
                    else:
                        self._to_decode(rid)
        self._pop_finished()
        return preempted or admitted > 0 or bool(chunks)

    def _pop_finished(self) -> None:
        heap, S = self._finish_heap, self.step
        if heap and heap[0][0] <= S:
            status, decoding, output, gen_off = self.status, self._decoding, self.output, self._gen_off
            while heap and heap[0][0] <= S:
                fs, rid = heapq.heappop(heap)
                if status[rid] == RUNNING and decoding[rid] and output[rid] - gen_off[rid] == fs:
                    self._finish(rid)
        if self._backlog:
            self._refill_from_backlog()

    # ------------------------------------------------------------------------------------------------------
    # jumps over identical decode steps
    def _sched_ms(self) -> float:
        """Scheduler overhead of a step: per running request, plus the waiting requests vLLM scans and skips
        when the batch already holds max_loras adapters."""
        ms = self._s_base + self._s_run * len(self.running)
        if self.n_adapters >= self.config.max_loras:
            ms += self._s_wait * (self.n_waiting - self._w_in_batch)
        return ms

    def _decode_dt(self) -> float:
        n_dec = self.n_decode
        ms = self._decode_ms(n_dec) + self._kv_read_ms()
        if self.n_adapters:
            ms += (self._l_base + self._l_dec * n_dec
                   + self.n_adapters * (self._l_ad + self._l_adk * n_dec)) * self._fam[self.n_adapters]
            if self._rk_on:
                ms += price_rank_kernel(self._rk, n_dec, self.n_adapters)
        ms += self._sched_ms()
        return ms * 1e-3

    def _decode_ms(self, n_dec: int) -> float:
        """Base and per-decoder cost of a step (:meth:`StepTimeModel.decode_ms`)."""
        ms = self._c_base + self._c_dec * n_dec
        return ms + self._c_knee * (n_dec - self._knee) if n_dec > self._knee and self._c_knee else ms

    def _kv_read_ms(self) -> float:
        """Attention of this step's decoders: each reads its context (tokens so far plus the new one)."""
        return self._c_kv * (self._off_sum + self.n_decode * (self.step + 1)) if self._c_kv else 0.0

    def _steps_to(self, delta: float, dt: float, grow: float) -> int:
        """Fewest steps (>= 1) whose time reaches ``delta`` when step j takes ``dt + grow·j`` seconds."""
        if delta <= dt:
            return 1
        if grow <= 0.0:
            return math.ceil(delta / dt)
        b = dt - 0.5 * grow  # k·dt + grow·k(k-1)/2 = delta  <=>  grow/2·k² + b·k - delta = 0
        k = max(1, math.ceil((-b + math.sqrt(b * b + 2.0 * grow * delta)) / grow))
        while k > 1 and (k - 1) * dt + grow * (k - 1) * (k - 2) / 2 >= delta:
            k -= 1  # guard against rounding of the root
        while k * dt + grow * k * (k - 1) / 2 < delta:
            k += 1
        return k

    def _kv_need(self, k: int) -> int:
        """Blocks the decoders allocate over the next ``k`` steps."""
        bs, S, ph = self.block_size, self.step, self._phase
        need = self.n_decode * (k // bs)
        for j in range(k % bs):
            need += ph[(-(S + j)) % bs]
        return need

    def _kv_max_steps(self, free: int) -> int:
        """Most steps the decoders can run before a step lacks blocks."""
        bs, S, ph, n = self.block_size, self.step, self._phase, self.n_decode
        cycles = free // n
        k, used = cycles * bs, cycles * n
        for j in range(bs):
            used += ph[(-(S + k)) % bs]
            if used > free:
                return k
            k += 1
        return k

    def _jump(self, until: float) -> None:
        """Advance over identical decode steps up to the next event; at least one step."""
        heap = self._finish_heap
        while heap:
            fs, rid = heap[0]
            if self.status[rid] == RUNNING and self._decoding[rid] and self.output[rid] - self._gen_off[rid] == fs:
                break
            heapq.heappop(heap)
        dt = self._decode_dt()
        # every step each decoder's context grows by one token, so its attention reads grow: linear step times
        grow = self._c_kv * self.n_decode * 1e-3
        t = self.time
        k = heap[0][0] - self.step if heap else 1 << 40
        if self._next < self._n:
            k = min(k, self._steps_to(self.arrival[self._next] - t, dt, grow))
        k = min(k, self._steps_to(until - t, dt, grow))
        w_end = (int(t // self.window_s) + 1) * self.window_s
        k = min(k, self._steps_to(w_end - t, dt, grow))
        free = self.capacity_blocks - self.used_blocks
        if self.n_decode * -(-k // self.block_size) > free:
            k = min(k, self._kv_max_steps(free))
            if k == 0:
                self._exact_step()  # this step lacks blocks: preempt
                return
        need = self._kv_need(k)
        span = k * dt + grow * k * (k - 1) / 2 if grow else k * dt
        self._account(span, k)
        self.used_blocks += need
        self.step += k
        self.time = t + span
        self.max_steps_jumped = max(self.max_steps_jumped, k)
        self._pop_finished()

    # ------------------------------------------------------------------------------------------------------
    # driving
    def advance_until(self, until: float) -> None:
        """Run every step that starts before ``until`` (the clock may end a little after it)."""
        while self.time < until:
            self._enqueue_arrivals(self.time)
            if not self.running and not self.n_waiting:
                nxt = self.arrival[self._next] if self._next < self._n else math.inf
                if nxt >= until:
                    self.time = max(self.time, until)
                    break
                self.time = max(self.time, nxt)
                continue
            if self.prefilling or not self.running or (self.n_waiting and self._admissible()):
                self._exact_step()  # a step that admits or prefills: simulate it exactly
            else:
                self._jump(until)  # identical decode steps up to the next event
        self._enqueue_arrivals(self.time)  # whatever arrived by now is queued (state readable between calls)

    def _admissible(self) -> bool:
        if len(self.running) >= self.config.max_num_seqs:
            return False
        budget = self.config.max_num_batched_tokens - self.n_decode
        if budget <= 0:
            return False
        rid = self._next_candidate()
        if rid is None:
            return False
        chunk = min(self.prompt[rid] + self.generated[rid], budget)
        need = self._phase[(-self.step) % self.block_size] if self.n_decode else 0
        return need + self._blocks(chunk) <= self.capacity_blocks - self.used_blocks

    # ------------------------------------------------------------------------------------------------------
    # output
    def sync(self) -> None:
        """Write the lazy progress of decoding requests into ``generated``/``computed`` (for reading)."""
        S = self.step
        for rid in self.running:
            if self._decoding[rid]:
                self.generated[rid] = self._gen_off[rid] + S
                self.computed[rid] = self._off[rid] + S

    def drain_completions(self) -> list[int]:
        """Ids (arrival order, from 0) of requests finished since the last call; needs ``track_completions=True``.
        Read their timings with :meth:`request_info`."""
        if self._completions is None:
            raise RuntimeError("create the Engine with track_completions=True to drain completions")
        done, self._completions = self._completions, []
        return done

    def request_info(self, rid: int) -> dict:
        """One request's state and timings (s since start; NaN where not reached yet)."""
        if not 0 <= rid < self._n:
            raise IndexError(f"no request {rid} (0..{self._n - 1})")
        gen = self._gen_off[rid] + self.step if self._decoding[rid] else self.generated[rid]
        return {"arrival": self.arrival[rid], "adapter": self.adapter[rid], "prompt": self.prompt[rid],
                "output": self.output[rid], "status": ("pending", "waiting", "running", "finished", "rejected")[self.status[rid]],
                "first_token": self.first_token[rid], "last_token": self.last_token[rid],
                "finish_time": self.finish_time[rid], "generated": gen, "preemptions": self.preemptions[rid]}

    def request_arrays(self) -> dict[str, np.ndarray]:
        """Per-request state as numpy arrays (copies), in arrival order."""
        self.sync()
        n = self._n
        return {
            "arrival": np.frombuffer(self.arrival, dtype=np.float64, count=n).copy(),
            "adapter": np.frombuffer(self.adapter, dtype=np.int64, count=n).copy(),
            "prompt": np.frombuffer(self.prompt, dtype=np.int64, count=n).copy(),
            "output": np.frombuffer(self.output, dtype=np.int64, count=n).copy(),
            "status": np.frombuffer(bytes(self.status), dtype=np.uint8, count=n).copy(),
            "first_token": np.frombuffer(self.first_token, dtype=np.float64, count=n).copy(),
            "last_token": np.frombuffer(self.last_token, dtype=np.float64, count=n).copy(),
            "finish_time": np.frombuffer(self.finish_time, dtype=np.float64, count=n).copy(),
            "generated": np.frombuffer(self.generated, dtype=np.int64, count=n).copy(),
            "preemptions": np.frombuffer(self.preemptions, dtype=np.int64, count=n).copy(),
        }

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (used by tests; O(running))."""
        assert 0 <= self.used_blocks <= self.capacity_blocks, (self.used_blocks, self.capacity_blocks)
        assert self.n_adapters <= self.config.max_loras, (self.n_adapters, self.config.max_loras)
        assert len(self.running) <= self.config.max_num_seqs
        assert len(self._resident) <= self.config.max_loras
        S = self.step
        blocks = 0
        for rid in self.running:
            c = self._off[rid] + S if self._decoding[rid] else self.computed[rid]
            blocks += self._blocks(c)
        assert blocks == self.used_blocks, (blocks, self.used_blocks)
        assert len({self.adapter[r] for r in self.running}) == self.n_adapters
        assert sum(self._wcount) == self.n_waiting
        assert self._w_in_batch == sum(w for w, c in zip(self._wcount, self._acount) if c)
