"""Corrupted copies of real traces: exactly the bad lines are dead-lettered, with the right reason."""

from __future__ import annotations

import json

import pytest

from adaptwin.ingest.readers.base import TraceFormatError
from adaptwin.ingest.source import IngestConfig
from adaptwin.schemas import DEADLETTER, REQUEST, check


def _azure_row(line: bytes, ts: bytes | None = None, prompt: bytes | None = None, output: bytes | None = None) -> bytes:
    t, p, o = line.split(b",")
    return b",".join([ts if ts is not None else t, prompt if prompt is not None else p,
                      output if output is not None else o])


def test_broken_azure(ingest, shipped_lines, tmp_path, write_lines):
    lines = shipped_lines("azure-code")[:41]  # header + 40 rows
    bad = {  # 1-based line -> (new line, reason)
        3: (lines[2].rsplit(b",", 1)[0], "unparsable"),  # truncated: a field short
        4: (_azure_row(lines[3], prompt=b"abc"), "bad_type"),
        5: (_azure_row(lines[4], prompt=b"NaN"), "not_finite"),
        6: (_azure_row(lines[5], output=b"-5"), "out_of_range"),
        7: (_azure_row(lines[6], prompt=b"12\xff3"), "bad_encoding"),
        8: (_azure_row(lines[7], prompt=b"1" * (100 * 1024)), "line_too_long"),
        9: (_azure_row(lines[8], ts=b"2023-11-16 18:16:50.0000000"), "time_backwards"),
        10: (_azure_row(lines[9], prompt=b"5000000"), "out_of_range"),
        11: (_azure_row(lines[10], output=b""), "missing_field"),
        13: (_azure_row(lines[12], ts=b"yesterday"), "bad_type"),
        14: (_azure_row(lines[13], output=b"12.5"), "bad_type"),
        15: (_azure_row(lines[14], output=b"0"), "out_of_range"),
        16: (_azure_row(lines[15], output=b"inf"), "not_finite"),
        17: (lines[16] + b",extra", "unparsable"),
    }
    for n, (text, _) in bad.items():
        lines[n - 1] = text
    lines[11] = b"   "  # line 12: blank, not a row
    path = write_lines(tmp_path / "azure_broken.csv", lines)
    run = ingest(IngestConfig(trace=str(path), format="azure"))
    assert run.dead_by_line() == {n: reason for n, (_, reason) in bad.items()}
    assert run.stats.accepted == 40 - len(bad) - 1
    assert run.stats.rows_read == 39 and run.stats.dead_total == len(bad)
    assert dict(run.stats.dead) == {r: sum(1 for _, x in bad.values() if x == r) for _, r in bad.values()}
    for d in run.dead:
        check(d, DEADLETTER)
        assert d["stage"] == "ingest" and d["source"] == str(path)
    by_line = {d["line"]: d for d in run.dead}
    assert by_line[7]["payload"].endswith(",12\\xff3,8") or "\\xff" in by_line[7]["payload"]
    assert len(by_line[8]["payload"]) < 2048  # an oversized line is kept only in part
    assert "prompt_tokens" in by_line[4]["reason"] and "'abc'" in by_line[4]["reason"]
    good_lines = sorted(int(r["source"].rsplit(":", 1)[1]) for r in run.requests)
    assert good_lines == [n for n in range(2, 42) if n not in bad and n != 12]
    for r in run.requests:
        check(r, REQUEST)
    # detected the same without --format
    assert ingest(IngestConfig(trace=str(path))).dead_by_line() == run.dead_by_line()


def test_broken_mooncake(ingest, shipped_lines, tmp_path, write_lines):
    lines = shipped_lines("mooncake-conversation")[:30]
    row = json.loads(lines[0])

    def obj(**changes) -> bytes:
        return json.dumps({**row, **changes}).encode()

    later = json.loads(lines[20])["timestamp"]
    bad = {
        2: (b"[1, 2, 3]", "unparsable"),  # a JSON line that is an array
        3: (lines[2][:40], "unparsable"),  # truncated
        4: (json.dumps({k: v for k, v in row.items() if k != "output_length"}).encode(), "missing_field"),
        5: (obj(timestamp="soon"), "bad_type"),
        6: (obj(input_length=True), "bad_type"),
        7: (obj(output_length=float("nan")), "not_finite"),  # json.dumps writes NaN
        8: (obj(input_length=-1), "out_of_range"),
        9: (lines[8].replace(b'"timestamp"', b'"timest\xe9mp"'), "bad_encoding"),
        10: (obj(hash_ids=list(range(20_000))), "line_too_long"),
        11: (obj(input_length=12.5), "bad_type"),
        12: (b"{}", "missing_field"),
        13: (b'{"timestamp": 1e400, "input_length": 5, "output_length": 5}', "not_finite"),
        14: (b"not json at all", "unparsable"),
        15: (b'"a string"', "unparsable"),
        16: (obj(output_length=2_000_000), "out_of_range"),
    }
    for n, (text, _) in bad.items():
        lines[n - 1] = text
    lines[25] = json.dumps({**json.loads(lines[25]), "timestamp": later + 10_000}).encode()
    lines[26] = json.dumps({**json.loads(lines[26]), "timestamp": later + 10_000 - 1_500}).encode()  # back 1.5 s
    lines[27] = json.dumps({**json.loads(lines[27]), "timestamp": later + 10_000 - 500}).encode()  # back 0.5 s: ok
    for i in (28, 29):
        lines[i] = json.dumps({**json.loads(lines[i]), "timestamp": later + 10_000 + i}).encode()
    bad[27] = (lines[26], "time_backwards")
    path = write_lines(tmp_path / "mooncake_broken.jsonl", lines)
    run = ingest(IngestConfig(trace=str(path)))
    assert run.dead_by_line() == {n: reason for n, (_, reason) in bad.items()}
    assert run.stats.accepted == 30 - len(bad)
    for d in run.dead:
        check(d, DEADLETTER)
    assert "adapter" not in run.dead_by_line().values()


def test_tolerance_is_configurable(ingest, shipped_lines, tmp_path, write_lines):
    from adaptwin.ingest.validate import Limits

    lines = shipped_lines("azure-conv")[:6]
    lines[4] = _azure_row(lines[4], ts=b"2023-11-16 18:15:40.0000000")  # 6.7 s before the first row
    path = write_lines(tmp_path / "late.csv", lines)
    assert ingest(IngestConfig(trace=str(path))).dead_by_line() == {5: "time_backwards"}
    lax = ingest(IngestConfig(trace=str(path), limits=Limits(ts_tolerance_s=100)))
    assert lax.dead == [] and min(r["ts"] for r in lax.requests) == 0.0
    strict = ingest(IngestConfig(trace=str(path), limits=Limits(max_prompt_tokens=390)))
    assert set(strict.dead_by_line().values()) == {"out_of_range", "time_backwards"}


def test_missing_header_column_is_one_error(shipped_lines, tmp_path, ingest, write_lines):
    lines = [b"TIMESTAMP,ContextTokens"] + [l.rsplit(b",", 1)[0] for l in shipped_lines("azure-code")[1:10]]
    path = write_lines(tmp_path / "two_columns.csv", lines)
    with pytest.raises(TraceFormatError) as err:
        ingest(IngestConfig(trace=str(path), format="azure"))
    assert "GeneratedTokens" in str(err.value) and str(path) in str(err.value) and "--format" in str(err.value)


def test_broken_servegen_window_lines(ingest, tmp_path, write_lines):
    src = tmp_path / "sg"
    src.mkdir()
    good = [f"{600 * i},0.5,1.2,Gamma,0.7,0.04" for i in range(6)]
    write_lines(src / "chunk-0-trace.csv", [g.encode() for g in good])
    broken = list(good)
    broken[1] = "600,abc,1.2,Gamma,0.7,0.04"
    broken[2] = "1200,-1,1.2,Gamma,0.7,0.04"
    broken[3] = "1800,0.5,1.2,Poisson,0.7,0.04"
    broken[4] = "2400,0.5,1.2"
    write_lines(src / "chunk-7-trace.csv", [b.encode() for b in broken])
    run = ingest(IngestConfig(trace=str(src), run_id="sg"))
    assert {(d["source"].rsplit("/", 1)[-1], d["line"], d["reason"].split(":")[0]) for d in run.dead} == {
        ("chunk-7-trace.csv", 2, "unparsable"), ("chunk-7-trace.csv", 3, "out_of_range"),
        ("chunk-7-trace.csv", 4, "unparsable"), ("chunk-7-trace.csv", 5, "unparsable")}
    assert run.stats.accepted == len(run.requests) > 0
    assert {r["adapter_id"] for r in run.requests} == {"lora-0", "lora-1"}
    # client 0 has six windows at 0.5 req/s, client 7 two: ~1800 and ~600 requests
    n0 = sum(r["source"].startswith("chunk-0-") for r in run.requests)
    assert n0 == pytest.approx(1800, rel=0.2)
    assert len(run.requests) - n0 == pytest.approx(600, rel=0.3)
