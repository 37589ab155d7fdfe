"""Format detection, the one clear error for non-traces, generic CSV and Parquet with a column mapping."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adaptwin.cliutil import UserError
from adaptwin.ingest.readers.base import TraceFormatError
from adaptwin.ingest.source import IngestConfig

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8


@pytest.mark.parametrize("fmt", [None, "azure", "csv", "mooncake", "servegen", "parquet"])
@pytest.mark.parametrize("content,name,why", [
    (PNG, "picture.png", "PNG"),
    (b"", "empty.csv", "empty"),
    (b"name,age,city\nann,31,rome\nbob,42,oslo\n", "people.csv", "'name,age,city'"),
    (bytes(range(128, 256)) * 40, "noise.csv", "binary"),
])
def test_not_a_trace_is_one_clear_error(ingest, tmp_path, fmt, content, name, why):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        ingest(IngestConfig(trace=str(path), format=fmt))
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    if fmt is None:
        assert isinstance(err.value, TraceFormatError)
        assert why in message and "--format" in message and "azure, mooncake, servegen, parquet, csv" in message


def test_jsonl_that_is_not_mooncake(ingest, tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"user": 1, "event": "click"}\n{"user": 2, "event": "view"}\n')
    with pytest.raises(TraceFormatError, match="'timestamp', 'input_length', 'output_length'"):
        ingest(IngestConfig(trace=str(path)))


def test_unknown_format_and_missing_file(ingest, tmp_path):
    with pytest.raises(UserError, match="choose one of azure, mooncake"):
        ingest(IngestConfig(trace="azure-code", format="xlsx"))
    with pytest.raises(UserError, match="no such file"):
        ingest(IngestConfig(trace=str(tmp_path / "nope.csv")))
    with pytest.raises(TraceFormatError, match="no chunk-<client>-trace.csv"):
        ingest(IngestConfig(trace=str(tmp_path)))


def test_generic_csv_with_mapping_datetime_and_adapters(ingest, tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text(
        "arrival,in,out,model,r\n"
        "2024-05-01T10:00:00,100,20,chat,16\n"
        '2024-05-01T10:00:01.5,"120",30,code,\n'
        "2024-05-01T10:00:02,130,40,other,8\n"
        "2024-05-01T10:00:03,140,50,chat,4096\n"
        "7.5,140,50,chat,8\n")
    columns = "ts=arrival,prompt_tokens=in,output_tokens=out,adapter_id=model,adapter_rank=r"
    run = ingest(IngestConfig(trace=str(path), columns=columns, adapter_set=("chat", "code"), ranks=(8, 32)))
    assert [(r["ts"], r["adapter_id"], r["adapter_rank"], r["prompt_tokens"]) for r in run.requests] == [
        (0.0, "chat", 16, 100), (1.5, "code", 8, 120)]
    assert run.dead_by_line() == {4: "unknown_adapter", 5: "out_of_range", 6: "bad_type"}
    assert "adapter_rank=4096" in run.dead[1]["reason"] and "seconds" in run.dead[2]["reason"]


def test_generic_csv_seconds_and_detection(ingest, tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("ts,prompt_tokens,output_tokens\n0.25,10,5\n1.0,11,6\n3,12,7\n")
    run = ingest(IngestConfig(trace=str(path), adapters=2, popularity="uniform", ranks=(8, 16)))
    assert [r["ts"] for r in run.requests] == [0.25, 1.0, 3.0]
    assert all(r["adapter_rank"] == (8 if r["adapter_id"] == "lora-0" else 16) for r in run.requests)
    with pytest.raises(TraceFormatError, match="missing column"):
        ingest(IngestConfig(trace=str(path), format="csv", columns="ts=arrival_s"))


def test_parquet_with_mapping_and_timestamps(ingest, tmp_path):
    t0 = dt.datetime(2024, 1, 1, 12, 0, 0)
    table = pa.table({
        "when": pa.array([t0, t0 + dt.timedelta(seconds=2), t0 + dt.timedelta(seconds=4), None], pa.timestamp("ns")),
        "in": pa.array([10, 20, -3, 40], pa.int64()),
        "out": pa.array([1, 2, 3, 4], pa.int32()),
    })
    path = tmp_path / "trace.parquet"
    pq.write_table(table, path)
    run = ingest(IngestConfig(trace=str(path), columns="ts=when,prompt_tokens=in,output_tokens=out"))
    assert [(r["ts"], r["prompt_tokens"], r["source"]) for r in run.requests] == [
        (0.0, 10, "trace.parquet:1"), (2.0, 20, "trace.parquet:2")]
    assert run.dead_by_line() == {3: "out_of_range", 4: "missing_field"}
    assert '"prompt_tokens": -3' in run.dead[0]["payload"]
    seconds = pa.table({"ts": [0.0, 1.5], "prompt_tokens": [5, 6], "output_tokens": [7, 8]})
    pq.write_table(seconds, tmp_path / "s.pq")
    assert [r["ts"] for r in ingest(IngestConfig(trace=str(tmp_path / "s.pq"))).requests] == [0.0, 1.5]
