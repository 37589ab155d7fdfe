"""CPU checks of profiler/gpu_measure.py at tiny shapes: the script's functions compute the right things and its
outputs have the committed schema. Needs torch (not in the project venv: the test is skipped there; see
docs/gpu-profile.md for how to run it)."""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "profiler" / "gpu_measure.py"
MEASURED = ROOT / "profiler" / "measured"


@pytest.fixture(scope="module")
def gm(load_script):
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def quick_run(gm, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_measure_quick")
    rc = gm.main(["--out", str(out), "--quick", "--device", "cpu", "--budget-s", "300"])
    return rc, out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_script_imports_only_stdlib_numpy_torch():
    import ast

    tree = ast.parse(SCRIPT.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    third_party = roots - set(sys.stdlib_module_names)
    assert third_party <= {"numpy", "torch"}, third_party


def test_true_shapes_give_known_sizes(gm):
    llama, qwen = gm.SPECS["llama-3.1-8b-instruct"], gm.SPECS["qwen-2.5-7b-instruct"]
    assert llama.kv_bytes_per_token() == 131072  # 2 * 32 layers * 8 heads * 128 * 2 bytes
    assert qwen.kv_bytes_per_token() == 57344  # 2 * 28 * 4 * 128 * 2
    assert llama.weight_params() == 8_030_261_248  # Llama-3.1-8B's parameter count
    assert abs(qwen.weight_params() - 7_615_616_512) < 1_000  # Qwen2.5-7B's parameter count
    # one LoRA slot of rank 1 on q,k,v,o,gate,up,down costs as many bytes as the paper's KV table loses per slot·rank
    slope = gm.PAPER["kv_linear_fit"]["qwen-2.5-7b-instruct"][1]
    assert qwen.lora_params_per_rank() * 2 / qwen.kv_bytes_per_token() == pytest.approx(slope, rel=0.01)


def test_gathered_lora_matches_per_token_reference(gm):
    g = torch.Generator().manual_seed(0)
    n, d_in, d_out, rank, distinct = 12, 24, 20, 4, 3
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64)
    a = torch.randn(5, rank, d_in, generator=g, dtype=torch.float64)
    b = torch.randn(5, d_out, rank, generator=g, dtype=torch.float64)
    got = gm.gathered_lora_linear(x, a, b, distinct)
    idx = torch.arange(n) // (n // distinct)  # tokens sorted into equal adapter segments
    ref = torch.stack([b[idx[i]] @ (a[idx[i]] @ x[i]) for i in range(n)])
    assert torch.allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_decode_attention_folds_gqa_correctly(gm):
    g = torch.Generator().manual_seed(1)
    bsz, kvh, group, ctx, d = 3, 2, 4, 9, 16
    q = torch.randn(bsz, kvh * group, 1, d, generator=g)
    k = torch.randn(bsz, kvh, ctx, d, generator=g)
    v = torch.randn(bsz, kvh, ctx, d, generator=g)
    got = gm.decode_attention(q.view(bsz, kvh, group, d), k, v, None).reshape(bsz, kvh * group, 1, d)
    ref = gm.reference_attention(q, k, v, causal=False)
    assert float((got.double() - ref).norm() / ref.norm()) < 1e-5


def test_prefill_attention_is_causal_gqa(gm):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 8, 7, 16, generator=g)
    k = torch.randn(2, 2, 7, 16, generator=g)
    v = torch.randn(2, 2, 7, 16, generator=g)
    ref = gm.reference_attention(q, k, v, causal=True)
    for backend in (None, "MATH:repeat"):
        got = gm.prefill_attention(q, k, v, backend)
        assert float((got.double() - ref).norm() / ref.norm()) < 1e-5


def test_step_runs_and_writes_kv(gm):
    spec = gm.TINY_SPECS["qwen-2.5-7b-instruct"]
    dev, dt = torch.device("cpu"), torch.float32
    w = gm.DecoderWeights(spec, dev, dt)
    kv = gm.KVPool(spec, 256, dev, dt)
    rope = w.rope_tables(64)
    lora = gm.LoraSlots(spec, 4, 2, dev, dt)
    shape = gm.StepShape(decode=4, context=8, prompts=2, prompt_len=5)
    before = kv.k[0].clone()
    ids = gm.Step(w, kv, shape, {"decode": None, "prefill": None}, rope)()
    assert ids.shape == (4 + 2,) and bool(((ids >= 0) & (ids < spec.vocab)).all())
    assert not torch.equal(before, kv.k[0])  # the new tokens' K went into the cache
    lora_ids = gm.Step(w, kv, gm.StepShape(decode=4, context=8, lora_distinct=2), {"decode": None, "prefill": None},
                       rope, lora)()
    assert lora_ids.shape == (4,)
    with pytest.raises(ValueError):
        gm.Step(w, kv, gm.StepShape(decode=4, context=8, lora_distinct=3), {"decode": None, "prefill": None}, rope,
                lora)
    with pytest.raises(ValueError):
        gm.Step(w, kv, gm.StepShape(decode=64, context=8), {"decode": None, "prefill": None}, rope)


def test_fit_linear_recovers_constants(gm):
    f = gm.fit_linear([1, 2, 4, 8], [2.5 + 0.5 * x for x in (1, 2, 4, 8)])
    assert f["constant_0"] == pytest.approx(0.5) and f["constant_1"] == pytest.approx(2.5) and f["r2"] == 1.0
    j = gm.fit_lora_joint([1, 2, 4, 1, 2, 4], [8, 8, 8, 32, 32, 32],
                          [100 + 1.0 * d + 0.01 * d * r for d, r in zip([1, 2, 4] * 2, [8] * 3 + [32] * 3)])
    assert j["a1"] == pytest.approx(100) and j["a0_per_adapter"] == pytest.approx(1.0)
    assert j["a2_per_adapter_rank"] == pytest.approx(0.01)


def test_kv_capacity_rule(gm):
    spec = gm.SPECS["llama-3.1-8b-instruct"]
    w = spec.weight_params() * 2
    t8 = gm.kv_capacity_tokens(spec, 63.43, w, 0, 0, 8, 8)
    t16 = gm.kv_capacity_tokens(spec, 63.43, w, 0, 0, 8, 16)
    assert t8 % 16 == 0 and t8 > t16 > 0
    assert t8 - t16 == pytest.approx(8 * 8 * spec.lora_params_per_rank() * 2 / spec.kv_bytes_per_token(), abs=16)
    assert gm.kv_capacity_tokens(spec, 10.0, w, 0, 0, 8, 8) == 0  # weights alone exceed the card


def test_quick_run_writes_schema(gm, quick_run):
    rc, out = quick_run
    assert rc == 0
    expected = {"gpu_decode.csv": gm.DECODE_COLUMNS, "gpu_prefill.csv": gm.PREFILL_COLUMNS,
                "gpu_lora.csv": gm.LORA_COLUMNS, "gpu_loading.csv": gm.LOADING_COLUMNS}
    for name, cols in expected.items():
        with open(out / name, newline="") as f:
            assert next(csv.reader(f)) == cols, name
        rows = _rows(out / name)
        assert rows and all(r["status"] == "ok" for r in rows), name
        for r in rows:
            assert float(r["median_ms"]) > 0 and float(r["p10_ms"]) <= float(r["median_ms"]) <= float(r["p90_ms"])
    models = {r["model"] for r in _rows(out / "gpu_decode.csv")}
    assert models == set(gm.SPECS)
    lora = _rows(out / "gpu_lora.csv")
    assert {int(r["adapters_with_traffic"]) for r in lora} == {1, 2, 4, 8}
    for r in lora:
        ratio = 100 * float(r["mean_itl_ms"]) / float(r["baseline_itl_ms"])
        assert float(r["itl_overhead_pct"]) == pytest.approx(ratio, rel=1e-3)
    assert (out / "comparison.md").read_text().startswith("# torch-measured GPU step times")


def test_quick_run_fragment(gm, quick_run):
    _, out = quick_run
    frag = json.loads((out / "gpu_profile_fragment.json").read_text())
    assert frag["format"] == gm.FORMAT and frag["version"] == gm.FORMAT_VERSION
    md = frag["metadata"]
    assert md["quick"] is True and md["device_type"] == "cpu" and md["torch"] and md["date_utc"]
    for name, m in frag["models"].items():
        assert not m["errors"], m["errors"]
        dec = m["default_latency"]["decode"]
        assert math.isfinite(dec["constant_0"]) and math.isfinite(dec["constant_1"])
        assert set(m["adapter_loading"]) == {"8", "16"}
        assert m["lora_compute_overhead"]["constant_2"] == 1.0
        assert m["kv"]["kv_bytes_per_token"] == gm.TINY_SPECS[name].kv_bytes_per_token()


def test_rebuild_reproduces_fragment(gm, quick_run, tmp_path):
    _, out = quick_run
    frag = gm.rebuild(out, tmp_path)
    old = json.loads((out / "gpu_profile_fragment.json").read_text())
    for name in old["models"]:
        assert frag["models"][name]["default_latency"]["decode"]["constant_0"] == pytest.approx(
            old["models"][name]["default_latency"]["decode"]["constant_0"], rel=1e-4)
    assert (tmp_path / "gpu_decode.csv").read_text() == (out / "gpu_decode.csv").read_text()


def test_committed_measurement_is_complete(gm):
    """The committed H200 run: every row ok, true shapes, both models, fits in the paper's forms."""
    frag = json.loads((MEASURED / "gpu_profile_fragment.json").read_text())
    assert frag["metadata"]["quick"] is False and frag["metadata"]["device_type"] == "cuda"
    assert set(frag["models"]) == set(gm.SPECS)
    for name, m in frag["models"].items():
        assert m["spec"]["hidden"] == gm.SPECS[name].hidden and not m["errors"]
        dec = m["default_latency"]["decode"]
        assert 0 < dec["constant_0"] < 1 and 0 < dec["constant_1"] < 50 and dec["r2"] > 0.9
        assert set(m["adapter_loading"]) == {"8", "16", "32"}
    for name in ("gpu_decode.csv", "gpu_prefill.csv", "gpu_lora.csv", "gpu_loading.csv"):
        rows = _rows(MEASURED / name)
        assert rows and all(r["status"] == "ok" for r in rows), name
