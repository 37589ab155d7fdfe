"""`adaptwin replay` command line without a broker (--dry-run)."""

from __future__ import annotations

import json
import subprocess
import sys

ADAPTWIN = [sys.executable, "-m", "adaptwin"]


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_file_source_dry_run_prints_the_summary_last():
    out = subprocess.run(ADAPTWIN + ["replay", "--source", "azure-code", "--adapters", "8", "--limit", "500",
                                     "--served", "8", "--max-loras", "2", "--dry-run", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = _last_json(out.stdout)
    assert summary["arrivals"] == 500 and summary["telemetry"] == 500 and summary["starved"] in (0, 1)


def test_replay_needs_exactly_one_input():
    out = subprocess.run(ADAPTWIN + ["replay", "--served", "8", "--max-loras", "2"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "exactly one input" in out.stderr
