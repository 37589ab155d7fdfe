"""Why the twin calls light near-critical runs starved (issue 4): the closed-loop bias of the gauge fit.

    nice -n 10 .venv/bin/python -m benchmarks.twin_bias_light [--jobs 2] [--iterations 1] [--damping 1] [--seed 0] [--out DIR]

The LoRA step-time terms are fitted on the real runs' *time-averaged* gauges (``twin_fidelity --fit --target tau``):
the per-token time tau = mean running x duration / decode tokens is regressed on features evaluated at mean running,
mean waiting, mean prefill tokens per step. The twin then prices every step with those terms, and its own realized
tau is ``Σ_s running_s·dt_s / decode tokens`` -- a running-weighted mean of its step times, which exceeds the formula
at its mean state wherever batch size and step time move together (bursty admissions when an adapter enters a full
``max_loras`` batch with its backlog). On the light near-critical runs the twin's realized tau is 4-5 % above the
fitted formula at its own state (3 % on served runs), and that gap, fed back through the queue (a slower twin builds
a longer per-adapter backlog, a bigger batch, longer steps), is most of the 2-4 point deficit in completed share.

This script fits the same six LoRA terms *in closed loop*: it simulates every run, records for each the exact
linear map from the terms to the twin's realized tau on that trajectory (``tau_twin = known + c · G`` with
``G_j = Σ_s running_s·f_j(s) / decode tokens``), fits ``c`` so that the twin's tau matches the real run's tau
(relative least squares, non-negative terms, rank slope on the 0.05 grid, as the gauge fit), per leave-one-workload-out
fold, and re-simulates. Pass 0 is the shipped LOWO gauge fit (the baseline, same seed and code); each iteration
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
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from adaptwin.twin.gauges import StepTermsEngine
from benchmarks import twin_fidelity as tf

LORA_KEYS = ("lora_base_ms", "lora_ms_per_seq", "lora_ms_per_prefill_token", "lora_ms_per_adapter",
             "lora_ms_per_adapter_ktoken")


class TauEngine(StepTermsEngine):
    """A :class:`StepTermsEngine` that records the running-weighted sums of its step-time features: the twin's
    realized per-token time is linear in the LoRA terms along a fixed trajectory (diagnostics and fitting only)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.g_known = 0.0  # Σ running·steps·(step time without the LoRA part), ms
        self.g_lora = np.zeros(5)  # Σ running·steps·[1, n_dec, n_pre, A, A·(n_dec+n_pre)/1000] on LoRA steps

    def _account(self, dt: float, steps: int) -> None:
        super()._account(dt, steps)
        load_ms = self._take_load_ms()
        n_run = len(self.running)
        if n_run == 0:
            return
        w = n_run * steps
        n_dec, a = self.n_decode, self.n_adapters
        n_pre = self._prefill_tokens(dt * 1e3 / steps, steps, load_ms)
        base = self._c_base + self._c_dec * n_dec + self._sched_ms() + self._kv_read_ms() + load_ms / steps
        self.g_known += w * (base + self._c_pre * n_pre)
        if a:
            self.g_lora += w * np.array([1.0, n_dec, n_pre, a, a * (n_dec + n_pre) * 1e-3])


def _simulate(args) -> tuple[int, dict]:
    from adaptwin.twin.result import SimResult

    i, r, prof, seed = args
    eng, dur = tf.simulated_engine(r, prof, seed, TauEngine)
    res = SimResult.from_engine(eng, dur)
    s = res.summary()
    fin = res.finished_mask
    decode_tokens = max(1.0, float((res.req["output"][fin] - 1).sum()))
    running_ms = sum(w.running_s for w in eng.windows) * 1e3
    return i, {"total": s["total_throughput"], "ideal": s["ideal_total_throughput"], "starved": s["starved"],
               "itl": s["mean_itl_ms"], "tau": running_ms / decode_tokens, "running": running_ms / 1e3 / dur,
               "known": eng.g_known / decode_tokens, "lora": (eng.g_lora / decode_tokens).tolist()}


def simulate_all(runs, profiles, jobs: int, seed: int = 0) -> list[dict]:
    work = sorted(((i, r, p, seed) for i, (r, p) in enumerate(zip(runs, profiles))),
                  key=lambda w: -float(w[1]["ideal_total_throughput"]))
    out: list[dict] = [None] * len(runs)  # type: ignore[list-item]
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        for i, res in pool.map(_simulate, work, chunksize=1):
            out[i] = res
    return out


def fit_closed_loop(runs, sims) -> dict:
    """LoRA terms whose realized tau on the given trajectories matches the real runs' tau (relative LSQ, c >= 0)."""
    x = np.array([s["lora"] for s in sims])
    y = np.array([r["_tau_ms"] - s["known"] for r, s in zip(runs, sims)])
    lr = np.array([math.log2(max(int(r["max_lora_rank"]), 8) / 8) for r in runs])
    wts = 1.0 / np.array([r["_tau_ms"] for r in runs])
    best = None
    for slope in tf.RANK_SLOPES:
        xf = x * (1 + slope * lr)[:, None]
        active = list(range(x.shape[1]))
        while True:
            coef, *_ = np.linalg.lstsq(xf[:, active] * wts[:, None], y * wts, rcond=None)
            if (coef >= 0).all():
                break
            active.pop(int(np.argmin(coef)))
        full = np.zeros(x.shape[1])
        full[active] = coef
        err = float(np.sum(((xf @ full - y) * wts) ** 2))
        if best is None or err < best[0]:
            best = (err, slope, full)
    _, slope, c = best
    return {**{k: float(v) for k, v in zip(LORA_KEYS, c)}, "lora_rank_slope": float(slope)}


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
    ap.add_argument("--damping", type=float, default=1.0,
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
            sims = simulate_all(runs, profs, args.jobs, args.seed)
            cache.write_text(json.dumps({"sims": sims}))
        label = "gauge fit (shipped), LOWO" if k == 0 else f"closed-loop fit, iteration {k}, LOWO"
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
                fit = fit_closed_loop([runs[i] for i in train], [sims[i] for i in train])
                prev = cur[f"{m}|{w}"]
                terms = {t: args.damping * fit[t] + (1 - args.damping) * prev[t] for t in fit}
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
