"""Every reader on the real shipped traces: all rows accepted, counts as published."""

from __future__ import annotations

import math

import pytest

from adaptwin.ingest.readers.servegen import WINDOW_S, client_request_counts
from adaptwin.ingest.readers.shipped import shipped_path
from adaptwin.ingest.source import IngestConfig
from adaptwin.schemas import REQUEST, check

KNOWN = {  # name: (rows, span of ts in s)
    "azure-code": (8_819, 3_435.9),
    "azure-conv": (19_366, 3_501.7),
    "mooncake-conversation": (12_031, 3_537.0),
    "mooncake-synthetic": (3_993, 1_022.0),
}


@pytest.mark.parametrize("name", sorted(KNOWN))
@pytest.mark.parametrize("by_path", [False, True])
def test_shipped_trace_is_read_whole(ingest, name, by_path):
    trace = str(shipped_path(name)) if by_path else name
    run = ingest(IngestConfig(trace=trace, run_id="t", adapters=16))
    rows, span = KNOWN[name]
    assert run.stats.rows_read == run.stats.accepted == len(run.requests) == rows
    assert run.dead == [] and run.stats.dead_total == 0
    for r in run.requests[:50] + run.requests[-50:]:
        check(r, REQUEST)
    assert [r["request_id"] for r in run.requests] == [f"t-{i}" for i in range(rows)]
    ts = [r["ts"] for r in run.requests]
    assert ts[0] == 0.0 and all(b >= a for a, b in zip(ts, ts[1:]))
    assert ts[-1] == pytest.approx(span, abs=0.1)
    file = shipped_path(name).name
    assert run.requests[0]["source"] == f"{file}:{2 if name.startswith('azure') else 1}"
    assert {r["adapter_id"] for r in run.requests} <= {f"lora-{k}" for k in range(16)}


def test_azure_values_match_the_file(ingest, shipped_lines):
    run = ingest(IngestConfig(trace="azure-conv"))
    lines = shipped_lines("azure-conv")
    for r in run.requests[::997]:
        line = int(r["source"].rsplit(":", 1)[1])
        _, prompt, output = lines[line - 1].decode().split(",")
        assert (r["prompt_tokens"], r["output_tokens"]) == (int(prompt), int(output))
    assert run.requests[1]["ts"] == pytest.approx(50.9951690 - 46.6805900, abs=1e-6)


def test_mooncake_ts_is_milliseconds(ingest, shipped_lines):
    run = ingest(IngestConfig(trace="mooncake-synthetic"))
    assert run.requests[2]["ts"] == pytest.approx(0.040)
    assert (run.requests[0]["prompt_tokens"], run.requests[0]["output_tokens"]) == (40160, 6)


def test_servegen_hour_rates_clients_and_determinism(ingest):
    config = IngestConfig(trace="servegen-deepseek-r1", start_s=36_000, duration_s=3_600, seed=3, run_id="sg")
    run = ingest(config)
    assert run.dead == [] and run.stats.accepted == len(run.requests) > 1000
    ts = [r["ts"] for r in run.requests]
    assert 0 <= ts[0] and ts[-1] < 3_600 and all(b >= a for a, b in zip(ts, ts[1:]))
    # expected arrivals: sum of rate x window over the six windows of that hour
    expected = 0.0
    for file in sorted(shipped_path("servegen-deepseek-r1").glob("chunk-*-trace.csv")):
        for line in file.read_text().splitlines():
            start, rate = (float(x) for x in line.split(",")[:2])
            if 36_000 <= start < 39_600:
                expected += rate * WINDOW_S
    assert len(run.requests) == pytest.approx(expected, rel=0.15)
    # client -> adapter: lora-0 is the client with most requests in the span
    counts: dict[str, int] = {}
    for r in run.requests:
        counts[r["adapter_id"]] = counts.get(r["adapter_id"], 0) + 1
    assert max(counts, key=counts.get) == "lora-0"
    assert run.requests[0]["source"].startswith("chunk-") and ".csv:" in run.requests[0]["source"]
    # lengths come from Azure conv; same seed -> same requests, other seed -> other arrivals
    assert ingest(config).requests == run.requests
    other = ingest(IngestConfig(trace="servegen-deepseek-r1", start_s=36_000, duration_s=3_600, seed=4, run_id="sg"))
    assert [r["ts"] for r in other.requests[:20]] != ts[:20]


def test_servegen_adapters_fold_clients(ingest):
    run = ingest(IngestConfig(trace="servegen-m-small", start_s=338_400, duration_s=60, adapters=4, ranks=(8, 16)))
    assert {r["adapter_id"] for r in run.requests} <= {"lora-0", "lora-1", "lora-2", "lora-3"}
    assert {(r["adapter_id"], r["adapter_rank"]) for r in run.requests} <= {
        ("lora-0", 8), ("lora-1", 16), ("lora-2", 8), ("lora-3", 16)}


def test_servegen_client_counts_are_the_published_skew():
    counts = sorted(client_request_counts(shipped_path("servegen-m-small")).values(), reverse=True)
    assert len(counts) == 43
    assert counts[0] / sum(counts) == pytest.approx(0.299, abs=0.002)
    assert sum(counts[:5]) / sum(counts) == pytest.approx(0.77, abs=0.005)
    assert not any(math.isnan(c) for c in counts)
