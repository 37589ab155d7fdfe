"""The ``vllm`` backend against ``adaptwin twin serve`` (each in its own process, on this machine).

1. Ceiling: offered request rates (short outputs, max_tokens 8) for a few wall seconds each; per rate the requests/s
   the backend completed, failures, the client's send lag and backlog. Run at speedup 10 so that the simulated
   H100 (about 360 req/s of twin time for these lengths) is not the limit. The ceiling is the highest rate where
   >= 99 % finished and the mean send lag stays under 20 ms.
2. Agreement: at speedup 1 and 10, mean TTFT and ITL measured by the client (from the stream) against what the
   twin served (``GET /adaptwin/served``), per request id.

    python benchmarks/vllm_backend.py [--rates 250,500,750,1000] [--seconds 5] [--json OUT] [--md FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import httpx

from adaptwin.replay.aio import LOOP_KIND
from adaptwin.replay.backends.base import ReplayRequest, ServingConfig
from adaptwin.replay.backends.vllm import VllmBackend
from adaptwin.replay.netstamp import KERNEL_STAMPS

MODEL = "llama-3.1-8b-instruct"


def serve_cmd() -> list[str]:
    """`adaptwin twin serve` as a process."""
    return [sys.executable, "-m", "adaptwin"]


class Served:
    def __init__(self, speedup: float, served: int, max_loras: int):
        cmd = serve_cmd() + ["twin", "serve", "--model", MODEL, "--max-cpu-loras", str(served), "--max-loras",
                             str(max_loras), "--speedup", str(speedup), "--port", "0"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=os.environ | {"PYTHONUNBUFFERED": "1"})
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"twin serve did not start: {line!r}")
        self.url = line.split("listening on ")[1].split()[0]

    def served(self) -> dict:
        return httpx.get(self.url + "/adaptwin/served", timeout=30).json()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(20)


def replay(url: str, speedup: float, reqs, end: float, served: int, max_in_flight: int = 1024):
    b = VllmBackend(url, speedup=speedup, max_in_flight=max_in_flight, timeout_s=60, scrape_interval_s=2.0)
    b.start(ServingConfig(served=served, max_loras=served, max_lora_rank=8, model=MODEL))
    b.submit(reqs)
    done, t = [], 0.0
    t_wall = time.perf_counter()
    while t < end:
        t = min(end, t + 0.5 * speedup)
        done += b.advance(t)
    done += b.finish(end)
    return done, b.stats(), time.perf_counter() - t_wall


def ceiling(rates: list[float], seconds: float, served: int = 16, speedup: float = 10.0) -> list[dict]:
    """``rates`` are wall requests/s. Speedup 10 keeps the simulated H100 far from its own limit (about 360 req/s
    of twin time for these lengths), so what saturates is the HTTP path: the backend and the server."""
    rows = []
    for rate in rates:
        with Served(speedup, served, served) as srv:
            n = int(rate * seconds)
            reqs = [ReplayRequest(f"c{i}", i / rate * speedup, f"lora-{i % served}", 8, 32, 8) for i in range(n)]
            done, st, wall = replay(srv.url, speedup, reqs, end=(seconds + 1.0) * speedup, served=served)
            fin = [c for c in done if c.finished]
            lag = srv.served()["lag_s"]
        rows.append({"offered_rps": rate, "requests": n, "finished": len(fin), "failed": st["failed"],
                     "completed_rps": round(len(fin) / seconds, 1),
                     "finished_share": round(len(fin) / n, 4),
                     "send_lag_ms_mean": round(st["send_lag_ms_mean"], 2),
                     "send_lag_ms_max": round(st["send_lag_ms_max"], 1), "max_backlog": st["max_backlog"],
                     "mean_ttft_ms": round(statistics.mean(c.ttft_ms for c in fin), 2) if fin else None,
                     "server_lag_ms": round(lag * 1e3, 2)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def agreement(speedup: float, trace_s: float, rate: float, prompt: int, output: int, served: int = 8) -> dict:
    with Served(speedup, served, served) as srv:
        n = int(rate * trace_s)
        reqs = [ReplayRequest(f"a{i}", i / rate, f"lora-{i % served}", 8, prompt, output) for i in range(n)]
        done, st, wall = replay(srv.url, speedup, reqs, end=trace_s + 2.0 * speedup, served=served)
        tw = {r["id"]: r for r in srv.served()["requests"]}
    fin = [c for c in done if c.finished and f"cmpl-{c.request_id}" in tw]
    ct = statistics.mean(c.ttft_ms for c in fin)
    tt = statistics.mean(tw[f"cmpl-{c.request_id}"]["ttft_ms"] for c in fin)
    ci = statistics.mean(c.itl_ms for c in fin)
    ti = statistics.mean(tw[f"cmpl-{c.request_id}"]["itl_ms"] for c in fin)
    ce = statistics.mean(c.e2e_ms for c in fin)
    te = statistics.mean(tw[f"cmpl-{c.request_id}"]["e2e_ms"] for c in fin)
    row = {"speedup": speedup, "trace_rps": rate, "wall_rps": rate * speedup, "prompt": prompt, "output": output,
           "finished": len(fin), "requests": n,
           "client_ttft_ms": round(ct, 2), "twin_ttft_ms": round(tt, 2), "ttft_err_pct": round(100 * (ct - tt) / tt, 2),
           "client_itl_ms": round(ci, 2), "twin_itl_ms": round(ti, 2), "itl_err_pct": round(100 * (ci - ti) / ti, 2),
           "client_e2e_ms": round(ce, 2), "twin_e2e_ms": round(te, 2), "e2e_err_pct": round(100 * (ce - te) / te, 2),
           "send_lag_ms_mean": round(st["send_lag_ms_mean"], 2)}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def markdown(res: dict) -> str:
    env = res["env"]
    lines = ["# `vllm` backend vs `twin serve` (benchmarks/vllm_backend.py)", "",
             f"Machine: {env['cpus']} CPUs, load average {env['loadavg']} at start (shared box), Python "
             f"{env['python']}, event loop {env['loop']}, kernel receive stamps {env['kernel_stamps']}; client and "
             f"server in separate processes; {env['date']}.", "",
             "## Ceiling (wall req/s; twin at speedup 10, 16 adapters, prompt 32, max_tokens 8)", "",
             "| offered req/s | completed req/s | finished | failed | send lag mean / max ms | max backlog | "
             "client TTFT ms | twin lag ms |", "|---|---|---|---|---|---|---|---|"]
    for r in res["ceiling"]:
        lines.append(f"| {r['offered_rps']:g} | {r['completed_rps']} | {r['finished_share']:.2%} | {r['failed']} | "
                     f"{r['send_lag_ms_mean']} / {r['send_lag_ms_max']} | {r['max_backlog']} | "
                     f"{r['mean_ttft_ms']} | {r['server_lag_ms']} |")
    lines += ["", f"Ceiling (>= 99 % finished, mean send lag < 20 ms): **{res['ceiling_rps']} req/s**.", "",
              "## Client vs twin timing (mean over finished requests, trace ms)", "",
              "| speedup | wall req/s | prompt/output | TTFT client / twin (err) | ITL client / twin (err) | "
              "e2e client / twin (err) |", "|---|---|---|---|---|---|"]
    for r in res["agreement"]:
        lines.append(f"| {r['speedup']:g} | {r['wall_rps']:g} | {r['prompt']}/{r['output']} | "
                     f"{r['client_ttft_ms']} / {r['twin_ttft_ms']} ({r['ttft_err_pct']:+.1f} %) | "
                     f"{r['client_itl_ms']} / {r['twin_itl_ms']} ({r['itl_err_pct']:+.1f} %) | "
                     f"{r['client_e2e_ms']} / {r['twin_e2e_ms']} ({r['e2e_err_pct']:+.1f} %) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="250,500,750,1000", help="wall requests/s")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args()
    env = {"cpus": os.cpu_count(), "loadavg": [round(x, 1) for x in os.getloadavg()],
           "python": platform.python_version(), "loop": LOOP_KIND, "kernel_stamps": KERNEL_STAMPS,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    rows = ceiling([float(r) for r in args.rates.split(",")], args.seconds)
    ok = [r["offered_rps"] for r in rows if r["finished_share"] >= 0.99 and r["send_lag_ms_mean"] < 20]
    agree = [agreement(1.0, 8.0, 20.0, 512, 16), agreement(10.0, 60.0, 20.0, 512, 16)]
    res = {"env": env, "ceiling": rows, "ceiling_rps": max(ok) if ok else 0, "agreement": agree}
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
