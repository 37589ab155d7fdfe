"""Learner: prequential metrics on a hand-checked dataset, dataset reading, warm-start selection, CLI contract."""

from __future__ import annotations

import doctest
import importlib
import io
import json

import pytest

from adaptwin.cli import main
from adaptwin.learner.dataset import DatasetError, Run, read_runs
from adaptwin.learner.features import Scenario, features, ideal_throughput
from adaptwin.learner.metrics import PrequentialMetrics
from adaptwin.learner.prequential import config_regret, evaluate
from adaptwin.learner.warmstart import select_warm_runs

MODEL = "llama-3.1-8b-instruct"
HEADER = "model,rates,ranks,served_adapters,max_loras,max_lora_rank,duration_s,total_throughput,starved,extra\n"


@pytest.mark.parametrize("module", ["features", "dataset", "metrics", "conformal", "models", "prequential"])
def test_doctests(module):
    mod = importlib.import_module(f"adaptwin.learner.{module}")
    result = doctest.testmod(mod)
    assert result.failed == 0 and result.attempted > 0


def test_metrics_hand_checked():
    m = PrequentialMetrics()
    # |y-p|/(|y|+|p|): 10/190, 0, 20/40  -> mean 100*(0.0526316+0+0.5)/3 = 18.4211
    for y, p, s, ps, iv in [(100, 90, 0, 0, (80, 95)), (50, 50, 1, 1, (40, 60)), (10, 30, 1, 0, (20, 40))]:
        m.update(y, p, s, ps, iv)
    assert m.half_smape == pytest.approx(100 * (10 / 190 + 0 + 0.5) / 3)
    assert m.smape == pytest.approx(2 * m.half_smape)
    assert m.accuracy == pytest.approx(2 / 3)
    assert m.f1 == pytest.approx(2 * 1 / (2 * 1 + 0 + 1))  # tp=1 fp=0 fn=1
    assert m.coverage == pytest.approx(1 / 3)


def _tiny_csv(tmp_path):
    """Three runs that complete exactly the offered load, then one that completes half of it and starves."""
    rows = []
    for served in (8, 16, 32, 64):
        s = Scenario.round_robin(MODEL, [0.1, 0.05], [8, 16], served, 8)
        frac = 0.5 if served == 64 else 1.0
        rows.append(f"{MODEL},0.1;0.05,8;16,{served},8,16,3600,{ideal_throughput(s) * frac!r},{int(frac < 1)},x\n")
    path = tmp_path / "tiny.csv"
    path.write_text(HEADER + "".join(rows))
    return path


def test_prequential_hand_checked(tmp_path):
    # The linear model starts at log ratio 0 (= the offered load) and, learning targets of exactly 0, stays there:
    # rows 1-3 are predicted exactly; row 4 (half the load) is predicted at the full load before it is learned.
    runs = read_runs(_tiny_csv(tmp_path))
    rep = evaluate(runs, candidates=["linear"])
    assert rep["rows"] == 4 and rep["model"] == "linear"
    assert rep["throughput_half_smape"] == pytest.approx(100 * (0.5 / 1.5) / 4, abs=1e-3)
    assert rep["throughput_smape"] == pytest.approx(2 * rep["throughput_half_smape"], abs=1e-3)
    assert rep["starvation_accuracy"] == pytest.approx(0.75)
    assert rep["starvation_f1"] == 0.0
    assert rep["candidates"]["linear"]["starvation_f1_derived"] == 0.0


def test_cli_evaluate_json(tmp_path, capsys):
    path = _tiny_csv(tmp_path)
    assert main(["learn", "evaluate", "--dataset", str(path), "--models", "linear,hoeffding", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    rep = json.loads(out)
    for key in ("throughput_half_smape", "throughput_smape", "starvation_accuracy", "starvation_f1", "predict_ms",
                "learn_ms", "model", "interval_coverage"):
        assert key in rep
    assert rep["model"] in ("linear", "hoeffding")
    assert set(rep["candidates"]) == {"linear", "hoeffding"}


def test_cli_missing_column(tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("model,rates,ranks,served_adapters,max_loras,duration_s,total_throughput,starved\n")
    assert main(["learn", "evaluate", "--dataset", str(path), "--json"]) == 2
    err = capsys.readouterr().err
    assert "max_lora_rank" in err


def test_malformed_row_names_line():
    text = HEADER + f"{MODEL},0.1;x,8,8,8,8,3600,10,0,\n"
    with pytest.raises(DatasetError, match="line 2"):
        read_runs(io.StringIO(text))
    text = HEADER + f"{MODEL},0.1,8,8,8,8,3600,10,2,\n"
    with pytest.raises(DatasetError, match="starved"):
        read_runs(io.StringIO(text))


def test_grid_layout_rescales_lengths():
    text = ("model,served_adapters,adapter_slots,rates,sizes,max_size,rate_counts,size_counts,sim_total_throughput,"
            "mean_tokens_per_request_used,starved_est,status\n"
            f"{MODEL},16,16,3.2;1.6;0.8,8;8;16,16,6;5;5,11;0;5,1000,500,1,ok\n")
    run = read_runs(io.StringIO(text))[0]
    assert run.scenario.rate_counts == (6, 5, 5) and run.scenario.max_lora_rank == 16
    from adaptwin.learner.features import model_facts
    assert run.throughput == pytest.approx(1000 * model_facts(MODEL).mean_tokens / 500)
    assert run.starved == 1


def test_features_are_inputs_only():
    s = Scenario.round_robin(MODEL, [1.6, 0.8, 0.4], [8, 16, 32], 96, 32)
    x = features(s)
    assert all(isinstance(v, float) for v in x.values())
    assert x["rank32_share"] == pytest.approx(1 / 3)
    assert x["hot_adapters"] <= 96 and x["top_share"] == pytest.approx(32 * 1.6 / (32 * 2.8))


def test_select_warm_runs_prefers_same_workload():
    ds = [Run(Scenario.round_robin(MODEL, [0.1, 0.05], [8], 16, 16), 1.0, 0)]
    same = [Run(Scenario.round_robin(MODEL, [0.05, 0.1], [8], n, 8), 1.0, 0) for n in (8, 16)]
    other = [Run(Scenario.round_robin(MODEL, [3.2], [8], n, 8), 1.0, 1) for n in range(8, 40)]
    qwen = [Run(Scenario.round_robin("qwen-2.5-7b-instruct", [0.1], [8], 8, 8), 1.0, 0)]
    picked = select_warm_runs(other + same + qwen, ds, limit=5)
    assert len(picked) == 5 and all(r in picked for r in same)
    assert not any(r.scenario.model.startswith("qwen") for r in picked)


def test_config_regret():
    wl = lambda n, thr, st: Run(Scenario.round_robin(MODEL, [0.1], [8], n, 8), thr, st)  # noqa: E731
    runs = [wl(8, 100.0, 0), wl(16, 190.0, 0), wl(32, 150.0, 1)]
    rep = config_regret(runs, predicted=[100.0, 180.0, 300.0], predicted_starved=[0, 0, 1])
    assert rep["config_regret_pct_mean"] == 0.0 and rep["workloads"] == 1
    rep = config_regret(runs, predicted=[100.0, 180.0, 300.0], predicted_starved=[0, 1, 1])
    assert rep["config_regret_pct_mean"] == pytest.approx(100 * 90 / 190, abs=1e-3)


def test_twin_warm_start_small(tmp_path):
    pytest.importorskip("adaptwin.twin.runner")
    from adaptwin.learner.warmstart import twin_warm_runs

    ds = [Run(Scenario.round_robin(MODEL, [0.05], [8], 8, 8, duration_s=60.0), 1.0, 0)]
    cache = tmp_path / "twin.jsonl"
    runs = twin_warm_runs(ds, budget_s=60, jobs=1, cache=cache, grid=(8, 16))
    assert [(r.scenario.served, r.scenario.max_loras) for r in sorted(runs, key=lambda r: (r.scenario.served, r.scenario.max_loras))] == \
        [(8, 8), (16, 8), (16, 16)]
    assert all(r.throughput > 0 for r in runs)
    again = twin_warm_runs(ds, budget_s=0.0, jobs=1, cache=cache, grid=(8, 16))  # all cached: no budget needed
    assert len(again) == 3
