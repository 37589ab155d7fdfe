"""Twin fidelity against the paper's 294 real vLLM runs (scenarios_table1.csv), with leave-one-workload-out CV.

    .venv/bin/python -m benchmarks.twin_fidelity [--jobs 2] [--fit] [--models llama,qwen] [--out DIR]

Without ``--fit`` it simulates every real run with the shipped profiles and reports, per model, the textbook sMAPE
of total throughput and mean ITL and the starvation-flag agreement.

With ``--fit`` it also estimates the step-time terms the profiling runs cannot identify (the LoRA terms: per step,
per decode token, per prefill token, per distinct adapter, per adapter x 1000 tokens, and the max-rank slope) from the real runs' own gauges
(mean running requests, mean waiting, ITL) by least squares and reports
  * in-sample: every run simulated with terms fitted on all runs of its model;
  * leave-one-workload-out (LOWO): every run simulated with terms fitted on the other three workloads
    (rates x ranks) of its model, i.e. on data that never saw that workload.
``--target tau`` (default, shipped) fits the per-token step time of each run by Little's law (mean running x duration /
decode tokens) instead of its reported mean ITL (``--target itl``). The early-EOS share (``early_stop_fraction``) is
estimated from the fully served runs' output tokens against their pool's ``max_tokens``, with the same folds.
The all-runs terms are written to ``OUT/real_params.json`` (shipped as ``twin/real_params.json``);
``adaptwin twin fit --real-params twin/real_params.json`` puts them in a profile.

``--closed-loop K`` (default and shipped: 1, ``--damping 0.5``) then refits the LoRA terms K times *on the twin's own
trajectories*: every run is simulated with the current terms (in-sample and per fold), the twin's τ is exactly linear
in the LoRA terms along that trajectory (:class:`adaptwin.twin.gauges.GaugeEngine`), and the terms are refitted so
that it matches the real τ, damped. The open-loop gauge fit prices the terms at the runs' *mean* state and the twin
then pays them on every step, where batch size and step time move together: it is 3-6 % slow on near-critical runs.
Caveat: a fold's training trajectories come from the training runs' own folds (which saw the held-out workload);
the held-out runs' trajectories never do.

``--rank-form kernel`` (default, shipped) fits no rank slope: what a max_lora_rank above 16 adds to a step is the
measured LoRA-kernel cost (``profiler/measured/lora-kernels/lora_kernels.json``, ``profiler/gpu_lora_kernels.py``),
part of the known step time like the calibration's terms, and written into ``real_params.json`` as measured.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from adaptwin.twin.profile import load_profile, rank_blocks

SCENARIOS = Path(os.environ.get("ADAPTWIN_SHARED", "/work/shared")) / "data" / "validation"
MODELS = {"llama": "llama-3.1-8b-instruct", "qwen": "qwen-2.5-7b-instruct"}
POOL_PROMPT = {"llama-3.1-8b-instruct": 221.05, "qwen-2.5-7b-instruct": 219.60}
POOL_TOTAL = {"llama-3.1-8b-instruct": 419.97, "qwen-2.5-7b-instruct": 422.47}
RANK_SLOPES = [round(0.05 * i, 2) for i in range(0, 21)]
ADAPTER_RANK_SCALES = [round(0.05 * i, 2) for i in range(0, 41)]
RANK_FORM = "kernel"  # --rank-form: how max_lora_rank acts on the step time (fit_lora_terms)
LORA_KERNELS = Path(__file__).resolve().parent.parent / "profiler" / "measured" / "lora-kernels" / "lora_kernels.json"


def decode_context(model: str) -> float:
    """Mean context a decoding request attends to in the paper's workload: prompt + tokens so far, over its
    output − 1 decode steps (the length table's pairs, weighted by their decode steps)."""
    from adaptwin.twin.lengths import load_lengths

    p, o = load_lengths(model).sample(np.random.default_rng(0), 200_000)
    p, o = p.astype(float), o.astype(float)
    steps = np.maximum(o - 1, 0)
    return float(np.sum(steps * (p + 1 + o / 2)) / np.sum(steps))


def smape(y, p) -> float:
    y, p = np.asarray(y, float), np.asarray(p, float)
    return float(100 * np.mean(2 * np.abs(y - p) / (np.abs(y) + np.abs(p))))


def read_runs() -> list[dict]:
    with open(SCENARIOS / "scenarios_table1.csv", newline="") as f:
        scen = list(csv.DictReader(f))
    with open(SCENARIOS / "twin_validation_real.csv", newline="") as f:
        real = {(r["model"], r["rates"], r["max_lora_rank"], r["max_loras"], r["max_cpu_loras"]): r
                for r in csv.DictReader(f) if r["status"] == "ok"}
    for s in scen:
        g = real[(s["model"], s["rates"], s["max_lora_rank"], s["max_loras"], s["served_adapters"])]
        s["_gauges"] = {k: float(g[k] or 0) for k in ("mean_num_running", "mean_num_waiting", "preemptions_total")}
        # output tokens generated per completed request vs the max_tokens the paper's pool sent (early EOS)
        s["_served_share"] = float(g["completed"]) / max(1.0, float(g["arrivals_used"]))
        # per-token step time by Little's law: running requests x window / decode tokens generated (ms)
        s["_tau_ms"] = (float(g["mean_num_running"]) * float(g["duration_s"]) * 1000.0
                        / max(1.0, float(g["total_output_tokens"]) - float(g["completed"])))
        s["_output_ratio"] = ((float(g["total_output_tokens"]) / max(1.0, float(g["completed"])))
                              / (float(g["pool_output_tokens"]) / float(g["pool_prompts"])))
        s["workload"] = f"{s['rates']}|{s['ranks']}"
    return scen


def expected_adapters(rates: list[float], served: int, max_loras: int, n_running: float, waiting: float) -> float:
    """Distinct adapters among ``n_running`` requests drawn by rate (capped at max_loras; at max_loras when the
    queue is long and slots are scarce)."""
    per = np.array([rates[k % len(rates)] for k in range(served)], float)
    p = per / per.sum()
    a = float(np.sum(1 - (1 - p) ** n_running))
    if waiting > n_running and max_loras < served:
        a = max(a, float(max_loras))
    return min(a, float(max_loras), n_running) if n_running >= 1 else min(a, n_running)


def design(runs: list[dict], prof) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per run: LoRA-term features [1, N, prefill tokens/step, A, A·tokens/1000], the LoRA part of the ITL (target),
    log2 of max_lora_rank/8."""
    st = prof.step
    xs, ys, lr = [], [], []
    ctx = {m: decode_context(m) for m in {r["model"] for r in runs}} if st.kv_read_ms_per_ktoken else {}
    for r in runs:
        g = r["_gauges"]
        n, w = g["mean_num_running"], g["mean_num_waiting"]
        rates = [float(x) for x in r["rates"].split(";")]
        served, ml, mlr = int(r["served_adapters"]), int(r["max_loras"]), int(r["max_lora_rank"])
        itl_ms, dur = float(r["mean_itl_ms"]), float(r["duration_s"])
        # prefill work per second: prompts of the requests served + recomputed preempted requests
        pre_tok_s = (float(r["completed"]) * POOL_PROMPT[r["model"]]
                     + g["preemptions_total"] * POOL_TOTAL[r["model"]]) / dur
        p_step = pre_tok_s * itl_ms / 1000.0
        a = expected_adapters(rates, served, ml, n, w)
        skipped = w * max(0.0, 1 - ml / served) if ml < served else 0.0
        known = (st.decode_ms(n) + st.prefill_ms_per_token * p_step
                 + st.kv_read_ms_per_ktoken * 1e-3 * n * ctx.get(r["model"], 0.0) + prof.sched_base_ms + prof.sched_ms_per_running * n + prof.sched_ms_per_waiting_skipped * skipped
                 + st.rank_kernel_ms(mlr, ml, n + p_step, a))
        target = r["_tau_ms"] if TARGET == "tau" and n >= 1 else itl_ms
        xs.append((1.0, n, p_step, a, a * (n + p_step) / 1000.0)); ys.append(target - known); lr.append(math.log2(max(mlr, 8) / 8))
    return np.array(xs), np.array(ys), np.array(lr)


def served_runs(runs: list[dict]) -> np.ndarray:
    """Runs that completed >= 97 % of their offered tokens: no queue, so their τ is step time, not queue dynamics."""
    return np.array([float(r["total_throughput"]) >= 0.97 * float(r["ideal_total_throughput"]) for r in runs])


def fit_terms(runs: list[dict], prof) -> dict:
    """Least squares on the real runs' gauges (open loop): see :func:`fit_lora_terms`."""
    x, y, lr = design(runs, prof)
    return fit_lora_terms(x, y, lr, np.array([float(r["mean_itl_ms"]) for r in runs]), served_runs(runs))


def _nonneg_lsq(xf: np.ndarray, y: np.ndarray, wts: np.ndarray) -> tuple[np.ndarray, float]:
    """Weighted least squares with ``c >= 0`` (drop the most negative term until none is): terms, weighted SSE."""
    active = list(range(xf.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(xf[:, active] * wts[:, None], y * wts, rcond=None)
        if (coef >= 0).all():
            break
        active.pop(int(np.argmin(coef)))
    full = np.zeros(xf.shape[1])
    full[active] = coef
    return full, float(np.sum(((xf @ full - y) * wts) ** 2))


def _terms(c: np.ndarray, slope: float, adapter_rank: float | None = None) -> dict:
    terms = {"lora_base_ms": float(c[0]), "lora_ms_per_seq": float(c[1]), "lora_ms_per_prefill_token": float(c[2]),
             "lora_ms_per_adapter": float(c[3]), "lora_ms_per_adapter_ktoken": float(c[4]),
             "lora_rank_slope": float(slope)}
    return terms if adapter_rank is None else {**terms, "lora_adapter_rank_scale": float(adapter_rank)}


def fit_lora_terms(x: np.ndarray, y: np.ndarray, lr: np.ndarray, scale: np.ndarray,
                   served: np.ndarray | None = None) -> dict:
    """The LoRA terms ``c >= 0`` and how max_lora_rank scales them, minimizing Σ (x'·c − y)² / scale² (relative
    errors, so that light runs (15 ms) count as much as heavy ones (300 ms)).

    ``RANK_FORM`` "log2": x' = x·(1 + slope·lr), the slope on a grid. "adapter-blocks": only the per-adapter column
    scales, by 1 + s per 16-wide rank block beyond the first (vLLM's kernels tile the rank by 16); s is the grid value
    that fits the ``served`` runs best (their τ is step time, free of queue dynamics), then the terms are fitted on
    all runs with s fixed."""
    wts = 1.0 / scale
    if RANK_FORM == "adapter-blocks":
        blocks = np.array([rank_blocks(round(8 * 2.0 ** v)) for v in lr], float)  # lr = log2(max_lora_rank / 8)
        sel = served if served is not None and served.sum() >= 6 else np.ones(len(y), bool)

        def scaled(s: float) -> np.ndarray:
            xs = x.copy()
            xs[:, 3] *= 1 + s * blocks
            return xs
        s_best = min(ADAPTER_RANK_SCALES, key=lambda s: _nonneg_lsq(scaled(s)[sel], y[sel], wts[sel])[1])
        return _terms(_nonneg_lsq(scaled(s_best), y, wts)[0], 0.0, s_best)
    best = None
    for slope in [0.0] if RANK_FORM == "kernel" else RANK_SLOPES:  # kernel: the measured terms price the rank
        c, err = _nonneg_lsq(x * (1 + slope * lr)[:, None], y, wts)
        if best is None or err < best[0]:
            best = (err, slope, c)
    return _terms(best[2], best[1])


def simulated_engine(r: dict, prof, seed: int, engine_cls):
    """Real run ``r``'s configuration as the twin simulates it — the paper's workload drawn with ``seed``, the
    profile's early EOS — run to its duration on an ``engine_cls`` (a diagnostic :class:`Engine` subclass).
    Returns the engine and the duration."""
    from adaptwin.twin.config import ServerConfig, paper_workload
    from adaptwin.twin.lengths import apply_early_stop, load_lengths
    from adaptwin.twin.runner import parse_list

    dur = float(r["duration_s"])
    arr, ranks = paper_workload(parse_list(r["rates"]), parse_list(r["ranks"], int), int(r["served_adapters"]),
                                dur, seed, load_lengths(prof.model))
    arr = apply_early_stop(arr, prof.early_stop_fraction, seed)
    cfg = ServerConfig(model=prof.model, served=int(r["served_adapters"]), max_loras=int(r["max_loras"]),
                       adapter_ranks=tuple(ranks), max_lora_rank=int(r["max_lora_rank"]))
    eng = engine_cls(cfg, prof)
    eng.add_arrivals(arr)
    eng.advance_until(dur)
    return eng, dur


def _sim_tau(args) -> tuple[int, dict]:
    """Simulate one run with a :class:`GaugeEngine`: its per-decode-token running-weighted step features, split into
    the calibrated part of τ and the features the LoRA terms multiply (τ is linear in them along this trajectory),
    with the run's τ and summary figures."""
    from adaptwin.twin.gauges import LORA_FEATURES, GaugeEngine, known_ms
    from adaptwin.twin.result import SimResult

    i, r, prof, seed = args
    eng, dur = simulated_engine(r, prof, seed, GaugeEngine)
    res = SimResult.from_engine(eng, dur)
    decode_tokens = max(1.0, float((res.req["output"][res.finished_mask] - 1).sum()))
    f = eng.tau.mean(per=decode_tokens)
    s = res.summary()
    return i, {"known": known_ms(prof, f), "lora": [f[k] for k in LORA_FEATURES],
               "tau": sum(w.running_s for w in eng.windows) * 1e3 / decode_tokens, "total": s["total_throughput"],
               "ideal": s["ideal_total_throughput"], "starved": s["starved"], "itl": s["mean_itl_ms"]}


def simulate_tau(rows: list[dict], profiles: list, jobs: int, seed: int = 0) -> list[dict]:
    """:func:`_sim_tau` of each row with its own profile (rows[i] with profiles[i]), heaviest first."""
    from concurrent.futures import ProcessPoolExecutor

    work = sorted(((i, r, p, seed) for i, (r, p) in enumerate(zip(rows, profiles))),
                  key=lambda w: -float(w[1]["ideal_total_throughput"]))
    out: list[dict] = [None] * len(rows)  # type: ignore[list-item]
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool:
        for i, res in tqdm(pool.map(_sim_tau, work, chunksize=1), total=len(work), desc="closed-loop trajectories",
                           unit="run", leave=False):
            out[i] = res
    return out


def fit_closed_loop(runs: list[dict], traj: list[dict], prev: dict, damping: float) -> dict:
    """LoRA terms whose τ *on the given trajectories* (the twin's, simulated with ``prev``) matches the real runs'
    τ; returned as ``damping``·fit + (1 − damping)·``prev``. A step-time change moves a near-critical run's queue,
    hence its batch and its τ again, by about as much: the undamped step overshoots (docs/twin.md §Profiles)."""
    x = np.array([t["lora"] for t in traj])
    tau = np.array([r["_tau_ms"] for r in runs])
    y = tau - np.array([t["known"] for t in traj])
    lr = np.array([math.log2(max(int(r["max_lora_rank"]), 8) / 8) for r in runs])
    fit = fit_lora_terms(x, y, lr, tau, served_runs(runs))
    return {k: damping * v + (1 - damping) * prev[k] for k, v in fit.items()}


def fit_early_stop(runs: list[dict]) -> float:
    """Share of requests that end at EOS before max_tokens, from the runs that completed >= 99 % of their arrivals
    (no selection of short requests there): mean(generated / max_tokens) = 1 − share/2 under a uniform stop point
    (:func:`adaptwin.twin.lengths.apply_early_stop`)."""
    ratios = [r["_output_ratio"] for r in runs if r["_served_share"] >= 0.99]
    return max(0.0, 2.0 * (1.0 - float(np.mean(ratios)))) if ratios else 0.0


def with_terms(prof, terms: dict):
    terms = dict(terms)
    early = terms.pop("early_stop_fraction", None)
    prof = dataclasses.replace(prof, step=dataclasses.replace(prof.step, **terms))
    return prof if early is None else dataclasses.replace(prof, early_stop_fraction=early)


LIGHT = None  # set by --light-seeds: (max expected requests, seeds)
TARGET = "itl"  # --target: what the gauge fit matches (reported ITL, or the per-token time tau from Little's law)


def simulate_rows(rows: list[dict], profiles: list, jobs: int, seeds=(0,)) -> list[dict]:
    """Simulate each row with its own profile (rows[i] with profiles[i])."""
    from adaptwin.twin.validate import run_rows

    out: list[dict] = [None] * len(rows)  # type: ignore[list-item]
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(profiles):
        groups.setdefault(id(p), []).append(i)
    for idx in groups.values():
        prof = profiles[idx[0]]
        res = run_rows([rows[i] for i in idx], jobs=jobs, progress=False, seeds=list(seeds),
                       profiles={prof.model: prof}, light_seeds=LIGHT)
        for i, r in zip(idx, res):
            out[i] = r
    return out


INPUTS = ("model", "rates", "ranks", "served_adapters", "max_loras", "max_lora_rank")


def write_twin_answers(path: Path, rows: list[dict], sims: list[dict]) -> None:
    """The twin's answers per run, inputs and twin outputs only (no real outcome): the learner's ``--twin-feature
    lowo`` reads the LOWO ones (shipped as ``benchmarks/learner_twin_lowo.csv``)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(INPUTS + ("sim_total_throughput", "sim_starved"))
        for r, s in zip(rows, sims):
            w.writerow([r[k] for k in INPUTS] + [s["sim_total_throughput"], s["sim_starved"]])


def report(rows, sims, label, out: Path | None = None) -> dict:
    if out is not None:
        with (out / f"rows_{label.replace(' ', '_')}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["model", "rates", "ranks", "served_adapters", "max_loras", "max_lora_rank", "total_throughput",
                        "sim_total_throughput", "mean_itl_ms", "sim_mean_itl_ms", "starved", "sim_starved",
                        "ideal_total_throughput", "sim_ideal_total_throughput", "sim_wall_s", "sim_error"])
            for r, s in zip(rows, sims):
                w.writerow([r["model"], r["rates"], r["ranks"], r["served_adapters"], r["max_loras"], r["max_lora_rank"],
                            r["total_throughput"], s["sim_total_throughput"], r["mean_itl_ms"], s["sim_mean_itl_ms"],
                            r["starved"], s["sim_starved"], r["ideal_total_throughput"],
                            s["sim_ideal_total_throughput"], s["sim_wall_s"], s["sim_error"]])
    res = {}
    for m in sorted({r["model"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["model"] == m and not sims[i]["sim_error"]]
        y = [float(rows[i]["total_throughput"]) for i in idx]
        p = [float(sims[i]["sim_total_throughput"]) for i in idx]
        yi = [float(rows[i]["mean_itl_ms"]) for i in idx]
        pi = [float(sims[i]["sim_mean_itl_ms"]) for i in idx]
        agree = 100 * np.mean([int(rows[i]["starved"]) == int(sims[i]["sim_starved"]) for i in idx])
        per_w = {}
        for w in sorted({rows[i]["workload"] for i in idx}):
            ii = [k for k, i in enumerate(idx) if rows[i]["workload"] == w]
            per_w[w] = {"throughput_smape": round(smape([y[k] for k in ii], [p[k] for k in ii]), 2),
                        "itl_smape": round(smape([yi[k] for k in ii], [pi[k] for k in ii]), 2)}
        res[m] = {"runs": len(idx), "errors": sum(1 for i, r in enumerate(rows) if r["model"] == m and sims[i]["sim_error"]),
                  "throughput_smape": round(smape(y, p), 2), "itl_smape": round(smape(yi, pi), 2),
                  "starvation_agreement_pct": round(float(agree), 2), "by_workload": per_w,
                  "sim_wall_s_mean": round(float(np.mean([float(sims[i]["sim_wall_s"]) for i in idx])), 3)}
        print(f"[{label}] {m}: runs {len(idx)}  throughput sMAPE {res[m]['throughput_smape']:.2f} %  "
              f"ITL sMAPE {res[m]['itl_smape']:.2f} %  starvation agreement {agree:.1f} %")
        for w, e in per_w.items():
            print(f"      {w:28s} thr {e['throughput_smape']:6.2f} %   itl {e['itl_smape']:6.2f} %")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--fit", action="store_true", help="fit the LoRA terms on the real runs and report LOWO CV")
    ap.add_argument("--models", default="llama,qwen")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", default=".cache/twin_fidelity")
    ap.add_argument("--skip-shipped", action="store_true", help="do not simulate with the shipped profiles")
    ap.add_argument("--skip-insample", action="store_true", help="with --fit: only the cross-validated pass")
    ap.add_argument("--target", choices=("itl", "tau"), default="tau",
                    help="gauge fit target: the runs' reported mean ITL, or their per-token time by Little's law")
    ap.add_argument("--closed-loop", type=int, default=1, metavar="STEPS",
                    help="with --fit: refit the LoRA terms this many times on the twin's own trajectories (0: the "
                         "open-loop gauge fit)")
    ap.add_argument("--damping", type=float, default=0.5,
                    help="closed-loop step: new terms = d x the trajectory fit + (1 - d) x the terms simulated")
    ap.add_argument("--rank-form", choices=("log2", "adapter-blocks", "kernel"), default="kernel",
                    help="how max_lora_rank acts: priced by the LoRA-kernel measurement (--lora-kernels; default, "
                         "shipped), or fitted: all LoRA terms by a log2 slope (shipped up to session 7), or the "
                         "per-adapter term per 16-wide rank block (its scale fitted on the served runs)")
    ap.add_argument("--lora-kernels", default=str(LORA_KERNELS),
                    help="with --rank-form kernel: profiler/gpu_lora_kernels.py's lora_kernels.json")
    ap.add_argument("--light-seeds", default=None,
                    help="N:S1,S2,..: runs with at most N expected requests average these seeds (Poisson noise)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    global LIGHT, TARGET, RANK_FORM
    TARGET, RANK_FORM = args.target, args.rank_form
    if args.light_seeds:
        n, ss = args.light_seeds.split(":")
        LIGHT = (float(n), [int(x) for x in ss.split(",")])
        result_light = args.light_seeds
    else:
        result_light = None
    models = [MODELS[m] for m in args.models.split(",")]
    runs = [r for r in read_runs() if r["model"] in models]
    result: dict = {"load_avg_before": os.getloadavg(), "seeds": seeds, "light_seeds": result_light}
    t0 = time.time()
    if not args.skip_shipped:
        profs = [load_profile(r["model"]) for r in runs]
        result["shipped"] = report(runs, simulate_rows(runs, profs, args.jobs, seeds), "shipped profile", out)
    if args.fit:
        kernel_terms = {}
        if RANK_FORM == "kernel":  # the GPU-measured rank-block terms, as measured (not fitted here)
            measured = json.loads(Path(args.lora_kernels).read_text())["rank_kernel"]
            kernel_terms = {m: {k: v for k, v in measured[m].items() if k.startswith("lora_rank_block_")}
                            for m in models}
        params, folds, bases, early = {}, {}, {}, {}
        for m in models:
            base = with_terms(load_profile(m), {"lora_ms_per_prefill_token": 0.0, "lora_rank_slope": 0.0,
                                                "lora_ms_per_adapter_ktoken": 0.0, **kernel_terms.get(m, {})})
            bases[m] = base
            mine = [r for r in runs if r["model"] == m]
            params[m] = fit_terms(mine, base)
            early[m] = fit_early_stop(mine)
            for w in sorted({r["workload"] for r in mine}):
                train = [r for r in mine if r["workload"] != w]
                folds[(m, w)] = fit_terms(train, base)
                early[(m, w)] = fit_early_stop(train)

        def profiles():
            """Per run: the all-runs (in-sample) profile and its leave-one-workload-out fold's profile."""
            full = {m: with_terms(bases[m], {**params[m], "early_stop_fraction": early[m]}) for m in models}
            cv = {k: with_terms(bases[k[0]], {**folds[k], "early_stop_fraction": early[k]}) for k in folds}
            return [full[r["model"]] for r in runs], [cv[(r["model"], r["workload"])] for r in runs]

        for _ in range(args.closed_loop):
            insample_profs, cv_profs = profiles()
            traj_in = simulate_tau(runs, insample_profs, args.jobs, seeds[0])
            traj_cv = simulate_tau(runs, cv_profs, args.jobs, seeds[0])
            for m in models:
                mine = [i for i, r in enumerate(runs) if r["model"] == m]
                params[m] = fit_closed_loop([runs[i] for i in mine], [traj_in[i] for i in mine], params[m],
                                            args.damping)
                for (fm, w), prev in list(folds.items()):
                    if fm == m:
                        train = [i for i in mine if runs[i]["workload"] != w]
                        folds[(m, w)] = fit_closed_loop([runs[i] for i in train], [traj_cv[i] for i in train], prev,
                                                        args.damping)
        insample_profs, cv_profs = profiles()
        params = {m: {**params[m], "early_stop_fraction": early[m], **kernel_terms.get(m, {})} for m in models}
        result["folds"] = {f"{m}|{w}": {**t, "early_stop_fraction": early[(m, w)]} for (m, w), t in folds.items()}
        (out / "lowo_folds.json").write_text(json.dumps(result["folds"], indent=1) + "\n")
        result["closed_loop"] = {"steps": args.closed_loop, "damping": args.damping}
        (out / "real_params.json").write_text(json.dumps(params, indent=1) + "\n")
        result["real_params"] = params
        print(json.dumps(params, indent=1))
        cv_sims = simulate_rows(runs, cv_profs, args.jobs, seeds)
        result["lowo_cv"] = report(runs, cv_sims, "LOWO CV", out)
        write_twin_answers(out / "learner_twin_lowo.csv", runs, cv_sims)
        if not args.skip_insample:
            result["in_sample"] = report(runs, simulate_rows(runs, insample_profs, args.jobs, seeds), "in-sample", out)
    result["wall_s"] = round(time.time() - t0, 1)
    result["load_avg_after"] = os.getloadavg()
    (out / "twin_fidelity.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wall {result['wall_s']} s; load average {result['load_avg_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
