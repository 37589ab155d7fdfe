"""CPU checks of profiler/gpu_lora_kernels.py: its Triton kernels (run by Triton's interpreter) compute the LoRA
product, and a quick run writes the CSV and JSON the GPU run will write."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "profiler" / "gpu_lora_kernels.py"


@pytest.fixture(scope="module")
def lk(load_script):
    """The module, imported without launching a kernel (no interpreter needed for its plain-torch helpers)."""
    return load_script(SCRIPT)


def test_quick_cpu_run_checks_the_kernels_and_writes_its_outputs(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--device", "cpu", "--quick",
                           "--check"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "lora_kernels.json").read_text())
    assert doc["meta"]["interpreter"] is True
    assert doc["meta"]["check_max_rel_error"] < 1e-4  # the kernels against gathered matmuls, fp32
    with open(tmp_path / "lora_kernels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and doc["meta"]["points"] == "12/12"
    assert {r["max_lora_rank"] for r in rows} == {"8", "16", "32"} and all(float(r["ms"]) > 0 for r in rows)
    fits = doc["fits"]["tiny"]
    assert set(fits) == {"8", "16", "32"} and fits["16"]["adapter_cost_vs_rank16"] == pytest.approx(1.0)
    assert doc["rank_kernel"]["tiny"]["points"] > 0  # rank 32 against 16 at the quick grid's points


def test_batch_sorts_tokens_into_adapter_slots(lk):
    b = lk.Batch.make(10, 3, 5, "cpu")
    assert sorted(b.tokens.tolist()) == list(range(10))
    assert b.slots.tolist() == [0, 1, 2, -1, -1, -1]  # max_loras + 1 slots, the empty ones -1
    assert b.counts.tolist() == [4, 3, 3, 0, 0, 0] and b.starts.tolist()[:3] == [0, 4, 7]
    slot = lk.token_slots(b, 10)
    assert [int(slot[t]) for t in b.tokens[:4].tolist()] == [0] * 4


def test_fit_recovers_known_costs(lk):
    rows = [dict(model="m", max_lora_rank=r, tokens=t, distinct=d, max_loras=ml,
                 ms=(1.0 + 0.01 * t + (0.2 if r <= 16 else 0.34) * d + 0.003 * (ml + 1)))
            for r in (16, 32) for t in (16, 128, 512) for d in (1, 8) for ml in (8, 64)]
    f = lk.fit(rows)["m"]
    assert f["16"]["ms_per_adapter"] == pytest.approx(0.2, rel=1e-6)
    assert f["32"]["adapter_cost_vs_rank16"] == pytest.approx(1.7, rel=1e-6)
    assert f["32"]["ms_per_token"] == pytest.approx(0.01, rel=1e-6)
    assert f["32"]["ms_per_slot"] == pytest.approx(0.003, rel=1e-6)


def test_unknown_model_is_a_clear_error(lk, capsys):
    with pytest.raises(SystemExit) as exc:
        lk.parse_args(["--out", "x", "--models", "llama-3.1-8b-instruct,gpt-9"])
    assert exc.value.code == 2 and "unknown model(s) gpt-9" in capsys.readouterr().err


def _kernel_rows(below=(0.004, 0.08, 0.2), above=(0.0, 0.03, 0.03)) -> list[dict]:
    """Step times whose rank blocks beyond 16 add slot·S + adapter·A + slot_ktoken·S·M/1000 each, by tiling."""
    rows = []
    for r in (16, 32, 64):
        b = {16: 0, 32: 1, 64: 3}[r]
        for t in (16, 64, 128, 512):
            c = below if t < 128 else above
            for d in (1, 8):
                for ml in (8, 64, 384):
                    extra = b * (c[0] * (ml + 1) + c[1] * d + c[2] * (ml + 1) * t / 1000)
                    rows.append(dict(model="m", max_lora_rank=r, tokens=t, distinct=d, max_loras=ml,
                                     ms=1.0 + 0.01 * t + 0.2 * d + extra))
    return rows


def test_rank_kernel_recovers_the_rank_block_terms_by_tiling(lk):
    k = lk.rank_kernel(_kernel_rows())["m"]
    assert k["lora_rank_block_split_tokens"] == 128.0
    assert [k[f"lora_rank_block_ms_{n}"] for n in ("per_slot", "per_adapter", "per_slot_ktoken")] == \
        pytest.approx([0.004, 0.08, 0.2], abs=1e-9)
    assert [k[f"lora_rank_block_ms_{n}_large"] for n in ("per_slot", "per_adapter", "per_slot_ktoken")] == \
        pytest.approx([0.0, 0.03, 0.03], abs=1e-9)
    # a term the data push below 0 is dropped (0), not fitted negative: the profile rejects negative terms
    neg = lk.rank_kernel(_kernel_rows(above=(-0.002, 0.03, 0.03)))["m"]
    assert neg["lora_rank_block_ms_per_slot_large"] == 0.0 and neg["lora_rank_block_ms_per_adapter_large"] > 0


def test_refit_rewrites_the_json_from_measured_csvs(tmp_path):
    csv_path = tmp_path / "in.csv"
    rows = _kernel_rows()
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["model", "max_lora_rank", "max_loras", "distinct", "tokens", "ms", "mode"])
        w.writeheader()
        w.writerows({**r, "mode": "graph"} for r in rows)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), "--refit", str(csv_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "out" / "lora_kernels.json").read_text())
    assert doc["meta"]["points"] == len(rows)
    assert doc["rank_kernel"]["m"]["lora_rank_block_ms_per_adapter"] == pytest.approx(0.08, abs=1e-9)
    assert not (tmp_path / "out" / "lora_kernels.csv").exists()  # a refit measures nothing
