"""``adaptwin twin serve`` (DESIGN.md §CLI contract): the twin behind vLLM's HTTP API, in scaled real time.

``replay/cli.py``'s ``register(sub, twin)`` calls :func:`register_serve` (one line). Standard library only at
import time; the server is imported when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from adaptwin.cliutil import UserError, int_list

log = logging.getLogger("adaptwin.replay.serve_cli")


def register_serve(twin) -> None:
    p = twin.add_parser("serve", help="serve the twin over vLLM's OpenAI-compatible HTTP API (scaled real time)",
                        description="A vLLM look-alike backed by the twin: /v1/models, /v1/completions (streamed: "
                                    "one SSE event per token), /v1/load_lora_adapter, /v1/unload_lora_adapter, "
                                    "/health, /metrics with vLLM's metric names. Adapters lora-0 … lora-(N-1) are "
                                    "registered at start. See docs/twin-serve.md.")
    p.add_argument("--model", required=True, help="llama-3.1-8b-instruct | qwen-2.5-7b-instruct | a --profile's model")
    p.add_argument("--max-cpu-loras", type=int, required=True, help="adapters registered at start (lora-0 … lora-N-1)")
    p.add_argument("--max-loras", type=int, required=True, help="adapter slots per batch")
    p.add_argument("--max-lora-rank", type=int, default=None, help="default max(--ranks)")
    p.add_argument("--ranks", type=int_list, default=[8], help="adapter lora-k has rank ranks[k mod len] (default 8)")
    p.add_argument("--speedup", type=float, default=1.0, help="twin seconds per wall second (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port, printed)")
    p.add_argument("--profile", default=None, help="profile JSON (default: the shipped one for --model)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (default the model's)")
    p.add_argument("--max-num-seqs", type=int, default=2048)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--no-register-at-start", action="store_true",
                   help="start without adapters (they come through /v1/load_lora_adapter)")
    p.add_argument("--no-runtime-lora-updating", action="store_true",
                   help="no /v1/load_lora_adapter or /v1/unload_lora_adapter (vLLM without "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (default $VLLM_API_KEY, as vLLM; unset = open)")
    f = p.add_argument_group("fault injection (completions only)")
    f.add_argument("--fault-latency-ms", type=float, default=0.0, help="extra delay before every answer (wall ms)")
    f.add_argument("--fault-error-rate", type=float, default=0.0, help="share of requests answered with an error")
    f.add_argument("--fault-error-status", type=int, default=500, help="status of injected errors (default 500)")
    f.add_argument("--fault-reset-rate", type=float, default=0.0, help="share of connections reset before answering")
    f.add_argument("--fault-midstream-reset-rate", type=float, default=0.0,
                   help="share of streams reset after half of their tokens")
    f.add_argument("--fault-stall-rate", type=float, default=0.0, help="share of requests never answered")
    f.add_argument("--fault-seed", type=int, default=0)
    f.add_argument("--fault-endpoint", action="store_true",
                   help="enable POST/GET /fault to change the faults at run time (JSON body, see docs)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import os
    import signal

    from adaptwin.replay.aio import run
    from adaptwin.replay.serve import FaultError, Faults, ServeConfig, TwinServer
    from adaptwin.twin.config import ConfigError
    from adaptwin.twin.profile import ProfileError

    try:
        faults = Faults(latency_ms=args.fault_latency_ms, error_rate=args.fault_error_rate,
                        error_status=args.fault_error_status, reset_rate=args.fault_reset_rate,
                        midstream_reset_rate=args.fault_midstream_reset_rate, stall_rate=args.fault_stall_rate,
                        seed=args.fault_seed)
        cfg = ServeConfig(model=args.model, max_cpu_loras=args.max_cpu_loras, max_loras=args.max_loras,
                          ranks=tuple(args.ranks), max_lora_rank=args.max_lora_rank, speedup=args.speedup,
                          host=args.host, port=args.port, max_model_len=args.max_model_len,
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          profile=args.profile, runtime_lora_updating=not args.no_runtime_lora_updating,
                          register_at_start=not args.no_register_at_start, faults=faults,
                          fault_endpoint=args.fault_endpoint,
                          api_key=args.api_key or os.environ.get("VLLM_API_KEY") or None)
        server = TwinServer(cfg)
    except (ValueError, FaultError, ConfigError, ProfileError) as err:
        raise UserError(str(err)) from None

    async def main() -> None:
        try:
            await server.start()
        except OSError as err:
            raise UserError(f"cannot listen on {cfg.host}:{cfg.port}: {err}; pick another --port") from None
        print(f"twin serve: listening on {server.url} (model {cfg.model}, {cfg.max_cpu_loras} adapters, "
              f"max_loras {cfg.max_loras}, speedup {cfg.speedup:g})", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        print("twin serve: stopping", file=sys.stderr, flush=True)
        await server.close()

    run(main())
    return 0
