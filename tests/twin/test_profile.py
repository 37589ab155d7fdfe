import json
from pathlib import Path

import pytest

from adaptwin.profiler.fit import fit_profile
from adaptwin.twin.profile import Profile, ProfileError, known_profiles, load_profile

from .conftest import LLAMA, QWEN

CAL = Path("/work/shared/data/calibration")
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("model", [LLAMA, QWEN])
def test_shipped_profile_loads_with_metadata(model):
    p = load_profile(model)
    assert p.model == model and p.gpu == "h100-64gb"
    assert p.meta["vllm_version"] == "0.8.5" and p.meta["dtype"] == "bfloat16"
    assert set(p.meta["sources"]) >= {"base_ms", "prefill_ms_per_token", "loading_ms", "kv_capacity"}
    assert p.step.base_ms > 0 and p.step.decode_ms_per_seq > 0 and p.step.prefill_ms_per_token > 0


def test_kv_capacity_exact_table_and_failed_configs():
    p = load_profile(LLAMA)
    assert p.kv_capacity_tokens(128, 8) == 253568
    assert (128, 32) in p.kv_failed
    # not measured: the linear fit in max_loras * max_lora_rank, decreasing
    assert p.kv_capacity_tokens(48, 8) > p.kv_capacity_tokens(48, 16) > 0


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ProfileError, match="unknown model 'gpt-9'.*llama-3.1-8b-instruct"):
        load_profile("gpt-9")
    assert "h100-64gb__llama-3.1-8b-instruct" in known_profiles()


def _shipped(model):
    return json.loads((ROOT / "twin" / "profiles" / f"h100-64gb__{model}.json").read_text())


def test_missing_field_and_negative_latency_rejected(tmp_path):
    d = _shipped(LLAMA)
    del d["step_time"]["base_ms"]
    with pytest.raises(ProfileError, match="base_ms.*missing"):
        Profile.from_dict(d)
    d = _shipped(LLAMA)
    d["step_time"]["decode_ms_per_seq"] = -1.0
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match="negative"):
        load_profile(path=f)
    f.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(path=f)


@pytest.mark.skipif(not CAL.is_dir(), reason="shared calibration data not available")
@pytest.mark.parametrize("model", [LLAMA, QWEN])
def test_fit_reproduces_shipped_profile(model):
    """The shipped JSON is the output of `adaptwin twin fit` on the shared CSVs (plus the real-run terms it records)."""
    shipped = _shipped(model)
    real = shipped["meta"]["sources"].get("real_params")
    fitted = fit_profile(CAL, model, real_params=real)
    for key, value in shipped["step_time"].items():
        assert fitted["step_time"][key] == pytest.approx(value, rel=1e-6), key
    assert fitted["kv_capacity"]["table"] == shipped["kv_capacity"]["table"]
    assert fitted["scheduler"] == pytest.approx(shipped["scheduler"], rel=1e-6)


@pytest.mark.skipif(not CAL.is_dir(), reason="shared calibration data not available")
def test_fit_carries_the_measured_rank_kernel_terms(tmp_path):
    """`twin fit --real-params` puts twin_fidelity's (GPU-measured) ``lora_rank_block_*`` terms into the profile,
    with their source, and the profile loads with them priced."""
    terms = {"lora_rank_block_ms_per_adapter": 0.08, "lora_rank_block_ms_per_slot_ktoken": 0.2,
             "lora_rank_block_ms_per_adapter_large": 0.03, "lora_rank_block_split_tokens": 128.0}
    fitted = fit_profile(CAL, LLAMA, real_params={"lora_ms_per_adapter": 0.4, **terms})
    assert {k: fitted["step_time"][k] for k in terms} == terms
    assert "gpu_lora_kernels" in fitted["meta"]["sources"]["lora_rank_block_ms_per_adapter"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(fitted))
    st = load_profile(path=path).step
    assert st.rank_kernel_ms(32, 7, 60, 4) == pytest.approx(4 * 0.08 + 8 * 0.2 * 0.06)
    assert st.rank_kernel_ms(16, 7, 60, 4) == 0.0


def test_decode_fit_finds_the_knee_and_keeps_a_straight_line():
    """A batch bound by reading the weights costs less per sequence than a compute-bound one: the decode fit finds a
    knee in such points (and its cost above it) and keeps a straight line when there is none."""
    from adaptwin.profiler.fit import decode_ms, fit_decode

    def rows(itl):
        return [{"model": "m", "experiment": "decode", "status": "ok", "mean_batch_size": str(n),
                 "set_input_length": "1", "set_output_length": "100", "mean_itl_ms": str(itl(n))}
                for n in (40, 90, 170, 260, 350, 480, 620, 760, 850)]

    kneed, fit = fit_decode(rows(lambda n: 12.0 + 0.03 * n + 0.02 * max(0, n - 250)), "m")
    assert kneed["decode_knee_seqs"] == 250 and fit["rmse"] < 1e-9 < fit["straight_line_rmse"]
    assert kneed["decode_ms_per_seq_above_knee"] == pytest.approx(0.02) and kneed["base_ms"] == pytest.approx(12.0)
    assert decode_ms(kneed, 600.0) == pytest.approx(12.0 + 0.03 * 600 + 0.02 * 350)
    line, _ = fit_decode(rows(lambda n: 10.0 + 0.05 * n), "m")
    assert line["decode_knee_seqs"] == 0 and line["decode_ms_per_seq_above_knee"] == 0
    assert line["decode_ms_per_seq"] == pytest.approx(0.05)


@pytest.mark.parametrize("model", [LLAMA, QWEN])
def test_shipped_decode_has_a_knee_and_the_engine_prices_it(model):
    from adaptwin.twin import Engine, ServerConfig

    st = load_profile(model).step
    assert st.decode_knee_seqs > 0 and st.decode_ms_per_seq_above_knee > 0
    eng = Engine(ServerConfig(model=model, served=8, max_loras=8, adapter_ranks=(8,) * 8), load_profile(model))
    for n in (0, int(st.decode_knee_seqs), int(st.decode_knee_seqs) + 100):
        assert eng._decode_ms(n) == pytest.approx(st.decode_ms(n))
    above = st.decode_ms(st.decode_knee_seqs + 100) - st.decode_ms(st.decode_knee_seqs)
    assert above == pytest.approx(100 * (st.decode_ms_per_seq + st.decode_ms_per_seq_above_knee))


@pytest.mark.parametrize("value, message", [(-0.08, "negative"), ("fast", "finite number")])
def test_bad_rank_kernel_term_is_rejected_by_name(value, message):
    """A hand-edited ``lora_rank_block_*`` term is validated like every step field: a clear error naming it."""
    d = _shipped(LLAMA)
    d["step_time"]["lora_rank_block_ms_per_adapter"] = value
    with pytest.raises(ProfileError, match=f"lora_rank_block_ms_per_adapter.*{message}"):
        Profile.from_dict(d)
