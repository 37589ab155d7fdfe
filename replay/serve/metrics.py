"""vLLM's Prometheus metrics, written by hand in the text exposition format (version 0.0.4).

Names, types, labels and buckets are vLLM's (``vllm/v1/metrics/loggers.py``, 0.33): a scraper or dashboard
that reads a vLLM server reads ``twin serve`` unchanged. Counters are exposed as ``<name>_total`` under a
``# TYPE <name> counter`` line, as ``prometheus_client`` does. Latencies are in *twin* seconds (the times the
simulated server took; wall seconds × speedup). One writer: the server's event loop.

Twin-only series carry the ``adaptwin:`` prefix (adapter loads, the twin's lag behind the wall clock).
"""

from __future__ import annotations

import bisect
import math
import time
from collections import OrderedDict

__all__ = ["VllmMetrics", "Histogram", "TTFT_BUCKETS", "ITL_BUCKETS", "E2E_BUCKETS"]

# vllm/v1/metrics/loggers.py
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0, 7680.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000, 200000)

#: most label sets kept for vllm:lora_requests_info (vLLM keeps every one it ever wrote; we keep the newest)
MAX_LORA_INFO_SERIES = 512


def _fmt(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    if v != v:
        return "NaN"
    if float(v).is_integer() and abs(v) < 1e15:
        return f"{float(v):.1f}"
    return repr(float(v))


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs) -> str:
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in pairs) + "}"


class Histogram:
    """A Prometheus histogram (cumulative buckets, sum, count)."""

    def __init__(self, buckets):
        self.bounds = tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # last = +Inf only
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, base: list) -> list[str]:
        out, acc = [], 0
        for bound, c in zip(self.bounds + (math.inf,), self.counts):
            acc += c
            out.append(f"{name}_bucket{_labels(base + [('le', _fmt(bound))])} {_fmt(acc)}")
        out.append(f"{name}_count{_labels(base)} {_fmt(self.count)}")
        out.append(f"{name}_sum{_labels(base)} {_fmt(self.sum)}")
        return out


class VllmMetrics:
    """The subset of vLLM's metrics the twin can serve honestly. Gauges are set by the server right before
    rendering; counters and histograms are updated as requests progress."""

    def __init__(self, model_name: str, max_loras: int, block_size: int, num_gpu_blocks: int):
        self.model_name = model_name
        self.max_loras = max_loras
        self.block_size, self.num_gpu_blocks = block_size, num_gpu_blocks
        self.created = time.time()
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.success = 0
        self.adapter_loads = 0
        self.lag_s = 0.0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.queue = Histogram(E2E_BUCKETS)
        self.prompt_hist = Histogram(TOKEN_BUCKETS)
        self.gen_hist = Histogram(TOKEN_BUCKETS)
        self.lora_info: OrderedDict[tuple[str, str], float] = OrderedDict()

    def set_lora_info(self, running: list[str], waiting: list[str]) -> None:
        """vLLM writes the wall time of the update into the series of the current label set; old label sets stay."""
        key = (",".join(running), ",".join(waiting))
        self.lora_info[key] = time.time()
        self.lora_info.move_to_end(key)
        while len(self.lora_info) > MAX_LORA_INFO_SERIES:
            self.lora_info.popitem(last=False)

    def observe_finished(self, ttft_s: float, itl_gaps_s: float, n_gaps: int, e2e_s: float, queue_s: float,
                         prompt: int, output: int) -> None:
        self.ttft.observe(ttft_s)
        if n_gaps > 0:
            mean = itl_gaps_s / n_gaps  # the twin decodes evenly inside a request's jumps; one sample per gap
            for _ in range(min(n_gaps, 64)):
                self.itl.observe(mean)
            if n_gaps > 64:  # keep count and sum exact without looping over very long outputs
                extra = n_gaps - 64
                self.itl.counts[bisect.bisect_left(self.itl.bounds, mean)] += extra
                self.itl.count += extra
                self.itl.sum += mean * extra
        self.e2e.observe(e2e_s)
        self.queue.observe(queue_s)
        self.prompt_hist.observe(prompt)
        self.gen_hist.observe(output)
        self.success += 1

    def render(self) -> bytes:
        base = [("engine", "0"), ("model_name", self.model_name)]
        out: list[str] = []

        def family(name: str, kind: str, doc: str) -> None:
            out.append(f"# HELP {name} {doc}")
            out.append(f"# TYPE {name} {kind}")

        def gauge(name: str, doc: str, value: float) -> None:
            family(name, "gauge", doc)
            out.append(f"{name}{_labels(base)} {_fmt(value)}")

        def counter(name: str, doc: str, value: float, extra=()) -> None:
            family(name, "counter", doc)
            out.append(f"{name}_total{_labels(base + list(extra))} {_fmt(value)}")
            out.append(f"{name}_created{_labels(base + list(extra))} {_fmt(self.created)}")

        def hist(name: str, doc: str, h: Histogram) -> None:
            family(name, "histogram", doc)
            out.extend(h.lines(name, base))

        gauge("vllm:num_requests_running", "Number of requests in model execution batches.", self.running)
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", self.waiting)
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", self.kv_usage)
        family("vllm:lora_requests_info", "gauge", "Running stats on lora requests.")
        for (run, wait), ts in self.lora_info.items():
            labels = [("max_lora", str(self.max_loras)), ("running_lora_adapters", run),
                      ("waiting_lora_adapters", wait)]
            out.append(f"vllm:lora_requests_info{_labels(labels)} {_fmt(ts)}")
        family("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig")
        info = [("block_size", str(self.block_size)), ("engine", "0"), ("num_gpu_blocks", str(self.num_gpu_blocks))]
        out.append(f"vllm:cache_config_info{_labels(info)} 1.0")
        counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", self.preemptions)
        counter("vllm:prompt_tokens", "Number of prefill tokens processed.", self.prompt_tokens)
        counter("vllm:generation_tokens", "Number of generation tokens processed.", self.generation_tokens)
        counter("vllm:request_success", "Count of successfully processed requests.", self.success,
                extra=[("finished_reason", "length")])
        hist("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", self.ttft)
        hist("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", self.itl)
        hist("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", self.e2e)
        hist("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", self.queue)
        hist("vllm:request_prompt_tokens", "Number of prefill tokens processed.", self.prompt_hist)
        hist("vllm:request_generation_tokens", "Number of generation tokens processed.", self.gen_hist)
        family("adaptwin:adapter_loads", "counter", "Adapter activations (CPU to GPU) in the twin.")
        out.append(f"adaptwin:adapter_loads_total{_labels(base)} {_fmt(self.adapter_loads)}")
        gauge("adaptwin:twin_lag_seconds", "How far the twin's clock trails the scaled wall clock (twin s).",
              self.lag_s)
        return ("\n".join(out) + "\n").encode()
