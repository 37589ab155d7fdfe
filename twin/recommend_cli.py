"""``adaptwin recommend`` (DESIGN.md §CLI contract): the best (served adapters, max_loras) for a workload, by the twin.
Heavy imports happen when the command runs."""

from __future__ import annotations

import argparse
import sys

from adaptwin.cliutil import UserError, float_list, int_list, print_json

__all__ = ["register_recommend"]


def register_recommend(sub) -> None:
    rec = sub.add_parser("recommend", help="recommend served adapters and max_loras for a workload (twin)")
    rec.add_argument("--model", required=True,
                     help="llama-3.1-8b-instruct | qwen-2.5-7b-instruct | a --profile's model")
    src = rec.add_argument_group("workload (one of --rates, --trace, --lake-run)")
    src.add_argument("--rates", type=float_list, default=None,
                     help="per-adapter-group Poisson rates (req/s), round-robin over the served adapters")
    src.add_argument("--ranks", type=int_list, default=None,
                     help="per-adapter-group LoRA ranks, e.g. 8,16,32 (with --trace: the ranks ingest assigns to a "
                          "trace without adapter columns; with --lake-run: round-robin over the run's adapters)")
    src.add_argument("--trace", default=None, metavar="FILE",
                     help="derive the workload from a trace (any ingest format or a shipped name): one rate group "
                          "per adapter, its offered tokens/s as request equivalents")
    src.add_argument("--format", default=None, help="with --trace: azure|mooncake|servegen|csv|parquet (default: "
                                                    "detected)")
    src.add_argument("--adapters", type=int, default=None,
                     help="with --trace: adapters to assign to a trace without adapter columns (as ingest does)")
    src.add_argument("--lake-run", default=None, metavar="RUN",
                     help="derive the workload from a replay run's windows in the lake (per-adapter offered tokens)")
    src.add_argument("--last-windows", type=int, default=None, metavar="N",
                     help="with --lake-run: only the run's last N windows (the recent traffic)")
    src.add_argument("--lake", default=None, help="with --lake-run: lake root (default $ADAPTWIN_LAKE or ./lake)")
    rec.add_argument("--grid", type=int_list, default=None,
                     help="values both knobs may take (max_loras <= served), e.g. the paper's "
                          "16,32,64,96,128,160,192,256,320,384; default: every integer 1..--max-served")
    rec.add_argument("--max-served", type=int, default=384,
                     help="largest served-adapter count without --grid (default 384, the paper's)")
    rec.add_argument("--max-lora-rank", type=int, default=None, help="vLLM --max-lora-rank (default max rank)")
    rec.add_argument("--duration", type=float, default=3600.0, help="simulated window per run, s (default 3600)")
    rec.add_argument("--seeds", type=int, default=1,
                     help="arrival processes per configuration (seeds 0..N-1; default 1); with N > 1 ties within "
                          "noise go to the configuration with more margin to starvation")
    rec.add_argument("--exhaustive", action="store_true",
                     help="the paper's walk on full runs of every grid point up to each slot value's first starving "
                          "one (default: bisection with early-stopped probes)")
    rec.add_argument("--top", type=int, default=5, help="runners-up to show (default 5)")
    rec.add_argument("--profile", default=None, help="profile JSON (default: the shipped one for --model)")
    rec.add_argument("--json", action="store_true", help="print the recommendation as one JSON line")
    rec.set_defaults(func=_recommend)


def _recommend(args: argparse.Namespace) -> int:
    from adaptwin.twin.config import ConfigError
    from adaptwin.twin.profile import ProfileError, load_profile
    from adaptwin.twin.search import Workload, search

    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    given = [name for name, v in (("--rates", args.rates), ("--trace", args.trace), ("--lake-run", args.lake_run))
             if v is not None]
    if len(given) != 1:
        raise UserError("give the workload one way: --rates with --ranks, --trace FILE, or --lake-run RUN"
                        + (f" (got {' and '.join(given)})" if given else ""))
    if args.rates is not None and not args.ranks:
        raise UserError("--rates needs --ranks (one rank per rate group, or one for all), e.g. --ranks 8,16,32")
    if args.grid is not None and not args.grid:
        raise UserError("--grid is empty: give at least one value, e.g. --grid 16,32,64")
    bar = None
    try:
        prof = load_profile(args.model, path=args.profile)
        rates, ranks = _workload(args, prof.model)
        wl = Workload(prof.model, rates, ranks, duration=args.duration,
                      seeds=tuple(range(args.seeds)), max_lora_rank=args.max_lora_rank)
        from tqdm import tqdm

        bar = tqdm(desc="recommend", unit="run", file=sys.stderr)
        rec = search(wl, grid=args.grid, exhaustive=args.exhaustive, max_served=args.max_served, profile=prof,
                     on_run=lambda s, g: (bar.set_postfix_str(f"served {s} max_loras {g}", refresh=False),
                                          bar.update(1)))
    except (ConfigError, ProfileError) as err:
        raise UserError(str(err)) from None
    finally:
        if bar is not None:
            bar.close()
    out = rec.summary(top=args.top)
    for note in rec.notes:
        print(f"adaptwin recommend: {note}", file=sys.stderr)
    if args.json:
        print_json(out)
        return 0
    b = rec.best
    state = "STARVES (every candidate starves; least-starved shown)" if rec.all_starve else "does not starve"
    print(f"recommend: --max-cpu-loras {b.served} --max-loras {b.max_loras}   ({state})")
    print(f"  predicted throughput  {b.total_throughput:.1f} tok/s of {b.ideal_total_throughput:.1f} offered"
          + (f" (± {b.throughput_std:.1f} over {b.seeds} seeds)" if b.seeds > 1 else ""))
    print(f"  margin to starvation  {b.margin * 100:+.2f} % of offered tokens (starved at >= 10 % unfinished)"
          + (f"; starves from {b.served + rec.headroom} served adapters" if rec.headroom is not None else ""))
    if out["unstartable_max_loras"]:
        print(f"  vLLM cannot start     max_loras {out['unstartable_max_loras']} at max_lora_rank {wl.max_lora_rank}")
    if out["runners_up"]:
        print("  runners-up (best per max_loras):")
        print(f"    {'served':>6} {'max_loras':>9} {'tok/s':>10} {'starvation':>10} {'starved':>7}")
        for r in out["runners_up"]:
            print(f"    {r['served']:>6} {r['max_loras']:>9} {r['total_throughput']:>10.1f} "
                  f"{r['starvation_ratio']:>10.3f} {r['starved']:>7}")
    print(f"  method {rec.method}: {rec.runs} twin runs ({rec.early_stopped} stopped once their verdict was "
          f"settled), {rec.configs} configurations, {rec.wall_s:.1f} s")
    return 0


def _workload(args: argparse.Namespace, model: str) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Rates and ranks from the flags, a trace or a lake run (twin/observed.py); says on stderr what was derived."""
    if args.rates is not None:
        return tuple(args.rates), tuple(args.ranks)
    from adaptwin import config
    from adaptwin.twin import observed

    if args.trace is not None:
        obs = observed.from_trace(args.trace, model, fmt=args.format, adapters=args.adapters,
                                  ranks=tuple(args.ranks or (8,)))
    else:
        if args.last_windows is not None and args.last_windows < 1:
            raise UserError(f"--last-windows must be >= 1, got {args.last_windows}")
        obs = observed.from_lake(config.lake(args.lake), args.lake_run, model, last_windows=args.last_windows,
                                 ranks=tuple(args.ranks) if args.ranks else None)
    print(f"adaptwin recommend: workload of {obs.source}: {len(obs.rates)} adapters over {obs.span_s:.0f} s, "
          f"{obs.offered_tokens_per_s:,.0f} offered tok/s, busiest {obs.rates[0]:.3g} req/s", file=sys.stderr)
    return obs.rates, obs.ranks
