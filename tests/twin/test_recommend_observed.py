"""`adaptwin recommend --trace FILE` and `--lake-run RUN`: the workload derived from what was observed
(twin/observed.py): one rate group per adapter, request-equivalent rates that reproduce the observed tokens/s."""

from __future__ import annotations

import csv
import datetime as dt
import json
from pathlib import Path

import pytest

from adaptwin import schemas
from adaptwin.cli import main
from adaptwin.ingest import lake
from adaptwin.twin import observed
from adaptwin.twin.config import ConfigError
from adaptwin.twin.lengths import load_lengths

LLAMA = "llama-3.1-8b-instruct"
AZURE = Path(__file__).resolve().parents[2] / "ingest" / "traces" / "AzureLLMInferenceTrace_conv.csv"


def test_a_trace_becomes_one_rate_group_per_adapter_with_its_offered_tokens():
    obs = observed.from_trace("azure-conv", LLAMA, adapters=8, ranks=(8, 16))
    assert len(obs.rates) == len(obs.ranks) == 8 and set(obs.ranks) == {8, 16}
    assert list(obs.rates) == sorted(obs.rates, reverse=True)
    # independently: the file's tokens over its time span
    with open(AZURE) as f:
        rows = list(csv.DictReader(f))
    stamps = [dt.datetime.fromisoformat(r["TIMESTAMP"][:26]) for r in rows]
    span = (max(stamps) - min(stamps)).total_seconds()
    tokens = sum(int(r["ContextTokens"]) + int(r["GeneratedTokens"]) for r in rows)
    assert obs.offered_tokens_per_s == pytest.approx(tokens / span, rel=0.01)
    assert sum(obs.rates) * load_lengths(LLAMA).mean_total == pytest.approx(obs.offered_tokens_per_s, rel=1e-9)


def _window(run: str, start: float, offered: dict[str, int]) -> dict:
    return {"v": schemas.SCHEMA_VERSION, "run_id": run, "backend": "twin", "scope": "window",
            "window_start": start, "window_end": start + 60.0, "served": 4, "max_loras": 2, "max_lora_rank": 16,
            "arrivals": 10, "finished": 10, "offered_tokens": sum(offered.values()),
            "completed_tokens": sum(offered.values()), "throughput": sum(offered.values()) / 60.0,
            "starvation_ratio": 0.0, "starved": 0, "running": 1.0, "waiting": 0.0, "kv_usage": 0.1,
            "adapter_loads": 0, "mean_ttft_ms": 10.0, "mean_itl_ms": 5.0,
            "adapters": [{"adapter_id": a, "offered_tokens": t, "completed_tokens": t, "starvation_ratio": 0.0}
                         for a, t in offered.items()]}


def _lake(root: Path) -> None:
    runs = {"r1": [_window("r1", 0.0, {"lora-0": 6000, "lora-1": 3000}),
                   _window("r1", 60.0, {"lora-0": 6000, "lora-1": 3000, "lora-2": 3000})],
            "other": [_window("other", 0.0, {"lora-0": 99_000})]}
    for i, (run, windows) in enumerate(runs.items()):  # one file per run id, as the sink writes them
        lake.write_atomic(schemas.to_table(windows, schemas.WINDOW),
                          lake.file_path(root, "windows", run, dt.date.today(), 0, 10 * i, 10 * i + 1))


def test_a_lake_run_becomes_its_adapters_offered_tokens(tmp_path):
    _lake(tmp_path)
    mean = load_lengths(LLAMA).mean_total
    obs = observed.from_lake(tmp_path, "r1", LLAMA)
    assert obs.span_s == 120.0 and obs.offered_tokens_per_s == pytest.approx(21_000 / 120)
    assert obs.rates == pytest.approx((12_000 / 120 / mean, 6000 / 120 / mean, 3000 / 120 / mean))
    assert obs.ranks == (16, 16, 16)  # the run's max_lora_rank: nothing says the adapters' own ranks
    recent = observed.from_lake(tmp_path, "r1", LLAMA, last_windows=1, ranks=(8, 16))
    assert recent.span_s == 60.0 and recent.offered_tokens_per_s == pytest.approx(200.0)
    assert sorted(recent.ranks) == [8, 8, 16]
    with pytest.raises(ConfigError, match="no windows of run 'missing'"):
        observed.from_lake(tmp_path, "missing", LLAMA)


def test_recommend_cli_takes_a_trace_or_a_lake_run_and_exactly_one_workload(tmp_path, capsys):
    grid = ["--grid", "4,8,16", "--duration", "300", "--json"]
    assert main(["recommend", "--model", LLAMA, "--trace", "azure-conv", "--adapters", "8", "--ranks", "8", *grid]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["served_adapters"] in (4, 8, 16) and out["max_loras"] <= out["served_adapters"]
    _lake(tmp_path)
    assert main(["recommend", "--model", LLAMA, "--lake-run", "r1", "--lake", str(tmp_path), *grid]) == 0
    captured = capsys.readouterr()
    assert "3 adapters over 120 s" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["predicted_starved"] == 0  # 175 tok/s: light
    assert main(["recommend", "--model", LLAMA, "--rates", "0.1", "--ranks", "8", "--trace", "azure-conv"]) == 2
    assert "one way" in capsys.readouterr().err
    assert main(["recommend", "--model", LLAMA]) == 2
    assert main(["recommend", "--model", LLAMA, "--rates", "0.1"]) == 2
    assert "--rates needs --ranks" in capsys.readouterr().err
