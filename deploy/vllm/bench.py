"""Concurrent streamed completions against a running vLLM (or twin) server: output tokens/s, TTFT, ITL.

Runs with the project venv (httpx only)::

    .venv/bin/python deploy/vllm/bench.py --url http://127.0.0.1:PORT --concurrency 4 --requests 16 \
        --max-tokens 128 --models tiny,lora-0,lora-1

Each request streams `/v1/completions` with ``ignore_eos`` so it yields exactly ``--max-tokens`` token events; models
are assigned round-robin. Prints one JSON object on the last line of stdout. Also reports the RSS of the server's
process group when ``--pid-file`` names serve.sh's pid file (Linux /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx


async def one(client: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices")
            if choices:
                stamps.append(time.perf_counter())
                # vLLM merges deltas into one event when the API server falls behind the engine, so count
                # tokens by their ids, not by events (docs/vllm-cpu.md). A server without token ids: 1 per event.
                ids = choices[0].get("token_ids")
                tokens += len(ids) if ids is not None else 1
    return {"model": model, "tokens": tokens, "events": len(stamps), "ttft": stamps[0] - t0 if stamps else None,
            "itl": [b - a for a, b in zip(stamps, stamps[1:])], "e2e": time.perf_counter() - t0}


def group_memory_mib(pid_file: Path) -> dict | None:
    """RSS and PSS (shared pages split between processes) summed over the server's process group."""
    try:
        pgid = int(pid_file.read_text())
    except (OSError, ValueError):
        return None
    rss = pss = 0
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getpgid(int(d.name)) != pgid:
                continue
            for line in (d / "smaps_rollup").read_text().splitlines():
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except (OSError, ProcessLookupError):
            continue
    return {"rss_mib": round(rss / 1024), "pss_mib": round(pss / 1024)}


async def run(args: argparse.Namespace) -> dict:
    models = [m for m in args.models.split(",") if m]
    prompt = " ".join(["the adapter serves a batch of tokens"] * max(1, args.prompt_words // 7))
    sem = asyncio.Semaphore(args.concurrency)
    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout) as client:
        async def guarded(i: int) -> dict:
            async with sem:
                return await one(client, models[i % len(models)], prompt, args.max_tokens)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(guarded(i) for i in range(args.requests)))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    itl = [x for r in results for x in r["itl"]]
    out = {
        "requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "models": models, "output_tokens": tokens, "wall_s": round(wall, 3),
        "output_tok_per_s": round(tokens / wall, 1),
        "exact_token_counts": all(r["tokens"] == args.max_tokens for r in results),
        "one_event_per_token": all(r["events"] == r["tokens"] for r in results),
        "mean_ttft_ms": round(1000 * statistics.mean(r["ttft"] for r in results if r["ttft"] is not None), 1),
        "mean_itl_ms": round(1000 * statistics.mean(itl), 2) if itl else None,
    }
    if args.pid_file:
        out["server_memory"] = group_memory_mib(Path(args.pid_file))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--models", default="tiny")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-words", type=int, default=28)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--pid-file", default=None)
    args = ap.parse_args(argv)
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
