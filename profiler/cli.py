"""``adaptwin twin fit``: build a twin profile from profiling CSVs (heavy imports happen when it runs)."""

from __future__ import annotations

import argparse
import json

from adaptwin.cliutil import UserError


def register(sub, twin) -> None:
    p = twin.add_parser("fit", help="fit a twin profile (JSON) from profiling CSVs")
    p.add_argument("--calibration", required=True, help="folder with est_*.csv (e.g. ../shared/data/calibration)")
    p.add_argument("--model", required=True, help="model name, e.g. llama-3.1-8b-instruct")
    p.add_argument("--gpu", default="h100-64gb", help="GPU tag stored in the profile (default h100-64gb)")
    p.add_argument("--out", required=True, help="profile JSON to write (twin/profiles/<gpu>__<model>.json)")
    p.add_argument("--max-model-len", type=int, default=None, help="model context length if not a known model")
    p.add_argument("--real-params", default=None,
                   help="JSON of step-time terms fitted on real runs (benchmarks/twin_fidelity.py --fit)")
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
    out = write_profile(prof, args.out)
    fits = prof["meta"]["fits"]
    print(f"wrote {out}")
    for name, fit in fits.items():
        keys = [k for k in ("n", "rmse", "mape_pct", "r2") if k in fit]
        print(f"  {name:12s} " + "  ".join(f"{k}={fit[k]:.4g}" for k in keys))
    return 0
