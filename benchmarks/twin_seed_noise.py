"""Arrival-noise ceiling of the twin's starvation flag (issue 4): how often does a fresh Poisson draw flip it?

    nice -n 10 .venv/bin/python -m benchmarks.twin_seed_noise [--seeds 8] [--jobs 2] [--band 0.80]
        [--terms shipped|lowo] [--models llama,qwen] [--runs N] [--cache FILE] [--report-only]

The real runs' arrival times were never published, so the twin simulates each of the 294 real runs with its own
draw of the paper's workload (Poisson arrivals, ShareGPT lengths, adapter shuffle; seed 0). A run is starved when it
completes < 90 % of its offered tokens. This script simulates the shipped twin with K seeds per run and reports, per
model:

* the twin's own seed-to-seed flip rate (probability that two draws disagree on the flag, per run, averaged);
* the agreement ceiling of an unbiased twin that must draw its own arrivals: for each run the probability that a fresh
  draw lands on the same side of 0.9 as the real run, with the completed share of a draw modelled as
  Normal(real share, the twin's seed std for that configuration) -- and, distribution-free, with the twin's own seed
  deviations added to the real share;
* the measured agreement of the twin with seed 0 and averaged over seeds, against that ceiling -- with the shipped
  profiles (in-sample LoRA terms) or, ``--terms lowo``, each run's leave-one-workload-out fold as RESULTS.md reports;
* the coefficient of variation of offered tokens between seeds (the criterion divides by offered load).

Which runs get K seeds: those whose real completed share is >= ``--band`` (default 0.80); every other run is simulated
with seed 0 only and gets the K seeds too if its twin share is >= band. Below the band a flip needs a swing of more
than 10 points, many times the seed std measured in the band (the report prints the margin in std units).

Every simulation is cached in ``--cache`` (default ``benchmarks/twin_seed_noise.json``, keyed by run, seed and a hash
of the shipped profile and length table), so the report can be re-read with ``--report-only`` without simulating and
an interrupted pass resumes where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCENARIOS = Path(os.environ.get("ADAPTWIN_SHARED", "/work/shared")) / "data" / "validation" / "scenarios_table1.csv"
MODELS = {"llama": "llama-3.1-8b-instruct", "qwen": "qwen-2.5-7b-instruct"}
CACHE = Path(__file__).with_name("twin_seed_noise.json")
LOWO_FOLDS = Path(__file__).with_name("twin_lowo_folds.json")
THRESHOLD = 0.9  # starved <=> completed < 90 % of offered tokens (paper §1.3; twin: 1 - total/ideal >= 0.1)
# the LOWO twin's answers per real run, seed 0 (written by `twin_fidelity --fit` with the folds above)
LOWO_ANSWERS = Path(__file__).with_name("learner_twin_lowo.csv")
KEY_FIELDS = ("model", "rates", "ranks", "served_adapters", "max_loras", "max_lora_rank", "duration_s")


@dataclass
class RealRun:
    """One of the 294 real vLLM runs and the twin's draws of it (seed -> simulated summary fields)."""

    row: dict
    draws: dict[int, dict] = field(default_factory=dict)
    profile: object = None  # None: the shipped profile; else the LOWO fold's profile for this run
    variant: str = "shipped"

    @property
    def model(self) -> str:
        return self.row["model"]

    @property
    def key(self) -> str:
        base = "|".join(self.row[k] for k in KEY_FIELDS)
        return base if self.variant == "shipped" else f"{self.variant}|{base}"

    @property
    def share(self) -> float:
        return float(self.row["total_throughput"]) / float(self.row["ideal_total_throughput"])

    @property
    def starved(self) -> int:
        return int(self.row["starved"])


def read_runs(models: list[str]) -> list[RealRun]:
    with open(SCENARIOS, newline="") as f:
        return [RealRun(r) for r in csv.DictReader(f) if r["model"] in models]


def attach_lowo_profiles(runs: list[RealRun], folds_path: Path = LOWO_FOLDS) -> None:
    """Give each run the profile of its leave-one-workload-out fold: the LoRA terms and early-EOS share that
    ``benchmarks.twin_fidelity --fit`` fitted on the other three workloads of its model (its ``lowo_folds.json``,
    shipped as ``benchmarks/twin_lowo_folds.json``), so the draws reproduce the cross-validated agreement of
    RESULTS.md at seed 0."""
    from adaptwin.twin.profile import load_profile
    from benchmarks import twin_fidelity as tf

    folds = json.loads(folds_path.read_text())
    gauged = {"|".join(r[k] for k in KEY_FIELDS): r for r in tf.read_runs()}
    profiles = {}
    for run in runs:
        key = f"{run.model}|{gauged['|'.join(run.row[k] for k in KEY_FIELDS)]['workload']}"
        if key not in profiles:
            profiles[key] = tf.with_terms(load_profile(run.model), folds[key])
        run.profile, run.variant = profiles[key], "lowo"


def measured_lowo_pct(model: str) -> float | None:
    """The shipped LOWO twin's seed-0 flag agreement with the real runs of ``model`` (RESULTS.md, Twin), from
    ``LOWO_ANSWERS`` matched to the scenarios row by row on the inputs."""
    inputs = KEY_FIELDS[:-1]
    with open(LOWO_ANSWERS, newline="") as f:
        twin = {tuple(r[k] for k in inputs): int(r["sim_starved"]) for r in csv.DictReader(f) if r["model"] == model}
    with open(SCENARIOS, newline="") as f:
        same = [twin[key] == int(r["starved"]) for r in csv.DictReader(f) if r["model"] == model
                for key in [tuple(r[k] for k in inputs)] if key in twin]
    return 100 * float(np.mean(same)) if same else None


def twin_fingerprint(model: str) -> str:
    """Hash of what the twin reads for ``model`` (profile, length table, the LOWO folds' terms): a changed twin
    invalidates the cached draws of that model."""
    import adaptwin.twin as twin_pkg

    root = Path(twin_pkg.__file__).parent
    h = hashlib.sha256()
    for p in (root / "profiles" / f"h100-64gb__{model}.json", root / "lengths" / f"{model}.npz", LOWO_FOLDS):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def simulate_draw(args: tuple) -> tuple[str, int, dict]:
    """One real run's configuration simulated by the twin (shipped profile, or ``profile``) with the paper's workload
    drawn with ``seed``."""
    from adaptwin.twin.runner import parse_list, run_scenario

    key, row, seed, profile = args
    t0 = time.process_time()
    s = run_scenario(row["model"], parse_list(row["rates"]), parse_list(row["ranks"], int),
                     int(row["served_adapters"]), int(row["max_loras"]), int(row["max_lora_rank"]),
                     duration=float(row["duration_s"]), seed=seed, profile=profile).summary()
    return key, seed, {"total": s["total_throughput"], "ideal": s["ideal_total_throughput"],
                       "starved": s["starved"], "arrivals": s["arrivals"],
                       "cpu_s": round(time.process_time() - t0, 3)}


class Cache:
    """Draws on disk: {"fingerprints": {model: hash}, "draws": {run key: {seed: fields}}, "report": ...}."""

    def __init__(self, path: Path, models: list[str]):
        self.path = path
        self.data: dict = {"fingerprints": {}, "draws": {}}
        if path.is_file():
            self.data = json.loads(path.read_text())
        for m in models:
            fp = twin_fingerprint(m)
            if self.data["fingerprints"].get(m) != fp:
                stale = [k for k in self.data["draws"] if k.startswith(m + "|") or k.startswith(f"lowo|{m}|")]
                if stale:
                    print(f"twin profile/lengths of {m} changed: dropping {len(stale)} cached runs", file=sys.stderr)
                for k in stale:
                    del self.data["draws"][k]
                self.data["fingerprints"][m] = fp

    def get(self, key: str) -> dict[int, dict]:
        return {int(s): v for s, v in self.data["draws"].get(key, {}).items()}

    def put(self, key: str, seed: int, draw: dict) -> None:
        self.data["draws"].setdefault(key, {})[str(seed)] = draw

    def save(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, separators=(",", ":"), sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def run_draws(work: list[tuple], cache: Cache, runs_by_key: dict[str, RealRun], jobs: int,
              desc: str) -> int:
    """Simulate the missing draws on ``jobs`` processes, longest first, saving the cache every 30 s; how many."""
    from tqdm import tqdm

    if not work:
        return 0
    work = sorted(work, key=lambda w: -_cost_hint(w[1]))
    last = time.monotonic()
    with ProcessPoolExecutor(max_workers=max(1, jobs)) as pool, \
            tqdm(total=len(work), desc=desc, unit="sim", file=sys.stderr) as bar:
        futures = [pool.submit(simulate_draw, w) for w in work]
        for fut in as_completed(futures):
            key, seed, draw = fut.result()
            cache.put(key, seed, draw)
            runs_by_key[key].draws[seed] = draw
            bar.update(1)
            if time.monotonic() - last > 30:
                cache.save()
                last = time.monotonic()
    cache.save()
    return len(work)


def _cost_hint(row: dict) -> float:
    rates = [float(x) for x in row["rates"].split(";")]
    return sum(rates) * float(row["served_adapters"]) / len(rates)


def _smape(y: float, p: float) -> float:
    return 100 * 2 * abs(y - p) / (abs(y) + abs(p))


def p_at_most(p: list[float], k: int) -> float:
    """P(at most k of independent events with probabilities ``p`` happen) (Poisson-binomial, exact)."""
    dist = np.zeros(len(p) + 1)
    dist[0] = 1.0
    for q in p:
        dist[1:] = dist[1:] * (1 - q) + dist[:-1] * q
        dist[0] *= 1 - q
    return float(dist[: k + 1].sum())


def phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def run_stats(run: RealRun, sigma_fallback: float) -> dict:
    """Per run: the twin's shares over seeds, flip probability between two draws, and the ceilings."""
    seeds = sorted(run.draws)
    shares = np.array([run.draws[s]["total"] / run.draws[s]["ideal"] for s in seeds])
    flags = np.array([run.draws[s]["starved"] for s in seeds])
    offered = np.array([run.draws[s]["ideal"] for s in seeds])
    k, n = int(flags.sum()), len(flags)
    real_side = run.share < THRESHOLD
    margin = abs(run.share - THRESHOLD)
    sigma = float(np.std(shares, ddof=1)) if n >= 2 else sigma_fallback
    # Normal(real share, sigma): probability a fresh draw falls on the real run's side of the threshold
    ceil_normal = 1.0 if sigma == 0 else phi(margin / sigma)
    # distribution-free: the twin's own seed deviations around its mean, moved onto the real share
    ceil_shift = (float(np.mean(((run.share + shares - shares.mean()) < THRESHOLD) == real_side))
                  if n >= 2 else ceil_normal)
    return {
        "key": run.key, "seeds": n, "real_share": run.share, "real_starved": run.starved,
        "twin_share_mean": float(shares.mean()), "twin_share_std": sigma if n >= 2 else None,
        "twin_starved_seeds": k, "seed0_starved": int(run.draws[seeds[0]]["starved"]) if seeds else None,
        "flip_pairwise": (2.0 * k * (n - k) / (n * (n - 1))) if n >= 2 else 0.0,
        "agree_per_seed": float(np.mean(flags == run.starved)),
        # the flag of the mean share over the seeds: a predictor with the twin's own arrival noise averaged out
        "ensemble_starved": int(shares.mean() < THRESHOLD),
        "ceiling_normal": ceil_normal, "ceiling_shift": ceil_shift,
        # the real run is itself one draw: two independent draws around the real share agree with c^2 + (1-c)^2
        "ceiling_two_draw": ceil_normal ** 2 + (1 - ceil_normal) ** 2,
        "margin_in_std": (margin / sigma) if sigma > 0 else math.inf,
        "offered_cv": float(np.std(offered, ddof=1) / offered.mean()) if n >= 2 else None,
    }


def model_report(runs: list[RealRun], band: float) -> dict:
    multi = [r for r in runs if len(r.draws) >= 2]
    sig = [float(np.std([d["total"] / d["ideal"] for d in r.draws.values()], ddof=1)) for r in multi]
    sigma_max = max(sig) if sig else 0.0
    drawn = [r for r in runs if r.draws]
    stats = [run_stats(r, sigma_max) for r in drawn]
    if not stats:
        return {}
    seeds_all = sorted({s for r in drawn for s in r.draws})
    k_max = max(st["seeds"] for st in stats)
    # agreement of seed j with the real flags; runs drawn once (outside the band) keep their seed-0 flag
    per_seed = [100 * float(np.mean([(r.draws.get(j) or r.draws[min(r.draws)])["starved"] == r.starved
                                     for r in drawn])) for j in seeds_all]
    near = [st for st in stats if st["seeds"] >= 2]
    outside = [st for st in stats if st["seeds"] < 2]
    cv = [st["offered_cv"] for st in near if st["offered_cv"] is not None]
    cv_by_rates = {}
    for r, st in zip(drawn, stats):
        if st["seeds"] >= 2:
            cv_by_rates.setdefault(r.row["rates"], []).append(100 * st["offered_cv"])
    disagree0 = [st for st in stats if st["seed0_starved"] != st["real_starved"]]
    # offered load, served runs (>= 97 %, not client-limited): real hour vs the twin's seed 0, against twin seed 0 vs
    # the twin's other seeds -- what a fresh Poisson draw alone explains
    served = [r for r in multi if r.share >= 0.97]
    real_vs_twin = [_smape(float(r.row["ideal_total_throughput"]), r.draws[min(r.draws)]["ideal"]) for r in served]
    twin_vs_twin = [_smape(r.draws[min(r.draws)]["ideal"], d["ideal"]) for r in served
                    for s, d in r.draws.items() if s != min(r.draws)]
    bias = [r.draws[min(r.draws)]["ideal"] / float(r.row["ideal_total_throughput"]) - 1 for r in served]
    rep = {
        "runs": len(stats), "runs_multi_seed": len(near), "seeds": k_max, "band": band,
        "flip_rate_pct": 100 * float(np.mean([st["flip_pairwise"] for st in stats])),
        "runs_with_any_flip": sum(1 for st in near if 0 < st["twin_starved_seeds"] < st["seeds"]),
        "ceiling_normal_pct": 100 * float(np.mean([st["ceiling_normal"] for st in stats])),
        "ceiling_shift_pct": 100 * float(np.mean([st["ceiling_shift"] for st in stats])),
        "ceiling_two_draw_pct": 100 * float(np.mean([st["ceiling_two_draw"] for st in stats])),
        "expected_noise_disagreements": float(sum(1 - st["ceiling_normal"] for st in stats)),
        # chance that an unbiased twin's one draw per run reaches the 99 % target (Poisson-binomial over runs)
        "p_unbiased_meets_99_pct": 100 * p_at_most([1 - st["ceiling_normal"] for st in stats],
                                                   math.floor(0.01 * len(stats) + 1e-9)),
        "max_disagreements_for_99": math.floor(0.01 * len(stats) + 1e-9),
        "agreement_seed0_pct": per_seed[0] if per_seed else None,
        "agreement_mean_over_seeds_pct": float(np.mean(per_seed)) if per_seed else None,
        "agreement_seed_range_pct": [min(per_seed), max(per_seed)] if per_seed else None,
        "agreement_ensemble_pct": 100 * float(np.mean([st["ensemble_starved"] == st["real_starved"] for st in stats])),
        "ensemble_disagreements": [st["key"] for st in stats if st["ensemble_starved"] != st["real_starved"]],
        "disagreements_seed0": len(disagree0),
        "measured_lowo_pct": measured_lowo_pct(runs[0].model),
        "share_std_median": float(np.median(sig)) if sig else None,
        "share_std_max": sigma_max,
        "offered_cv_median_pct": 100 * float(np.median(cv)) if cv else None,
        "offered_cv_range_pct": [100 * min(cv), 100 * max(cv)] if cv else None,
        "offered_cv_by_rates_pct": {k: [round(min(v), 3), round(float(np.median(v)), 3), round(max(v), 3)]
                                    for k, v in sorted(cv_by_rates.items())},
        "offered_served_runs": len(served),
        "offered_real_vs_twin_smape_pct": float(np.mean(real_vs_twin)) if served else None,
        "offered_twin_vs_twin_smape_pct": float(np.mean(twin_vs_twin)) if served else None,
        "offered_twin_bias_pct": 100 * float(np.mean(bias)) if served else None,
        "outside_min_margin_in_std": (min(st["margin_in_std"] for st in outside) if outside else None),
        "outside_max_twin_share": (max(st["twin_share_mean"] for st in outside) if outside else None),
        "disagreeing_runs_seed0": [{k: st[k] for k in ("key", "real_share", "twin_share_mean", "twin_share_std",
                                                       "twin_starved_seeds", "seeds", "ceiling_normal")}
                                   for st in disagree0],
        "noisy_runs": [{k: st[k] for k in ("key", "real_share", "twin_share_mean", "twin_share_std",
                                           "twin_starved_seeds", "seeds", "ceiling_normal")}
                       for st in near if st["ceiling_normal"] < 0.99 or 0 < st["twin_starved_seeds"] < st["seeds"]],
    }
    return rep


def print_report(reports: dict) -> None:
    print(f"{'model':22s} {'runs':>5s} {'K-seed':>6s} {'K':>3s} {'flip %':>7s} {'ceil N %':>9s} {'ceil S %':>9s} "
          f"{'ceil 2 %':>9s} {'agree s0 %':>10s} {'agree avg %':>11s} {'agree ens %':>11s} {'LOWO %':>7s} {'std med':>8s} "
          f"{'offered CV %':>12s}")
    for m, r in reports.items():
        if not r:
            continue
        cv = f"{r['offered_cv_median_pct']:.2f}" if r["offered_cv_median_pct"] is not None else "-"
        sd = f"{r['share_std_median']:.4f}" if r["share_std_median"] is not None else "-"
        print(f"{m:22s} {r['runs']:5d} {r['runs_multi_seed']:6d} {r['seeds']:3d} {r['flip_rate_pct']:7.2f} "
              f"{r['ceiling_normal_pct']:9.2f} {r['ceiling_shift_pct']:9.2f} {r['ceiling_two_draw_pct']:9.2f} "
              f"{r['agreement_seed0_pct']:10.2f} "
              f"{r['agreement_mean_over_seeds_pct']:11.2f} {r['agreement_ensemble_pct']:11.2f} "
              f"{r['measured_lowo_pct'] or 0:7.1f} {sd:>8s} {cv:>12s}")
    for m, r in reports.items():
        if not r:
            continue
        print(f"\n{m}: runs whose twin flips between seeds: {r['runs_with_any_flip']}; expected noise-only "
              f"disagreements {r['expected_noise_disagreements']:.2f}; seed-0 disagreements {r['disagreements_seed0']}"
              f"; seed agreement range {r['agreement_seed_range_pct']}")
        print(f"  ensemble (flag of the mean share over the seeds) disagrees on: {r['ensemble_disagreements']}")
        print(f"  99 % allows {r['max_disagreements_for_99']} disagreement(s) of {r['runs']}: an unbiased twin drawing "
              f"its own arrivals meets it with probability {r['p_unbiased_meets_99_pct']:.1f} %")
        print(f"  offered-token CV between seeds, by rates (min / median / max %): {r['offered_cv_by_rates_pct']}")
        if r["offered_served_runs"]:
            print(f"  offered tokens, {r['offered_served_runs']} served runs: real vs twin seed 0 sMAPE "
                  f"{r['offered_real_vs_twin_smape_pct']:.2f} % (twin bias {r['offered_twin_bias_pct']:+.2f} %), "
                  f"twin seed 0 vs other seeds {r['offered_twin_vs_twin_smape_pct']:.2f} %")
        if r["outside_min_margin_in_std"] is not None:
            print(f"  outside the band: nearest run {r['outside_min_margin_in_std']:.1f} std (max band std "
                  f"{r['share_std_max']:.4f}) from 0.9; highest twin share {r['outside_max_twin_share']:.3f}")
        for d in r["disagreeing_runs_seed0"]:
            sd = f"{d['twin_share_std']:.4f}" if d["twin_share_std"] is not None else "-"
            print(f"  disagrees (seed 0): {d['key']:60s} real {d['real_share']:.3f} twin {d['twin_share_mean']:.3f}"
                  f" ± {sd}  starved in {d['twin_starved_seeds']}/{d['seeds']} seeds, P(noise agrees) "
                  f"{d['ceiling_normal']:.3f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8, help="draws per near-critical run (seeds 0..K-1; default 8)")
    ap.add_argument("--jobs", type=int, default=2, help="processes (default 2)")
    ap.add_argument("--band", type=float, default=0.80,
                    help="runs whose real (or seed-0 twin) completed share is >= this get K seeds (default 0.80)")
    ap.add_argument("--models", default="llama,qwen")
    ap.add_argument("--runs", type=int, default=None,
                    help="only the N runs closest to the 0.9 threshold (a quick check)")
    ap.add_argument("--skip-outside", action="store_true",
                    help="do not simulate seed 0 of the runs below the band (they then count as twin-agrees)")
    ap.add_argument("--cache", default=str(CACHE), help=f"JSON cache of the draws and the report (default {CACHE})")
    ap.add_argument("--report-only", action="store_true", help="no simulation: report from the cache")
    ap.add_argument("--terms", choices=("shipped", "lowo"), default="shipped",
                    help="LoRA terms: the shipped profiles (in-sample), or each run's leave-one-workload-out fold")
    args = ap.parse_args(argv)
    if args.seeds < 2 and not args.report_only:
        ap.error("--seeds must be >= 2 to measure seed-to-seed noise")
    try:
        models = [MODELS[m.strip()] for m in args.models.split(",")]
    except KeyError as err:
        ap.error(f"unknown model {err}; use {', '.join(MODELS)}")
    runs = read_runs(models)
    if args.terms == "lowo":
        attach_lowo_profiles(runs)
    if args.runs is not None:
        runs = sorted(runs, key=lambda r: abs(r.share - THRESHOLD))[: args.runs]
    cache = Cache(Path(args.cache), models)
    by_key = {r.key: r for r in runs}
    for r in runs:
        r.draws = cache.get(r.key)
    load_before = os.getloadavg()
    t0 = time.time()
    new_draws = 0
    if not args.report_only:
        seeds = list(range(args.seeds))
        inside = [r for r in runs if r.share >= args.band]
        new_draws += run_draws([(r.key, r.row, s, r.profile) for r in inside for s in seeds if s not in r.draws], cache,
                               by_key, args.jobs, f"band runs x {args.seeds} seeds")
        if not args.skip_outside:
            outside = [r for r in runs if r.share < args.band]
            new_draws += run_draws([(r.key, r.row, 0, r.profile) for r in outside if 0 not in r.draws], cache, by_key,
                                   args.jobs, "other runs, seed 0")
            late = [r for r in outside if 0 in r.draws
                    and r.draws[0]["total"] / r.draws[0]["ideal"] >= args.band]
            new_draws += run_draws([(r.key, r.row, s, r.profile) for r in late for s in seeds if s not in r.draws],
                                   cache,
                                   by_key, args.jobs, "twin-in-band runs x seeds")
    if args.skip_outside or args.report_only:
        # a run below the band never drawn counts as a twin that agrees with it (it lies >= 10 points from 0.9)
        assumed = [r for r in runs if not r.draws and r.share < args.band]
        for r in assumed:
            r.draws = {0: {"total": r.share, "ideal": 1.0, "starved": r.starved, "arrivals": 0, "cpu_s": 0}}
        if assumed:
            print(f"{len(assumed)} runs below the band were not simulated: counted as agreeing", file=sys.stderr)
        missing = sum(1 for r in runs if not r.draws)
        if missing:
            print(f"{missing} runs in the band are not in the cache: left out of the report", file=sys.stderr)
    reports = {m: model_report([r for r in runs if r.model == m], args.band) for m in models}
    print(f"LoRA terms: {args.terms}" + (" (each run's leave-one-workload-out fold)" if args.terms == "lowo" else
                                         " (shipped profiles, in-sample)"))
    print_report(reports)
    if not args.report_only and args.runs is None:  # a --runs subset must not replace the full pass's report
        slot = "report" if args.terms == "shipped" else f"report_{args.terms}"
        previous = cache.data.get(slot) or {}
        simulated = new_draws > 0 or not previous  # nothing new simulated: keep the last pass's timings
        cpu = sum(d.get("cpu_s", 0) for r in runs for d in r.draws.values())
        if simulated:
            timing = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": round(time.time() - t0, 1),
                      "new_draws": new_draws, "load_avg_before": load_before, "load_avg_after": os.getloadavg()}
        else:
            timing = {k: previous.get(k) for k in ("date", "wall_s", "new_draws", "load_avg_before", "load_avg_after")}
        cache.data[slot] = {**timing, "models": reports, "args": vars(args), "sim_cpu_s": round(cpu, 1)}
        cache.save()
    if not args.report_only:
        cpu = sum(d.get("cpu_s", 0) for r in runs for d in r.draws.values())
        print(f"\nwall {time.time() - t0:.1f} s, simulation CPU {cpu:.1f} s (cached draws included); load average "
              f"{load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}; cache {args.cache}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
