"""`adaptwin profile vllm --launch` against the real vLLM (CPU): one start-up per KV configuration, through
`deploy/vllm/serve.sh --foreground`, and a configuration vLLM refuses recorded as such."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import VLLM_DIR, require_vllm

pytestmark = pytest.mark.vllm


def test_launch_starts_the_real_server_once_per_kv_configuration(tmp_path: Path) -> None:
    require_vllm()
    out = tmp_path / "cal"
    # adapters of ranks 8 and 16: max_lora_rank 8 is a configuration vLLM refuses to start with
    cmd = [sys.executable, "-m", "adaptwin", "profile", "vllm", "--out", str(out), "--model", "tiny", "--ranks", "8,16",
           "--max-loras", "2", "--max-lora-rank", "16", "--experiments", "kv", "--kv-grid", "1:16,1:8", "--json",
           "--launch", "--", str(VLLM_DIR / "serve.sh"), "--foreground", "--run-dir", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "est_kv_capacity.csv") as f:
        rows = list(csv.DictReader(f))
    got = {(r["max_loras"], r["max_lora_rank"]): r for r in rows}
    assert set(got) == {("2", "16"), ("1", "16"), ("1", "8")}  # the main start-up, then one per grid entry
    ok = [got[k] for k in (("2", "16"), ("1", "16"))]
    assert all(r["status"] == "ok" and r["source"] == "vllm:cache_config_info" for r in ok)
    # on the CPU backend the KV cache is VLLM_CPU_KVCACHE_SPACE, whatever max_loras x max_lora_rank
    assert int(ok[0]["kv_cache_tokens"]) == int(ok[1]["kv_cache_tokens"]) > 0
    assert got[("1", "8")]["status"].startswith("failed"), got[("1", "8")]
