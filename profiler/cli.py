"""``adaptwin twin fit``: build a twin profile from profiling CSVs (heavy imports happen when it runs)."""

from __future__ import annotations

import argparse
import json

from adaptwin.cliutil import UserError


def profile_group(sub):
    """The ``adaptwin profile …`` group: created by whichever profile command registers first, then shared."""
    if "profile" in sub.choices:
        parser = sub.choices["profile"]
        return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.add_parser("profile", help="measure a server or adapter kernels to build twin profiles")
    return p.add_subparsers(dest="profile_command", metavar="COMMAND", required=True)


def register(sub, twin) -> None:
    from adaptwin.profiler.vllm_profile_cli import register_profile_vllm

    register_profile_vllm(profile_group(sub))
    from adaptwin.profiler.adapters_cli import register_profile_adapters

    register_profile_adapters(profile_group(sub))
    p = twin.add_parser("fit", help="fit a twin profile (JSON) from profiling CSVs")
    p.add_argument("--calibration", required=True, help="folder with est_*.csv (e.g. ../shared/data/calibration)")
    p.add_argument("--model", required=True, help="model name, e.g. llama-3.1-8b-instruct")
    p.add_argument("--gpu", default="h100-64gb", help="GPU tag stored in the profile (default h100-64gb)")
    p.add_argument("--out", required=True, help="profile JSON to write (twin/profiles/<gpu>__<model>.json)")
    p.add_argument("--max-model-len", type=int, default=None, help="model context length if not a known model")
    p.add_argument("--real-params", default=None,
                   help="JSON of step-time terms fitted on real runs (benchmarks/twin_fidelity.py --fit)")
    p.add_argument("--adapter-table", default=None,
                   help="adapter-family table to carry into the profile: adapter_family__<model>.json or the "
                        "adapters.csv of `adaptwin profile adapters` (docs/adapters.md)")
    p.set_defaults(func=_fit)


def _fit(args: argparse.Namespace) -> int:
    from adaptwin.profiler.fit import FitError, fit_profile, write_profile

    real = None
    if args.real_params:
        try:
            with open(args.real_params) as f:
                real = json.load(f)
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read --real-params {args.real_params}: {err}") from None
        real = real.get(args.model, real) if isinstance(real, dict) else real
    try:
        prof = fit_profile(args.calibration, args.model, args.gpu, max_model_len=args.max_model_len, real_params=real)
    except FitError as err:
        raise UserError(str(err)) from None
    if args.adapter_table:
        from adaptwin.profiler.adapters import load_table

        prof["adapter_family"] = load_table(args.adapter_table, args.model)
    out = write_profile(prof, args.out)
    fits = prof["meta"]["fits"]
    print(f"wrote {out}")
    for name, fit in fits.items():
        keys = [k for k in ("n", "rmse", "mape_pct", "r2") if k in fit]
        print(f"  {name:12s} " + "  ".join(f"{k}={fit[k]:.4g}" for k in keys))
    return 0
