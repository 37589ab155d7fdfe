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
