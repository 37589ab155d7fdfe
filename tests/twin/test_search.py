"""The optimiser behind ``adaptwin recommend`` (twin/search.py, twin/recommend_cli.py)."""

import argparse
import itertools
import json

import pytest

from adaptwin.cliutil import UserError
from adaptwin.twin import ConfigError
from adaptwin.twin.recommend_cli import register_recommend
from adaptwin.twin.search import (PAPER_GRID, Evaluation, Evaluator, SlotChoice, Workload, boundary, choose, search,
                                  walk)

LLAMA = "llama-3.1-8b-instruct"
QWEN = "qwen-2.5-7b-instruct"
DUR = 300.0


def _ev(served, g, thr=100.0, ratio=0.0, std=0.0, seeds=1):
    return Evaluation(served=served, max_loras=g, total_throughput=thr, ideal_total_throughput=thr / (1 - ratio),
                      starvation_ratio=ratio, throughput_std=std, seeds=seeds)


# ---- pure logic -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 7, 10])
def test_boundary_equals_walk_for_every_monotone_boundary_and_hint(n):
    vals = [10 * (i + 1) for i in range(n)]
    for first_bad in range(n + 1):  # index of the first starving value (n: none starves)
        def evaluate(s, g):
            return _ev(s, g, thr=s, ratio=0.5 if vals.index(s) >= first_bad else 0.0)

        want = walk([evaluate(s, 5) for s in vals])
        for hint in [None] + vals:
            got = boundary(vals, 5, evaluate, hint)
            assert got.evaluation == want.evaluation, (first_bad, hint)
            assert got.first_starving_served == want.first_starving_served, (first_bad, hint)


def test_boundary_needs_few_runs_and_a_good_hint_fewer():
    vals = list(range(1, 385))
    seen = set()

    def evaluate(s, g):
        seen.add(s)
        return _ev(s, g, thr=s, ratio=0.5 if s > 200 else 0.0)

    assert boundary(vals, 1, evaluate).evaluation.served == 200
    assert len(seen) <= 10
    seen.clear()
    assert boundary(vals, 1, evaluate, hint=200).evaluation.served == 200
    assert len(seen) <= 3


def test_walk_keeps_the_first_point_even_when_it_starves():
    c = walk([_ev(16, 16, ratio=0.3), _ev(32, 16, ratio=0.0)])
    assert c.evaluation.served == 16 and c.evaluation.starved and c.served_headroom is None


def test_choose_prefers_non_starving_then_margin_within_noise():
    starving_fast = SlotChoice(_ev(64, 64, thr=900, ratio=0.2), None)
    ok_slow = SlotChoice(_ev(32, 32, thr=500, ratio=0.05), 64)
    pick, others, all_starve = choose([starving_fast, ok_slow])
    assert pick is ok_slow and not all_starve and others == [starving_fast]
    # two seeds: 510 ± 20 is within noise of 500 ± 20, so the larger margin wins
    a = SlotChoice(_ev(64, 32, thr=510, ratio=0.09, std=20, seeds=2), 96)
    b = SlotChoice(_ev(64, 16, thr=500, ratio=0.02, std=20, seeds=2), 96)
    assert choose([a, b])[0] is b
    # one seed: no noise estimate, the paper's argmax
    a1 = SlotChoice(_ev(64, 32, thr=510, ratio=0.09), 96)
    b1 = SlotChoice(_ev(64, 16, thr=500, ratio=0.02), 96)
    assert choose([a1, b1])[0] is a1
    # all starve: the least-starved one
    x = SlotChoice(_ev(16, 16, thr=900, ratio=0.4), None)
    y = SlotChoice(_ev(16, 8, thr=700, ratio=0.3), None)
    pick, _, all_starve = choose([x, y])
    assert pick is y and all_starve


# ---- on the twin ------------------------------------------------------------------------------------------------
WORKLOADS = [
    (LLAMA, (0.4, 0.2, 0.1), (8, 16, 32)),     # boundary inside the grid, rank 32 limits max_loras
    (QWEN, (0.1, 0.05, 0.025), (8, 16)),       # light
    (LLAMA, (3.2, 1.6, 0.8), (8, 8, 8)),       # heavy: everything starves
]


@pytest.mark.parametrize("model,rates,ranks", WORKLOADS)
def test_bisection_equals_exhaustive_on_a_small_grid(model, rates, ranks):
    wl = Workload(model, rates, ranks, duration=DUR)
    grid = [8, 16, 32, 64, 128]
    ev = Evaluator(wl)
    bis = search(wl, grid=grid, evaluator=ev)
    bis_runs = ev.runs
    exh = search(wl, grid=grid, exhaustive=True)
    assert (bis.best.served, bis.best.max_loras) == (exh.best.served, exh.best.max_loras)
    assert bis.best == exh.best and bis.all_starve == exh.all_starve
    assert [c.evaluation for c in bis.per_slot] == [c.evaluation for c in exh.per_slot]
    full_grid = sum(1 for g in grid for s in grid if g <= s and g not in exh.unstartable_slots)
    assert bis_runs <= full_grid and exh.runs <= full_grid  # the walk stops at its first starving point
    assert bis.method == "bisection" and exh.method == "exhaustive"


def test_never_recommends_a_configuration_vllm_cannot_start():
    # Llama at max_lora_rank 32: max_loras >= 128 fails at start-up (KV below max_model_len)
    wl = Workload(LLAMA, (0.0125, 0.00625, 0.003125), (8, 16, 32), duration=DUR)
    rec = search(wl, grid=[64, 128, 256])
    assert rec.best.max_loras == 64
    assert rec.unstartable_slots == [128, 256]
    assert all(c.evaluation.max_loras == 64 for c in rec.per_slot)
    with pytest.raises(ConfigError, match="cannot start any candidate"):
        search(wl, grid=[128, 256])


def test_all_starving_recommends_the_least_starved_and_says_so():
    wl = Workload(LLAMA, (3.2, 1.6, 0.8), (8, 8, 8), duration=DUR)
    rec = search(wl, grid=[64, 128])
    assert rec.all_starve and rec.best.starved and rec.notes
    assert rec.best.starvation_ratio == min(c.evaluation.starvation_ratio for c in rec.per_slot)
    assert rec.summary()["predicted_starved"] == 1


def test_runs_are_cached_by_configuration():
    wl = Workload(QWEN, (0.4,), (8,), duration=60.0)
    ev = Evaluator(wl)
    a = ev(16, 8)
    assert ev(16, 8) is a and ev.runs == 1 and ev.configs == 1


def test_integer_search_without_grid():
    wl = Workload(QWEN, (0.8, 0.4), (8,), duration=120.0)
    rec = search(wl, max_served=48)
    assert 1 <= rec.best.max_loras <= rec.best.served <= 48
    assert not rec.best.starved
    # the bisection's neighbour above starves (or the range ends)
    assert rec.headroom is None or rec.headroom >= 1


@pytest.mark.parametrize("kw,match", [
    (dict(rates=()), "no rates"),
    (dict(rates=(0.0, 0.0)), "all rates are zero"),
    (dict(rates=(-1.0,)), "finite and >= 0"),
    (dict(ranks=()), "no ranks"),
    (dict(ranks=(8, 32), max_lora_rank=16), "above --max-lora-rank"),
    (dict(duration=0), "duration"),
])
def test_invalid_workloads_raise_clear_errors(kw, match):
    base = dict(model=LLAMA, rates=(0.1,), ranks=(8,), duration=DUR)
    with pytest.raises(ConfigError, match=match):
        Workload(**{**base, **kw})


def test_rank_above_the_profiles_max_rank_and_bad_grids():
    with pytest.raises(ConfigError, match="largest rank"):
        Evaluator(Workload(LLAMA, (0.1,), (64,), duration=DUR))
    wl = Workload(LLAMA, (0.1,), (8,), duration=DUR)
    with pytest.raises(ConfigError, match="empty grid"):
        search(wl, grid=[])
    with pytest.raises(ConfigError, match="positive"):
        search(wl, grid=[0, 16])


# ---- CLI --------------------------------------------------------------------------------------------------------
def _cli(argv):
    parser = argparse.ArgumentParser()
    register_recommend(parser.add_subparsers())
    args = parser.parse_args(["recommend"] + argv)
    return args.func(args)


def test_cli_json_is_the_last_stdout_line(capsys):
    assert _cli(["--model", QWEN, "--rates", "0.4,0.2,0.1", "--ranks", "8,16,32", "--grid", "16,32,64",
                 "--duration", "120", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("served_adapters", "max_loras", "predicted_total_throughput", "predicted_starved", "method"):
        assert key in out
    assert out["method"] == "bisection" and out["predicted_starved"] in (0, 1)
    assert out["max_loras"] <= out["served_adapters"]


def test_cli_text_and_errors(capsys):
    assert _cli(["--model", QWEN, "--rates", "0.4", "--ranks", "8", "--grid", "16,32", "--duration", "60",
                 "--exhaustive"]) == 0
    assert "recommend: --max-cpu-loras" in capsys.readouterr().out
    for argv, match in [(["--rates", "0", "--ranks", "8"], "no traffic"),
                        (["--rates", "0.1", "--ranks", "64"], "largest rank"),
                        (["--rates", "0.1", "--ranks", "8", "--grid", ","], "--grid is empty"),
                        (["--rates", "0.1", "--ranks", "8", "--seeds", "0"], "--seeds")]:
        with pytest.raises(UserError, match=match):
            _cli(["--model", LLAMA, "--duration", "60"] + argv)


def test_paper_grid_constant():
    assert PAPER_GRID == (16, 32, 64, 96, 128, 160, 192, 256, 320, 384)
    assert all(a < b for a, b in itertools.pairwise(PAPER_GRID))


# ---- early stop (twin/settle.py) -----------------------------------------------------------------------------
from adaptwin.twin.config import ServerConfig, paper_workload  # noqa: E402
from adaptwin.twin.settle import Backlog, EarlyStop, SettlingRun, run_until_settled  # noqa: E402
from adaptwin.twin.lengths import load_lengths  # noqa: E402
from adaptwin.twin.profile import load_profile  # noqa: E402
from adaptwin.twin.sim import simulate  # noqa: E402


def _setup(model, rates, ranks, served, g, duration, seed=0):
    prof = load_profile(model)
    arr, ad_ranks = paper_workload(rates, ranks, served, duration, seed, load_lengths(prof.model))
    cfg = ServerConfig(model=prof.model, served=served, max_loras=g, adapter_ranks=ad_ranks, max_lora_rank=max(ranks))
    return cfg, arr, prof


def test_backlog_test_settles_growth_and_stability_and_waits_for_warm_up():
    rule = EarlyStop(warmup_s=300.0, z=4.0)
    grow = Backlog(offered=8_000.0, duration=3600.0, check_s=60.0)
    flat = Backlog(offered=10_000.0, duration=3600.0, check_s=60.0)
    for i in range(1, 6):
        grow.add(60.0 * i, 100.0 * i + (7 if i % 2 else -7))  # +100 tokens a minute: 6,000 by the end > 800
        flat.add(60.0 * i, 50.0 + (1 if i % 2 else -1))
        if i < 5:
            assert grow.verdict(rule) is None and flat.verdict(rule) is None  # still warming up
    assert flat.verdict(rule) is False
    assert grow.verdict(rule) is None  # 4 increments cannot rule out a queue that is about to level off
    for i in range(6, 13):
        grow.add(60.0 * i, 100.0 * i + (7 if i % 2 else -7))
    assert grow.verdict(rule) is True and grow.projected_ratio(rule) > 0.1  # twelve minutes of steady growth do
    # a loaded but stable server whose queue is still filling (a real run: 384 adapters at 0.1/0.025/0.0125 req/s,
    # backlog in k tokens per minute; it levels off at 7 % of the offered tokens): not read as overload
    filling = Backlog(offered=26_737.0, duration=3600.0, check_s=60.0)
    for i, u in enumerate([277, 471, 663, 860, 1022], start=1):
        filling.add(60.0 * i, u)
    assert filling.projection(rule)[0] >= 2_673.7  # a straight line says "starves" ...
    assert filling.verdict(rule) is None  # ... but the growth may be slowing down: not settled
    noisy = Backlog(offered=10_000.0, duration=3600.0, check_s=60.0)
    for i in range(1, 7):
        noisy.add(60.0 * i, 400.0 * (i % 2))  # swings as large as the threshold: not settled
    assert noisy.verdict(rule) is None


def test_a_run_checked_in_chunks_takes_exactly_the_steps_of_one_run():
    cfg, arr, prof = _setup(QWEN, (0.8, 0.4, 0.2), (8, 16), 48, 8, 900.0)
    never = EarlyStop(z=1e9)  # never settles: chunked all the way
    chunked = run_until_settled(cfg, arr, 900.0, prof, never)
    whole = run_until_settled(cfg, arr, 900.0, prof, None)
    ref = simulate(cfg, arr, 900.0, window_s=60.0, profile=prof).summary()  # the batch entry point, in one go
    drop = lambda s: {k: v for k, v in s.items() if k != "wall_s"}  # noqa: E731
    assert not chunked.early and drop(chunked.summary) == drop(whole.summary) == drop(ref)


@pytest.mark.parametrize("rates,served,g,want", [
    ((3.2, 1.6, 0.8), 48, 16, True),     # far beyond capacity: the backlog grows every minute
    ((0.05, 0.025), 16, 8, False),       # light: the backlog stays flat
])
def test_clear_verdicts_settle_early_and_match_the_full_run(rates, served, g, want):
    cfg, arr, prof = _setup(LLAMA, rates, (8, 16), served, g, 1800.0)
    run = SettlingRun(cfg, arr, 1800.0, prof)
    early = run.settle(EarlyStop())
    assert early.early and early.stopped_at <= 900.0 and early.starved is want
    full = run.finish()  # the same engine carried on to the end
    assert not full.early and full.starved is want
    fresh = run_until_settled(cfg, arr, 1800.0, prof, None)
    assert full.summary["total_throughput"] == fresh.summary["total_throughput"]


def test_search_with_early_stop_equals_exhaustive_and_reports_full_runs():
    wl = Workload(LLAMA, (1.6, 0.8, 0.4), (8, 16), duration=1200.0)
    grid = [8, 16, 32]
    ev = Evaluator(wl)
    fast = search(wl, grid=grid, evaluator=ev)
    exh = search(wl, grid=grid, exhaustive=True, evaluator=Evaluator(wl, early_stop=False))
    assert (fast.best.served, fast.best.max_loras) == (exh.best.served, exh.best.max_loras)
    assert fast.best == exh.best and not fast.best.early_stopped  # the choice comes from a full run
    assert ev.early_stopped >= 1 and fast.summary()["early_stopped_runs"] == ev.early_stopped


def test_exact_resumes_a_stopped_run():
    wl = Workload(LLAMA, (3.2, 1.6), (8,), duration=1800.0)
    ev = Evaluator(wl)
    quick = ev(32, 8)
    assert quick.early_stopped and quick.starved
    sure = ev.confirm(32, 8)  # the stricter rule carries the same run on (1200-s warm-up)
    assert sure.starved and ev.runs == 1 and ev.simulated_s >= 1200.0 and ev.confirm(32, 8) is sure
    full = ev.exact(32, 8)
    assert not full.early_stopped and full.starved and ev.runs == 1  # carried on, not run again
    assert full == Evaluator(wl, early_stop=False)(32, 8)


def test_seeds_give_a_spread_and_early_stop_respects_the_mean(capsys):
    assert _cli(["--model", QWEN, "--rates", "0.4,0.2", "--ranks", "8,16", "--grid", "8,16", "--duration", "120",
                 "--seeds", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["seeds"] == 2 and out["throughput_std"] > 0  # two arrival processes never give the same tokens
    # several seeds with early stop: a settled point is settled on every seed, a chosen one is a full run on each
    wl = Workload(LLAMA, (3.2, 1.6), (8,), duration=900.0, seeds=(0, 1))
    ev = Evaluator(wl)
    heavy = ev(32, 8)
    assert heavy.starved and heavy.starved_seeds == 2 and heavy.seeds == 2
    rec = search(wl, grid=[4, 8], evaluator=ev)
    assert not rec.best.early_stopped and rec.best.seeds == 2
