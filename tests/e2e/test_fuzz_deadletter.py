"""Fuzz through the real broker: over 10,000 malformed rows across every reader (Azure, Mooncake, ServeGen,
generic CSV, Parquet) go through `adaptwin ingest` as a process; nothing crashes, every one of them is in
adaptwin.deadletter with a reason, and the counts match row for row (per reason too).

Rows are generated, seeded: each is a good row with one thing broken (a field that is not a number, a
negative or NaN count, a missing field, bytes that are not UTF-8, a line over the length limit, broken
JSON) plus random junk, so every generated row is malformed by construction and must be refused."""

from __future__ import annotations

import collections
import json
import random
import string
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from kafka import TopicPartition

from adaptwin.config import TOPICS
from adaptwin.kafka import make_consumer

pytestmark = pytest.mark.broker
ADAPTWIN = [sys.executable, "-m", "adaptwin"]
PER_FORMAT = 2_100  # × 5 formats = 10,500 malformed rows
REASONS = {"bad_encoding", "line_too_long", "unparsable", "missing_field", "bad_type", "not_finite",
           "out_of_range", "time_backwards", "unknown_adapter"}


def _junk(rng: random.Random, n: int = 12) -> str:
    return "".join(rng.choice(string.ascii_letters + "!#$%&()*+-/;<=>?@[]^_{|}~ ") for _ in range(rng.randint(1, n)))


def _number_breakers(rng: random.Random) -> str:
    return rng.choice(["-" + str(rng.randint(1, 10**6)), "nan", "inf", "-inf", "1e999", "12.5", "",
                       "0x1F", _junk(rng), str(rng.randint(1, 9)) + _junk(rng)])


def _bytes_breakers(rng: random.Random, good: bytes) -> bytes | None:
    """Format-independent breakage (encoding, length), or None to break a field instead."""
    pick = rng.random()
    if pick < 0.06:
        return b"\xff\xfe" + bytes(rng.choice(range(0x80, 0x100)) for _ in range(rng.randint(1, 20))) + good
    if pick < 0.07:
        return good + b"," + b"x" * (64 * 1024 + rng.randint(1, 100))
    return None


def azure_rows(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        ts, ctx, gen = "2023-11-16 18:17:04.0319600", str(rng.randint(1, 4000)), str(rng.randint(1, 500))
        special = _bytes_breakers(rng, f"{ts},{ctx},{gen}".encode())
        if special is not None:
            out.append(special)
            continue
        k = i % 4
        if k == 0:
            ts = _junk(rng)
        elif k == 1:
            ctx = _number_breakers(rng)
        elif k == 2:
            gen = _number_breakers(rng)
        else:
            out.append(f"{ts},{ctx}".encode())  # a field missing
            continue
        out.append(f"{ts},{ctx},{gen}".encode())
    return out


def csv_rows(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        f = [f"{1000 + i * 0.01:.2f}", str(rng.randint(1, 4000)), str(rng.randint(1, 500)), f"lora-{rng.randint(0, 9)}"]
        special = _bytes_breakers(rng, ",".join(f).encode())
        if special is not None:
            out.append(special)
            continue
        k = i % 4
        if k == 3:
            out.append(",".join(f[:2]).encode())
            continue
        f[k] = _junk(rng) if k == 0 else _number_breakers(rng)
        out.append(",".join(f).encode())
    return out


def mooncake_rows(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        rec = {"timestamp": 10_000 + i, "input_length": rng.randint(1, 4000), "output_length": rng.randint(1, 500),
               "hash_ids": [1]}
        special = _bytes_breakers(rng, json.dumps(rec).encode())
        if special is not None:
            out.append(special)
            continue
        k = i % 5
        if k == 0:
            out.append(json.dumps(rec)[: rng.randint(1, 20)].encode())  # cut JSON
        elif k == 1:
            del rec[rng.choice(["timestamp", "input_length", "output_length"])]
            out.append(json.dumps(rec).encode())
        elif k == 2:
            rec[rng.choice(["input_length", "output_length"])] = rng.choice([-rng.randint(1, 99), "many", None, 2.5])
            out.append(json.dumps(rec).encode())
        elif k == 3:
            out.append(json.dumps(rng.choice([[rec], "text", 7, None])).encode())  # not an object
        else:
            out.append(json.dumps(rec).replace(str(rec["input_length"]), "NaN", 1).encode())
    return out


def servegen_rows(rng: random.Random, n: int) -> list[bytes]:
    out = []
    for i in range(n):
        f = [str(600 * (i + 1)), f"{rng.uniform(0.001, 0.05):.4f}", f"{rng.uniform(0.5, 2):.3f}", "Gamma", "1.0", "1.0"]
        special = _bytes_breakers(rng, ",".join(f).encode())
        if special is not None:
            out.append(special)
            continue
        k = i % 4
        if k == 3:
            out.append(",".join(f[:3]).encode())
            continue
        f[k] = _junk(rng) if k == 0 else rng.choice(["-" + str(rng.randint(1, 9)), "nan", "inf", _junk(rng)])
        out.append(",".join(f).encode())
    return out


def parquet_table(rng: random.Random, n: int) -> pa.Table:
    """String columns (the reader parses them like CSV), each row with one value broken."""
    cols: dict[str, list] = {"ts": [], "prompt_tokens": [], "output_tokens": [], "adapter_id": []}
    for i in range(n):
        row = [f"{1000 + i * 0.01:.2f}", str(rng.randint(1, 4000)), str(rng.randint(1, 500)), "lora-1"]
        k = i % 3
        row[k] = rng.choice([None, _junk(rng)]) if k == 0 else rng.choice([None, _number_breakers(rng)])
        if row[k] == "":
            row[k] = None
        for name, value in zip(cols, row):
            cols[name].append(value)
    return pa.table({k: pa.array(v, pa.string()) for k, v in cols.items()})


def _write(tmp_path: Path, fmt: str, rng: random.Random) -> tuple[Path, int]:
    if fmt == "parquet":
        path = tmp_path / "fuzz.parquet"
        good = pa.table({"ts": ["1.0"], "prompt_tokens": ["10"], "output_tokens": ["5"], "adapter_id": ["lora-1"]})
        pq.write_table(pa.concat_tables([good, parquet_table(rng, PER_FORMAT)]), path)
        return path, PER_FORMAT
    header, good, rows = {
        "azure": (b"TIMESTAMP,ContextTokens,GeneratedTokens", b"2023-11-16 18:17:04.0000000,100,10", azure_rows),
        "csv": (b"ts,prompt_tokens,output_tokens,adapter_id", b"1.0,100,10,lora-1", csv_rows),
        "mooncake": (None, b'{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [0]}',
                     mooncake_rows),
        "servegen": (None, b"0,0.05,1.0,Gamma,1.0,1.0", servegen_rows),
    }[fmt]
    bad = rows(rng, PER_FORMAT)
    lines = ([header] if header else []) + [good] + bad
    if fmt == "servegen":
        path = tmp_path / "sg"
        path.mkdir()
        (path / "chunk-0-trace.csv").write_bytes(b"\n".join(lines) + b"\n")
    else:
        path = tmp_path / f"fuzz.{'jsonl' if fmt == 'mooncake' else 'csv'}"
        path.write_bytes(b"\n".join(lines) + b"\n")
    return path, len(bad)


def _dead_letters(bootstrap: str, run_ids: set[str]) -> dict[str, list[dict]]:
    """Every record of adaptwin.deadletter whose run_id is one of ``run_ids``."""
    consumer = make_consumer(bootstrap, None, isolation_level="read_committed")
    tps = [TopicPartition(TOPICS.deadletter, p) for p in sorted(consumer.partitions_for_topic(TOPICS.deadletter))]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    end = consumer.end_offsets(tps)
    found: dict[str, list[dict]] = collections.defaultdict(list)
    while any(consumer.position(tp) < end[tp] for tp in tps):
        for records in consumer.poll(timeout_ms=1000, max_records=5000).values():
            for rec in records:
                for line in rec.value.split(b"\n"):
                    if not line.strip():
                        continue
                    d = json.loads(line)
                    if d.get("run_id") in run_ids:
                        found[d["run_id"]].append(d)
    consumer.close(autocommit=False)
    return found


def test_ten_thousand_malformed_rows_all_reach_the_dead_letter_topic(bootstrap, tmp_path):
    rng = random.Random(2026)
    expected: dict[str, tuple[str, int, dict]] = {}
    for fmt in ("azure", "csv", "mooncake", "servegen", "parquet"):
        path, n_bad = _write(tmp_path, fmt, rng)
        run_id = f"fuzz-{fmt}-{uuid.uuid4().hex[:8]}"
        out = subprocess.run(ADAPTWIN + ["ingest", "--trace", str(path), "--format", fmt, "--run-id", run_id,
                                         "--adapters", "4", "--bootstrap", bootstrap, "--json"],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{fmt}: ingest crashed: {out.stderr[-3000:]}"
        report = json.loads(out.stdout.strip().splitlines()[-1])
        assert report["dead_lettered"] == n_bad, f"{fmt}: {n_bad} malformed rows, {report}"
        assert report["accepted"] >= 1  # the one good row
        expected[run_id] = (fmt, n_bad, report["dead_by_reason"])
    total = sum(n for _, n, _ in expected.values())
    assert total >= 10_000
    found = _dead_letters(bootstrap, set(expected))
    for run_id, (fmt, n_bad, by_reason) in expected.items():
        dead = found.get(run_id, [])
        assert len(dead) == n_bad, f"{fmt}: {n_bad} refused by ingest, {len(dead)} in the dead-letter topic"
        codes = collections.Counter(d["reason"].split(":")[0] for d in dead)
        assert set(codes) <= REASONS and dict(codes) == by_reason, fmt
        assert all(d["reason"] and d["stage"] and d["payload"] is not None for d in dead)
        if fmt != "servegen":  # a ServeGen row is a rate window; its line is still unique
            assert len({d["line"] for d in dead}) == n_bad, f"{fmt}: a row dead-lettered twice"
