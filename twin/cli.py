"""``adaptwin twin run`` and ``adaptwin twin validate`` (DESIGN.md §CLI contract). Heavy imports happen lazily."""

from __future__ import annotations

import argparse
import logging
import sys

from adaptwin.cliutil import UserError, float_list, int_list, print_json
from adaptwin.twin.recommend_cli import register_recommend

log = logging.getLogger("adaptwin.twin.cli")


def register(sub, twin) -> None:
    register_recommend(sub)
    run = twin.add_parser("run", help="simulate one vLLM server configuration")
    run.add_argument("--model", required=True, help="llama-3.1-8b-instruct | qwen-2.5-7b-instruct | a --profile's model")
    run.add_argument("--rates", type=float_list, help="per-adapter-group Poisson rates (req/s), e.g. 0.1,0.05,0.025")
    run.add_argument("--ranks", type=int_list, help="per-adapter-group LoRA ranks, e.g. 8,16,32")
    run.add_argument("--served", type=int, required=True, help="served adapters (vLLM --max-cpu-loras)")
    run.add_argument("--max-loras", type=int, required=True, help="adapter slots per batch (vLLM --max-loras)")
    run.add_argument("--max-lora-rank", type=int, default=None, help="vLLM --max-lora-rank (default max rank)")
    run.add_argument("--duration", type=float, default=3600.0, help="window in seconds (default 3600)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--profile", default=None, help="profile JSON (default: the shipped one for --model)")
    run.add_argument("--trace", default=None, help="replay this trace file (any ingest format) instead of --rates")
    run.add_argument("--trace-format", default=None, help="ingest format of --trace (default: from the file name)")
    run.add_argument("--max-num-seqs", type=int, default=2048, help="vLLM --max-num-seqs (default 2048, as the paper)")
    run.add_argument("--max-num-batched-tokens", type=int, default=2048, help="step token budget (default 2048)")
    run.add_argument("--max-model-len", type=int, default=None, help="context limit (default the model's)")
    run.add_argument("--adapter-family", default="lora", choices=("lora", "parallel", "series", "fused"),
                     help="price the LoRA step terms for this adapter family from the profile's adapter_family "
                          "table (docs/adapters.md; default lora)")
    run.add_argument("--window", type=float, default=60.0, help="statistics window (s)")
    run.add_argument("--requests-out", default=None, help="write per-request table (Parquet)")
    run.add_argument("--windows-out", default=None, help="write per-window table (Parquet)")
    run.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    run.set_defaults(func=_run)

    val = twin.add_parser("validate", help="simulate every row of a scenario CSV")
    val.add_argument("--scenarios", required=True, help="CSV: model,rates,ranks,served_adapters,max_loras,max_lora_rank,duration_s")
    val.add_argument("--out", required=True, help="output CSV (input columns + sim_*)")
    val.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    val.add_argument("--seed", type=int, default=0)
    val.add_argument("--duration", type=float, default=None, help="override duration_s of every row")
    val.add_argument("--json", action="store_true", help="print a one-line JSON summary (rows, errors, wall_s)")
    val.set_defaults(func=_validate)


def _run(args: argparse.Namespace) -> int:
    from adaptwin.twin.config import ConfigError
    from adaptwin.twin.profile import ProfileError, load_profile
    from adaptwin.twin.runner import run_scenario

    try:
        prof = load_profile(args.model, path=args.profile)
        if args.adapter_family != "lora":
            prof.family_scale(args.adapter_family)
        kw = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  max_model_len=args.max_model_len, adapter_family=args.adapter_family)
        if args.trace:
            from adaptwin.twin.trace import load_trace

            arrivals, adapter_ranks, served = load_trace(args.trace, args.trace_format, served=args.served,
                                                         ranks=args.ranks or [8])
            res = run_scenario(prof.model, args.rates or [0.0], args.ranks or [8], served, args.max_loras,
                               args.max_lora_rank, args.duration, args.seed, profile=prof, arrivals=arrivals,
                               adapter_ranks=adapter_ranks, window_s=args.window, **kw)
        else:
            if not args.rates or not args.ranks:
                raise UserError("give --rates and --ranks (or --trace FILE)")
            res = run_scenario(prof.model, args.rates, args.ranks, args.served, args.max_loras, args.max_lora_rank,
                               args.duration, args.seed, profile=prof, window_s=args.window, **kw)
    except (ConfigError, ProfileError) as err:
        raise UserError(str(err)) from None
    summary = res.summary()
    if args.requests_out or args.windows_out:
        import pyarrow.parquet as pq

        if args.requests_out:
            pq.write_table(res.requests, args.requests_out)
        if args.windows_out:
            pq.write_table(res.windows, args.windows_out)
    if args.json:
        print_json(summary)
    else:
        for k, v in summary.items():
            print(f"{k:24s} {v}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    import time

    from adaptwin.twin.config import ConfigError
    from adaptwin.twin.validate import read_scenarios, run_rows, write_output

    if args.jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {args.jobs}")
    t0 = time.perf_counter()
    try:
        header, rows = read_scenarios(args.scenarios)
    except ConfigError as err:
        raise UserError(str(err)) from None
    sims = run_rows(rows, jobs=args.jobs, progress=True, seed=args.seed, duration=args.duration)
    write_output(args.out, header, rows, sims)
    errors = sum(1 for s in sims if s.get("sim_error"))
    for i, s in enumerate(sims):
        if s.get("sim_error"):
            log.warning("row %d: %s", i + 1, s["sim_error"])
    out = {"rows": len(rows), "errors": errors, "out": args.out, "wall_s": round(time.perf_counter() - t0, 3)}
    if args.json:
        print_json(out)
    else:
        print(f"wrote {args.out}: {len(rows)} rows, {errors} errors, {out['wall_s']} s", file=sys.stderr)
    return 0
