"""Adapter families: the torch benchmark computes what it claims (every variant against a per-request float64
reference, fused == unfused), its outputs have the twin's table shape, bad tables are refused with a clear error,
and the twin prices families from the shipped profiles (``lora`` exactly as before)."""
from __future__ import annotations

import ast
import copy
import csv
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from adaptwin.cli import main  # noqa: E402
from adaptwin.profiler import gpu_adapters as ga  # noqa: E402
from adaptwin.twin.profile import AdapterFamilyTable, Profile, ProfileError, load_profile  # noqa: E402
from adaptwin.twin.runner import run_scenario  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CAL = Path("/work/shared/data/calibration")
LLAMA, QWEN = "llama-3.1-8b-instruct", "qwen-2.5-7b-instruct"
SHIPPED = {m: ROOT / "twin" / "profiles" / f"h100-64gb__{m}.json" for m in (LLAMA, QWEN)}


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `profile adapters --quick` run (tiny shapes, both models) shared by the output tests."""
    out = tmp_path_factory.mktemp("adapters_quick")
    rc = main(["profile", "adapters", "--quick", "--out", str(out), "--json"])
    return rc, out


def _tiny_weights(rank=4, slots=4, dtype=torch.float64, model=LLAMA):
    return ga.LayerWeights(ga.SHAPES["tiny"][model], slots, rank, torch.device("cpu"), dtype, seed=3)


# ---- the benchmark computes the right things ---------------------------------------------------------------------


def test_gpu_script_imports_only_stdlib_numpy_torch():
    tree = ast.parse((ROOT / "profiler" / "gpu_adapters.py").read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots - set(sys.stdlib_module_names) <= {"numpy", "torch"}


@pytest.mark.parametrize("model", [LLAMA, QWEN])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("variant", ga.VARIANTS)
def test_every_variant_matches_a_per_request_reference(model, k, variant):
    w = _tiny_weights(model=model)
    x = torch.randn(8, w.shape.hidden, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
    got = ga.layer_forward(x, w, variant, k)
    assert ga.rel_err(got, ga.reference_forward(x, w, variant, k)) < 1e-10
    if variant != "base":  # the adapter really changes the output, and each segment uses its own slot
        assert ga.rel_err(got, ga.layer_forward(x, w, "base", k)) > 1e-5
        if k > 1:
            swapped = _tiny_weights(model=model)
            for a, bs in swapped.lora.values():
                a.copy_(a.flip(0))
            for pair in (swapped.parallel, swapped.series_attn, swapped.series_ffn):
                for t in pair:
                    t.copy_(t.flip(0))
            assert ga.rel_err(ga.layer_forward(x, swapped, variant, k), got) > 1e-6


def test_fused_equals_unfused_and_a_broken_fused_is_caught():
    w = _tiny_weights(rank=8, dtype=torch.float32)
    x = torch.randn(16, w.shape.hidden)
    assert ga.check_fused_equivalence(x, w, 4) < ga.EQUIV_TOL[torch.float32]
    w.fused(4)["down"][-1].add_(1.0)  # corrupt the last slot's A inside the fused weight
    with pytest.raises(ga.EquivalenceError, match="fused and unfused LoRA differ"):
        ga.check_fused_equivalence(x, w, 4)


def test_grid_points_and_bad_grids():
    g = ga.Grid((8,), (1, 2, 4), (4, 6))
    assert g.points() == [(8, 1, 4), (8, 1, 6), (8, 2, 4), (8, 2, 6), (8, 4, 4)]
    with pytest.raises(ValueError, match="no batch size"):
        ga.Grid((8,), (1, 16), (8,)).check()
    with pytest.raises(ValueError, match="increasing"):
        ga.Grid((16, 8), (1,), (8,)).check()


# ---- outputs: CSV, table, plots ------------------------------------------------------------------------------------


def test_quick_run_writes_csv_tables_and_plots(quick_run):
    rc, out = quick_run
    assert rc == 0
    with open(out / "adapters.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    grid = ga.GRIDS["tiny"]
    assert len(rows) == 2 * len(grid.points()) * len(ga.VARIANTS)
    assert set(rows[0]) == set(ga.CSV_COLUMNS)
    assert all(float(r["median_ms"]) > 0 for r in rows)
    assert all(float(r["equiv_rel_err"]) < ga.EQUIV_TOL[torch.float32] for r in rows if r["variant"] == "fused")
    for model in (LLAMA, QWEN):
        table = json.loads((out / f"adapter_family__{model}.json").read_text())
        parsed = AdapterFamilyTable.from_dict(table, "quick")
        assert parsed.ranks == grid.ranks and parsed.distinct == grid.distinct and parsed.measured_on == "cpu"
        assert set(parsed.multiplier) == set(ga.FAMILIES)
        assert all(v == 1.0 for r in parsed.multiplier["lora"] for v in r)
        assert all(v >= 0 for f in ga.FAMILIES for r in parsed.multiplier[f] for v in r)
        for kind in ("k", "rank"):
            root = ET.parse(out / f"overhead_vs_{kind}__{model}.svg").getroot()
            assert root.tag.endswith("svg") and len(root.findall("{http://www.w3.org/2000/svg}polyline")) >= 4


def test_table_is_the_ratio_of_fitted_overheads():
    rows = []
    for r in (8, 16):
        for k in (1, 4):
            for b in (4, 8):
                base = 10.0
                for v, ov in (("base", 0.0), ("lora", 2.0 * k), ("parallel", 1.0 * k), ("series", -0.5),
                              ("fused", 3.0 * k)):
                    rows.append({"model": LLAMA, "size": "tiny", "device": "cpu", "dtype": "float32",
                                 "mode": "eager", "rank": r, "distinct": k, "batch": b, "variant": v,
                                 "median_ms": base + ov, "overhead_ms": ov, "overhead_pct": 10 * ov,
                                 "equiv_rel_err": 1e-7 if v == "fused" else ""})
    t = ga.build_table(rows, LLAMA)
    assert t["multiplier"]["parallel"] == [[0.5, 0.5], [0.5, 0.5]]
    assert t["multiplier"]["fused"] == [[1.5, 1.5], [1.5, 1.5]]
    assert t["multiplier"]["series"] == [[0.0, 0.0], [0.0, 0.0]]  # a negative (noise) overhead counts as 0
    partial = [r for r in rows if not (r["variant"] == "fused" and r["rank"] == 16)]  # a run cut short
    assert ga.build_table(partial, LLAMA)["ranks"] == [8]
    with pytest.raises(ValueError, match="not measured for every variant"):
        ga.build_table([r for r in rows if not (r["variant"] == "fused" and r["distinct"] == 4)], LLAMA)


# ---- the twin reads the table ----------------------------------------------------------------------------------------


def _table(**mult):
    base = {"measured_on": "cpu", "ranks": [8, 32], "distinct": [1, 4, 16],
            "multiplier": {"lora": [[1.0] * 3, [1.0] * 3]}}
    base["multiplier"].update(mult)
    return base


@pytest.mark.parametrize("mutate, match", [
    (lambda t: t.pop("multiplier"), "field 'multiplier' is missing"),
    (lambda t: t.pop("measured_on"), "field 'measured_on' is missing"),
    (lambda t: t.update(ranks=[32, 8]), "ranks must be increasing positive integers"),
    (lambda t: t.update(distinct=[0, 4, 16]), "distinct must be increasing positive integers"),
    (lambda t: t["multiplier"].update(parallel=[[1.0, -0.5, 1.0], [1.0] * 3]), "negative"),
    (lambda t: t["multiplier"].update(parallel=[[1.0, 1.0], [1.0] * 3]), "must be 2 rows .ranks. of 3 values"),
    (lambda t: t["multiplier"].update(parallel=[[1.0, "x", 1.0], [1.0] * 3]), "finite number"),
    (lambda t: t["multiplier"].update(lora=[[1.0, 1.1, 1.0], [1.0] * 3]), "lora must be 1 everywhere"),
    (lambda t: t["multiplier"].update(dora=[[1.0] * 3, [1.0] * 3]), "unknown adapter family 'dora'"),
    (lambda t: t["multiplier"].pop("lora"), "include 'lora'"),
])
def test_bad_adapter_tables_are_refused_clearly(tmp_path, mutate, match):
    prof = json.loads(SHIPPED[LLAMA].read_text())
    prof["adapter_family"] = _table(parallel=[[0.5] * 3, [0.5] * 3])
    mutate(prof["adapter_family"])
    path = tmp_path / "p.json"
    path.write_text(json.dumps(prof))
    with pytest.raises(ProfileError, match=match):
        load_profile(path=path)


def test_multipliers_interpolate_in_log2_and_clamp():
    t = AdapterFamilyTable.from_dict(_table(series=[[1.0, 2.0, 4.0], [3.0, 6.0, 12.0]]), "t")
    m8 = t.multipliers("series", 8, 32)
    assert m8[1] == 1.0 and m8[4] == 2.0 and m8[16] == 4.0 and m8[32] == 4.0  # grid points, clamped above
    assert m8[2] == pytest.approx(1.5)  # half-way between 1 and 4 in log2
    assert t.multipliers("series", 16, 1)[1] == pytest.approx(2.0)  # half-way between ranks 8 and 32
    assert t.multipliers("series", 64, 4)[4] == 6.0 and t.multipliers("series", 4, 4)[4] == 2.0


def _summary(res):
    s = res.summary()
    s.pop("wall_s")
    return s


@pytest.mark.parametrize("model", [LLAMA, QWEN])
def test_shipped_profiles_carry_a_table_and_lora_is_unchanged(model):
    prof = load_profile(model)
    assert prof.adapter_family is not None and prof.adapter_family.measured_on in ("cpu", "cuda")
    assert set(prof.adapter_family.multiplier) == set(ga.FAMILIES)
    raw = json.loads(SHIPPED[model].read_text())
    raw.pop("adapter_family")
    without = Profile.from_dict(raw, path="no-table")
    args = (model, [0.4, 0.2, 0.1], [8, 16, 32], 24, 8, None, 300.0, 1)
    a = _summary(run_scenario(*args, profile=prof, adapter_family="lora"))
    assert a == _summary(run_scenario(*args, profile=without))


def test_families_scale_the_lora_terms_as_the_table_says(tmp_path):
    raw = json.loads(SHIPPED[LLAMA].read_text())
    raw["adapter_family"] = _table(parallel=[[0.25] * 3] * 2, series=[[4.0] * 3] * 2, fused=[[1.0] * 3] * 2)
    prof = Profile.from_dict(raw, path="synthetic")
    args = (LLAMA, [0.5, 0.25], [8, 16], 16, 8, None, 300.0, 2)
    itl = {f: run_scenario(*args, profile=prof, adapter_family=f).summary()["mean_itl_ms"]
           for f in ("parallel", "lora", "fused", "series")}
    assert itl["parallel"] < itl["lora"] < itl["series"]
    assert itl["fused"] == pytest.approx(itl["lora"], rel=1e-9)  # multiplier 1 everywhere: the same steps


# ---- CLI ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [LLAMA, QWEN])
def test_twin_run_adapter_family_works_without_profile(capsys, model):
    common = ["twin", "run", "--model", model, "--rates", "0.3,0.1", "--ranks", "8,16", "--served", "16",
              "--max-loras", "8", "--duration", "200", "--json"]
    res = {}
    for fam in (None, "lora", "parallel", "series", "fused"):
        rc, out, err = run_cli(capsys, *common, *(["--adapter-family", fam] if fam else []))
        assert rc == 0, err
        res[fam] = json.loads(out.strip().splitlines()[-1])
        res[fam].pop("wall_s")
    assert res["lora"] == res[None]
    assert all(res[f]["finished"] > 0 for f in res)


def test_twin_run_family_not_in_profile_is_a_clear_error(capsys, tmp_path):
    raw = json.loads(SHIPPED[LLAMA].read_text())
    raw.pop("adapter_family")
    path = tmp_path / "old.json"
    path.write_text(json.dumps(raw))
    rc, _, err = run_cli(capsys, "twin", "run", "--model", LLAMA, "--profile", str(path), "--rates", "0.1",
                         "--ranks", "8", "--served", "4", "--max-loras", "2", "--duration", "60",
                         "--adapter-family", "parallel", "--json")
    assert rc == 2 and "adapter family 'parallel'" in err and "profile it first" in err


def test_install_from_puts_tables_into_profiles(capsys, quick_run, tmp_path):
    _, out = quick_run
    targets = []
    for m, src in SHIPPED.items():
        raw = json.loads(src.read_text())
        raw.pop("adapter_family", None)
        (tmp_path / src.name).write_text(json.dumps(raw))
        targets.append(str(tmp_path / src.name))
    rc, stdout, _ = run_cli(capsys, "profile", "adapters", "--install-from", str(out), "--profiles", *targets,
                            "--json")
    assert rc == 0 and len(json.loads(stdout.splitlines()[-1])["installed"]) == 2
    for t in targets:
        prof = load_profile(path=t)
        assert prof.adapter_family.ranks == ga.GRIDS["tiny"].ranks


@pytest.mark.skipif(not CAL.is_dir(), reason="shared calibration data not available")
def test_twin_fit_carries_an_adapter_table(capsys, quick_run, tmp_path):
    _, out = quick_run
    for src in (out / f"adapter_family__{LLAMA}.json", out / "adapters.csv"):
        prof_path = tmp_path / f"fit-{src.suffix[1:]}.json"
        rc, _, err = run_cli(capsys, "twin", "fit", "--calibration", str(CAL), "--model", LLAMA,
                             "--out", str(prof_path), "--adapter-table", str(src))
        assert rc == 0, err
        assert load_profile(path=prof_path).adapter_family.distinct == ga.GRIDS["tiny"].distinct
    bad = copy.deepcopy(json.loads((out / f"adapter_family__{LLAMA}.json").read_text()))
    bad["multiplier"]["series"][0][0] = -1.0
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    rc, _, err = run_cli(capsys, "twin", "fit", "--calibration", str(CAL), "--model", LLAMA,
                         "--out", str(tmp_path / "x.json"), "--adapter-table", str(tmp_path / "bad.json"))
    assert rc == 2 and "negative" in err
    rc, _, err = run_cli(capsys, "twin", "fit", "--calibration", str(CAL), "--model", QWEN,
                         "--out", str(tmp_path / "y.json"), "--adapter-table", str(out / f"adapter_family__{LLAMA}.json"))
    assert rc == 2 and "not 'qwen-2.5-7b-instruct'" in err


def test_gpu_script_main_runs_standalone_on_cpu(tmp_path, capsys):
    """What the lead runs on the GPU (`python3 profiler/gpu_adapters.py --out DIR`), here with tiny shapes."""
    rc = ga.main(["--out", str(tmp_path), "--quick", "--device", "cpu", "--models", QWEN])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["tables"] == [QWEN] and summary["rows"] == len(ga.GRIDS["tiny"].points()) * len(ga.VARIANTS)
    AdapterFamilyTable.from_dict(json.loads((tmp_path / f"adapter_family__{QWEN}.json").read_text()), "main")
    assert (tmp_path / "gpu_adapters.log").stat().st_size > 0


@pytest.mark.parametrize("argv, match", [
    (["--quick", "--distinct", "1,16", "--batches", "8"], "no batch size is a multiple of distinct adapters"),
    (["--quick", "--ranks", "16,8"], "increasing positive integers"),
    *([(["--device", "cuda", "--quick"], "torch sees no GPU")] if not torch.cuda.is_available() else []),
])
def test_profile_adapters_bad_arguments_are_clear_errors(capsys, tmp_path, argv, match):
    rc, _, err = run_cli(capsys, "profile", "adapters", "--out", str(tmp_path), *argv)
    assert rc == 2 and match in err
    assert not (tmp_path / "adapters.csv").exists()


def test_plots_from_a_finished_run(capsys, quick_run, tmp_path):
    """After the GPU run: the stand-alone script writes no plots; `--plots-from DIR` draws them from its CSV."""
    _, out = quick_run
    (tmp_path / "adapters.csv").write_bytes((out / "adapters.csv").read_bytes())
    rc, stdout, _ = run_cli(capsys, "profile", "adapters", "--plots-from", str(tmp_path), "--json")
    assert rc == 0 and len(json.loads(stdout.splitlines()[-1])["plots"]) == 4
    ET.parse(tmp_path / f"overhead_vs_k__{LLAMA}.svg")
    rc, _, err = run_cli(capsys, "profile", "adapters", "--plots-from", str(tmp_path / "nowhere"))
    assert rc == 2 and "cannot read adapter table" in err
