"""Where the `vllm` backend's extra TTFT against `twin serve` comes from, per request, on this machine's one
monotonic clock: client send → the server's arrival stamp, and the server's intended first-token time → the client's
receipt of it (emission lateness + transit back + the client's parsing), in wall ms.

    python -m benchmarks.ttft_breakdown [--speedups 1,2,5,10] [--seconds 5] [--rate 20]

A wall-time overhead of d ms counts d × speedup trace ms against the TTFT the twin served.
"""

from __future__ import annotations

import argparse
import statistics

from adaptwin.replay.backends.base import ReplayRequest
from adaptwin.replay.backends.vllm import VllmBackend
from benchmarks import vllm_backend as vb

_stamps: dict[str, tuple[float | None, float | None]] = {}
_completion = VllmBackend._completion


def _recording_completion(self, r, prog, due, error=None, unfinished=False):
    _stamps[r.request_id] = (prog.sent, prog.first)  # perf_counter of the send and of the first token
    return _completion(self, r, prog, due, error=error, unfinished=unfinished)


def breakdown(speedup: float, seconds: float, rate: float, prompt: int = 512, output: int = 16,
              served: int = 8) -> dict:
    """``rate`` trace requests/s for ``seconds`` wall seconds at ``speedup``."""
    trace_s = seconds * speedup
    _stamps.clear()
    with vb.Served(speedup, served, served) as srv:
        reqs = [ReplayRequest(f"a{i}", i / rate, f"lora-{i % served}", 8, prompt, output)
                for i in range(int(rate * trace_s))]
        done, _, _ = vb.replay(srv.url, speedup, reqs, end=trace_s + 2.0 * speedup, served=served)
        info = srv.served()
    t0, sp = info["start_perf_counter"], info["speedup"]
    twin = {r["id"]: r for r in info["requests"]}
    rows = []
    for c in done:
        r = twin.get(f"cmpl-{c.request_id}")
        sent, first = _stamps.get(c.request_id, (None, None))
        if c.finished and r is not None and sent is not None and first is not None:
            arrival = t0 + r["arrival_s"] / sp
            intended_first = t0 + (r["arrival_s"] + r["ttft_ms"] / 1e3) / sp
            rows.append(((arrival - sent) * 1e3, (first - intended_first) * 1e3, c.ttft_ms, r["ttft_ms"]))
    tin, tout, client, served_ttft = (list(x) for x in zip(*rows))
    return {"speedup": speedup, "requests": len(rows), "client_ttft_ms": statistics.mean(client),
            "twin_ttft_ms": statistics.mean(served_ttft),
            "ttft_err_pct": 100 * (statistics.mean(client) / statistics.mean(served_ttft) - 1),
            "send_to_arrival_ms": statistics.mean(tin), "first_token_to_client_ms": statistics.mean(tout),
            "send_to_arrival_p90_ms": statistics.quantiles(tin, n=10)[-1],
            "first_token_to_client_p90_ms": statistics.quantiles(tout, n=10)[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--speedups", default="1,2,5,10")
    ap.add_argument("--seconds", type=float, default=5.0, help="wall seconds per speedup")
    ap.add_argument("--rate", type=float, default=20.0, help="trace requests/s (prompt 512, output 16)")
    args = ap.parse_args()
    VllmBackend._completion = _recording_completion
    print("| speedup | requests | TTFT client / twin (err) | send → arrival, wall ms (p90) "
          "| intended first token → client, wall ms (p90) |\n|---|---|---|---|---|")
    for s in (float(x) for x in args.speedups.split(",")):
        b = breakdown(s, args.seconds, args.rate)
        print(f"| {s:g} | {b['requests']} | {b['client_ttft_ms']:.2f} / {b['twin_ttft_ms']:.2f} "
              f"({b['ttft_err_pct']:+.1f} %) | {b['send_to_arrival_ms']:.3f} ({b['send_to_arrival_p90_ms']:.3f}) "
              f"| {b['first_token_to_client_ms']:.3f} ({b['first_token_to_client_p90_ms']:.3f}) |", flush=True)


if __name__ == "__main__":
    main()
