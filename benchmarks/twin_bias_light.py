"""Why the twin calls light near-critical runs starved (issue 4): the closed-loop bias of the gauge fit.

    nice -n 10 .venv/bin/python -m benchmarks.twin_bias_light [--jobs 2] [--iterations 1] [--damping 0.5] [--seed 0] [--out DIR]

The LoRA step-time terms are fitted on the real runs' *time-averaged* gauges (``twin_fidelity --fit --target tau``):
the per-token time tau = mean running x duration / decode tokens is regressed on features evaluated at mean running,
mean waiting, mean prefill tokens per step. The twin then prices every step with those terms, and its own realized
tau is ``Σ_s running_s·dt_s / decode tokens`` -- a running-weighted mean of its step times, which exceeds the formula
at its mean state wherever batch size and step time move together (bursty admissions when an adapter enters a full
``max_loras`` batch with its backlog). On the light near-critical runs the twin's realized tau is 4-5 % above the
fitted formula at its own state (3 % on served runs), and that gap, fed back through the queue (a slower twin builds
a longer per-adapter backlog, a bigger batch, longer steps), is most of the 2-4 point deficit in completed share.

This script iterates the closed-loop refit that ``twin_fidelity --fit --closed-loop 1`` ships (one step, damped ½) and
reports the regimes it moves. It fits the same six LoRA terms *in closed loop*: it simulates every run, records for each the exact
linear map from the terms to the twin's realized tau on that trajectory (``tau_twin = known + c · G`` with
``G_j = Σ_s running_s·f_j(s) / decode tokens``), fits ``c`` so that the twin's tau matches the real run's tau
(relative least squares, non-negative terms, rank slope on the 0.05 grid, as the gauge fit), per leave-one-workload-out
fold, and re-simulates. Pass 0 is the open-loop LOWO gauge fit (the baseline, same seed and code); each iteration
refits on the previous pass's trajectories, damped (``--damping d``: d x the refit + (1 - d) x the terms the pass
ran with; undamped, the fixed-point iteration oscillates). Measured (RESULTS.md, Twin): one step with d = 0.5
improves LOWO throughput / ITL sMAPE and the flag agreement for both models on seeds 0 and 1; further steps
trade the overloaded 1.6-rate runs' throughput (+4 %) for agreement -- the five-term form cannot fit both. It reports, per pass and model, LOWO throughput / ITL sMAPE, the
starvation-flag agreement, and the mean completed-share error on the light near-critical runs and on the rest.

Caveat: a fold's trajectories for the *training* runs come from their own folds' profiles (which saw the held-out
workload); the held-out runs' own trajectories never do. Every pass is cached in ``OUT/pass<k>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np

from benchmarks import twin_fidelity as tf


def light_near_critical(r) -> bool:
    share = float(r["total_throughput"]) / float(r["ideal_total_throughput"])
    return r["rates"].startswith("0.1;") and 0.85 <= share < 0.975 and int(r["max_loras"]) < int(r["served_adapters"])


def summarize(runs, sims, label: str) -> dict:
    res = {}
    for m in sorted({r["model"] for r in runs}):
        idx = [i for i, r in enumerate(runs) if r["model"] == m]
        y = [float(runs[i]["total_throughput"]) for i in idx]
        p = [sims[i]["total"] for i in idx]
        itl = tf.smape([float(runs[i]["mean_itl_ms"]) for i in idx], [sims[i]["itl"] for i in idx])
        agree = 100 * np.mean([int(runs[i]["starved"]) == int(sims[i]["starved"]) for i in idx])
        dshare = {True: [], False: []}
        for i in idx:
            real = float(runs[i]["total_throughput"]) / float(runs[i]["ideal_total_throughput"])
            dshare[light_near_critical(runs[i])].append(sims[i]["total"] / sims[i]["ideal"] - real)
        tau_err = [sims[i]["tau"] / runs[i]["_tau_ms"] - 1 for i in idx if light_near_critical(runs[i])]
        res[m] = {"throughput_smape": round(tf.smape(y, p), 2), "itl_smape": round(itl, 2),
                  "agreement_pct": round(float(agree), 2),
                  "disagreements": int(sum(int(runs[i]["starved"]) != int(sims[i]["starved"]) for i in idx)),
                  "share_err_light_nc_pt": round(100 * float(np.mean(dshare[True])), 2),
                  "share_err_rest_pt": round(100 * float(np.mean(dshare[False])), 2),
                  "tau_err_light_nc_pct": round(100 * float(np.mean(tau_err)), 2),
                  "light_nc_runs": len(dshare[True])}
        e = res[m]
        print(f"[{label}] {m}: thr sMAPE {e['throughput_smape']:.2f} %  ITL sMAPE {e['itl_smape']:.2f} %  "
              f"agreement {e['agreement_pct']:.1f} % ({e['disagreements']} runs)  share error: light near-critical "
              f"{e['share_err_light_nc_pt']:+.2f} pt ({e['light_nc_runs']} runs, tau {e['tau_err_light_nc_pct']:+.1f} %), "
              f"rest {e['share_err_rest_pt']:+.2f} pt", flush=True)
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=1, help="closed-loop refits after the gauge-fit pass")
    ap.add_argument("--damping", type=float, default=0.5,
                    help="next terms = d x closed-loop fit + (1 - d) x the terms of the pass they were fitted on")
    ap.add_argument("--seed", type=int, default=0, help="workload seed of every simulation")
    ap.add_argument("--models", default="llama,qwen")
    ap.add_argument("--out", default=".cache/twin_bias_light")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tf.TARGET = "tau"
    models = [tf.MODELS[m] for m in args.models.split(",")]
    runs = [r for r in tf.read_runs() if r["model"] in models]
    # pass 0: the shipped LOWO gauge fit, exactly as twin_fidelity --fit --target tau builds its folds
    bases, profs, cur = {}, [None] * len(runs), {}
    for m in models:
        bases[m] = tf.with_terms(tf.load_profile(m), {"lora_ms_per_prefill_token": 0.0, "lora_rank_slope": 0.0,
                                                    "lora_ms_per_adapter_ktoken": 0.0})
        mine = [r for r in runs if r["model"] == m]
        for w in sorted({r["workload"] for r in mine}):
            train = [r for r in mine if r["workload"] != w]
            cur[f"{m}|{w}"] = tf.fit_terms(train, bases[m])
            fp = tf.with_terms(bases[m], {**cur[f"{m}|{w}"], "early_stop_fraction": tf.fit_early_stop(train)})
            for i, r in enumerate(runs):
                if r["model"] == m and r["workload"] == w:
                    profs[i] = fp
    report = {"load_avg_before": os.getloadavg(), "passes": []}
    for k in range(args.iterations + 1):
        cache = out / f"pass{k}.json"
        t0 = time.time()
        if cache.exists():
            sims = json.loads(cache.read_text())["sims"]
        else:
            sims = tf.simulate_tau(runs, profs, args.jobs, args.seed)
            cache.write_text(json.dumps({"sims": sims}))
        label = "gauge fit (open loop), LOWO" if k == 0 else f"closed-loop fit, iteration {k}, LOWO"
        report["passes"].append({"label": label, "wall_s": round(time.time() - t0, 1),
                                 "models": summarize(runs, sims, label)})
        if k == args.iterations:
            break
        folds = {}
        new = [None] * len(runs)
        for m in models:
            mine = [i for i, r in enumerate(runs) if r["model"] == m]
            for w in sorted({runs[i]["workload"] for i in mine}):
                train = [i for i in mine if runs[i]["workload"] != w]
                terms = tf.fit_closed_loop([runs[i] for i in train], [sims[i] for i in train], cur[f"{m}|{w}"],
                                           args.damping)
                folds[f"{m}|{w}"] = terms
                fp = tf.with_terms(bases[m], {**terms, "early_stop_fraction": tf.fit_early_stop([runs[i] for i in train])})
                for i in mine:
                    if runs[i]["workload"] == w:
                        new[i] = fp
        report["passes"][-1]["next_folds"] = folds
        print(json.dumps(folds, indent=1), flush=True)
        profs, cur = new, folds
    report["load_avg_after"] = os.getloadavg()
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
