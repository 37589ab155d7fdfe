"""``adaptwin profile vllm``: calibrate the twin against a live vLLM (or ``twin serve``) — see docs/profiler.md.

Standard library only at import time; the profiler is imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys

from adaptwin.cliutil import UserError, int_list, print_json

__all__ = ["register_profile_vllm"]


def _pairs(text: str) -> list[tuple[int, int]]:
    """'1:8,4:8,8:16' → [(1, 8), (4, 8), (8, 16)] (max_loras:max_lora_rank)."""
    try:
        out = []
        for part in text.replace(";", ",").split(","):
            if part.strip():
                g, r = part.split(":")
                out.append((int(g), int(r)))
        return out
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected max_loras:max_lora_rank pairs like 1:8,4:16, got {text!r}") \
            from None


def register_profile_vllm(profile_sub) -> None:
    p = profile_sub.add_parser(
        "vllm", help="run the paper's calibration experiments against a vLLM server (or twin serve)",
        description="Measures decode step time vs running requests, LoRA overhead vs distinct adapters per batch, "
                    "prefill, adapter loading time, KV capacity and the scheduler's cost of skipped waiting "
                    "requests against a live server, and writes CSVs in the schemas of the paper's calibration "
                    "data plus profile_vllm.json; `adaptwin twin fit --calibration OUT` makes the profile. "
                    "--launch -- CMD starts the server itself (needed for --kv-grid and --loading-ranks: one "
                    "start-up per configuration; --port/--max-loras/--max-lora-rank are appended, or filled into "
                    "{port}/{max_loras}/{max_lora_rank}). See docs/profiler.md.")
    p.add_argument("--url", default=None, help="a running server, e.g. http://127.0.0.1:8000")
    p.add_argument("--out", required=True, help="folder for the CSVs and profile_vllm.json")
    p.add_argument("--quick", action="store_true", help="the small grid (minutes on vLLM, seconds on twin serve)")
    p.add_argument("--model", default=None, help="model name for the CSVs/profile (default: the server's base model)")
    p.add_argument("--speedup", type=float, default=None,
                   help="server seconds per wall second (default: twin serve's own, 1 for vLLM)")
    p.add_argument("--ranks", type=int_list, default=None,
                   help="adapter k has rank ranks[k mod len] (default: read from the adapters' peft configs)")
    p.add_argument("--max-loras", type=int, default=None,
                   help="the server's --max-loras (default: from vllm:lora_requests_info; --launch: 1)")
    p.add_argument("--max-lora-rank", type=int, default=None, help="the server's --max-lora-rank "
                   "(default: the largest adapter rank)")
    p.add_argument("--experiments", default=None,
                   help="comma list out of decode,lora,prefill,loading,scheduler,kv (default all)")
    p.add_argument("--decode-batches", type=int_list, default=None, help="N for the decode runs")
    p.add_argument("--adapter-counts", type=int_list, default=None, help="A for the LoRA overhead runs")
    p.add_argument("--lora-batches", type=int_list, default=None, help="N for the LoRA overhead runs")
    p.add_argument("--prefill-tokens", type=int_list, default=None, help="prompt lengths of the prefill runs")
    p.add_argument("--output-tokens", type=int, default=None, help="output tokens of the decode runs")
    p.add_argument("--waiting", type=int_list, default=None, help="waiting requests of the scheduler runs")
    p.add_argument("--repeats", type=int, default=None, help="repetitions of the one-request (prefill, loading) runs")
    p.add_argument("--loading-repeats", type=int, default=None,
                   help="cycles over max_loras + 1 adapters in the loading runs (default 2 x --repeats)")
    p.add_argument("--batch-repeats", type=int, default=None,
                   help="shots per decode/LoRA batch, the fastest kept (default 1; 3 on a shared machine)")
    p.add_argument("--kv-grid", type=_pairs, default=None,
                   help="--launch: max_loras:max_lora_rank start-ups for the KV capacity, e.g. 1:8,4:8,4:16")
    p.add_argument("--loading-ranks", type=int_list, default=None,
                   help="--launch: max_lora_rank values for the loading-time runs (max_loras 1)")
    p.add_argument("--token-ids", type=int_list, default=None,
                   help="LO,HI: prompts are random token ids in [LO, HI) (default 100,400; inside any vocabulary)")
    p.add_argument("--itl-from", choices=["client", "server"], default="client",
                   help="decode ITL from token times inside the window where all N decode (client, default) or "
                        "from the server's vllm:inter_token_latency_seconds against the running-requests gauge "
                        "(server: the paper's way; immune to an API process that delivers tokens in bursts)")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="seconds a server may take to answer")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line (last line of stdout)")
    p.add_argument("--launch", action="store_true",
                   help="start the server from the COMMAND after '--' (its own process group) instead of --url")
    p.add_argument("server_command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    from adaptwin.profiler.vllm_profile import EXPERIMENTS, ProfileSettings, ServerError, run_profile

    launch = list(args.server_command or [])
    if launch and launch[0] == "--":
        launch = launch[1:]
    if args.launch and not launch:
        raise UserError("--launch needs the server command after '--', e.g. --launch -- python -m "
                        "vllm.entrypoints.openai.api_server --model DIR --enable-lora ...")
    if launch and not args.launch:
        raise UserError(f"unexpected arguments {' '.join(launch[:3])} …; a server command needs --launch --")
    if bool(args.url) == bool(launch):
        raise UserError("give exactly one of --url URL (a running server) or --launch -- COMMAND ...")
    kw = {"out": Path(args.out), "url": args.url, "launch": launch or None, "model": args.model,
          "speedup": args.speedup, "ranks": args.ranks, "max_loras": args.max_loras,
          "max_lora_rank": args.max_lora_rank, "ready_timeout_s": args.ready_timeout,
          "itl_from": args.itl_from}
    for name in ("decode_batches", "adapter_counts", "lora_batches", "prefill_tokens", "output_tokens", "waiting",
                 "kv_grid", "loading_ranks", "repeats", "batch_repeats", "loading_repeats"):
        if getattr(args, name) is not None:
            kw[name] = getattr(args, name)
    if args.token_ids is not None:
        if len(args.token_ids) != 2 or not 0 <= args.token_ids[0] < args.token_ids[1]:
            raise UserError(f"--token-ids needs LO,HI with 0 <= LO < HI, got {args.token_ids}")
        kw["token_ids"] = tuple(args.token_ids)
    if args.experiments:
        wanted = [e.strip() for e in args.experiments.split(",") if e.strip()]
        bad = [e for e in wanted if e not in EXPERIMENTS]
        if bad:
            raise UserError(f"unknown experiment(s) {bad}; choose from {', '.join(EXPERIMENTS)}")
        kw["experiments"] = wanted
    if args.speedup is not None and not args.speedup > 0:
        raise UserError(f"--speedup must be > 0, got {args.speedup}")
    settings = ProfileSettings.quick_defaults(**kw) if args.quick else ProfileSettings(**kw)
    if launch and not settings.kv_grid and "kv" in settings.experiments:
        settings.kv_grid = [(1, 8), (2, 8), (2, 16)] if args.quick else [(1, 8), (2, 8), (4, 8), (2, 16), (4, 16)]

    from tqdm import tqdm

    bar = tqdm(desc="profile vllm", unit="step", file=sys.stderr, disable=None)

    def progress(msg: str) -> None:
        bar.set_postfix_str(msg[:60])
        bar.update(1)

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    try:
        summary = run_profile(settings, progress)
    except ServerError as err:
        raise UserError(str(err)) from None
    finally:
        bar.close()
    if args.json:
        print_json(summary)
    else:
        print(f"profile vllm: wrote {', '.join(summary['files'])} and profile_vllm.json to {summary['out']} "
              f"in {summary['wall_s']:.1f} s")
        for note in summary["notes"]:
            print(f"  note: {note}")
        print(f"next: adaptwin twin fit --calibration {summary['out']} --model {summary['model']} --gpu GPU --out "
              "PROFILE.json")
    return 0
