"""Record schemas, defined once as Arrow schemas (DESIGN.md §Data flow).

Every Kafka record is a JSON object with a version field ``v``; a message value holds one record per
line (NDJSON, so one message can carry a batch). The lake stores exactly these columns; ``run_id`` and
the ingestion ``date`` are its hive partition keys.
A record whose ``v`` is unknown, or whose fields do not match its schema, is refused with a reason
(``RecordError``) and goes to the dead-letter topic; nothing is dropped silently.

>>> rec = {"v": 1, "request_id": "r1", "run_id": "demo", "ts": 0.5, "adapter_id": "lora-3",
...        "adapter_rank": 8, "prompt_tokens": 120, "output_tokens": 40, "source": "azure_conv:2"}
>>> decode(encode([rec, rec]), REQUEST) == [rec, rec]
True
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

import pyarrow as pa

SCHEMA_VERSION = 1


class RecordError(ValueError):
    """A record that does not match its schema; ``str(err)`` is the dead-letter reason."""


def _schema(name: str, *fields: pa.Field) -> pa.Schema:
    return pa.schema([pa.field("v", pa.int16(), nullable=False), *fields], metadata={"record": name})


REQUEST = _schema(
    "request",
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),  # the ingest job
    pa.field("ts", pa.float64(), nullable=False),  # seconds since trace start
    pa.field("adapter_id", pa.string(), nullable=False),
    pa.field("adapter_rank", pa.int32(), nullable=False),
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("output_tokens", pa.int32(), nullable=False),
    pa.field("source", pa.string(), nullable=False),  # "<trace>:<line>" or "synthetic:<spec>"
)

TELEMETRY = _schema(
    "telemetry",
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),  # the replay run
    pa.field("backend", pa.string(), nullable=False),  # twin | vllm
    pa.field("served", pa.int32(), nullable=False),  # --max-cpu-loras
    pa.field("max_loras", pa.int32(), nullable=False),
    pa.field("adapter_id", pa.string(), nullable=False),
    pa.field("ts", pa.float64(), nullable=False),  # arrival, s since trace start
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("output_tokens", pa.int32(), nullable=False),
    pa.field("ttft_ms", pa.float64()),  # null when no token came back
    pa.field("itl_ms", pa.float64()),
    pa.field("e2e_ms", pa.float64()),
    pa.field("finished", pa.bool_(), nullable=False),
    pa.field("preempted", pa.int32(), nullable=False),
    pa.field("error", pa.string()),  # failure reason, null when fine
)

ADAPTER_WINDOW = pa.struct([
    pa.field("adapter_id", pa.string()),
    pa.field("offered_tokens", pa.int64()),
    pa.field("completed_tokens", pa.int64()),
    pa.field("starvation_ratio", pa.float64()),
])

WINDOW = _schema(
    "window",
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("backend", pa.string(), nullable=False),
    pa.field("scope", pa.string(), nullable=False),  # "window" or "run" (the whole run)
    pa.field("window_start", pa.float64(), nullable=False),
    pa.field("window_end", pa.float64(), nullable=False),
    pa.field("served", pa.int32(), nullable=False),
    pa.field("max_loras", pa.int32(), nullable=False),
    pa.field("max_lora_rank", pa.int32(), nullable=False),
    pa.field("arrivals", pa.int64(), nullable=False),
    pa.field("finished", pa.int64(), nullable=False),
    pa.field("offered_tokens", pa.int64(), nullable=False),
    pa.field("completed_tokens", pa.int64(), nullable=False),
    pa.field("throughput", pa.float64(), nullable=False),  # completed tokens / window length
    pa.field("starvation_ratio", pa.float64(), nullable=False),  # 1 - completed / offered
    pa.field("starved", pa.int8(), nullable=False),  # starvation_ratio >= 0.1
    pa.field("running", pa.float64()),  # mean over the window
    pa.field("waiting", pa.float64()),
    pa.field("kv_usage", pa.float64()),  # fraction 0..1
    pa.field("adapter_loads", pa.int64()),
    pa.field("mean_ttft_ms", pa.float64()),
    pa.field("mean_itl_ms", pa.float64()),
    pa.field("adapters", pa.list_(ADAPTER_WINDOW)),  # per-adapter starvation
)

RECOMMENDATION = _schema(
    "recommendation",
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),  # recommendation | drift
    pa.field("window_end", pa.float64(), nullable=False),
    pa.field("served", pa.int32()),
    pa.field("max_loras", pa.int32()),
    pa.field("predicted_throughput", pa.float64()),
    pa.field("interval_low", pa.float64()),
    pa.field("interval_high", pa.float64()),
    pa.field("starvation_prob", pa.float64()),
    pa.field("model", pa.string()),
    pa.field("model_version", pa.int64()),
    pa.field("changed", pa.bool_()),
    pa.field("asked_twin", pa.bool_()),
    pa.field("reason", pa.string()),
)

DEADLETTER = _schema(
    "deadletter",
    pa.field("run_id", pa.string(), nullable=False),  # the job that refused the row
    pa.field("stage", pa.string(), nullable=False),  # ingest | replay | sink | learner ...
    pa.field("source", pa.string(), nullable=False),  # file or topic
    pa.field("line", pa.int64()),  # line (or offset) where the row was found
    pa.field("reason", pa.string(), nullable=False),
    pa.field("payload", pa.string(), nullable=False),  # the raw row, as text (invalid bytes escaped)
)

def _check_value(field: pa.Field, value: Any) -> str | None:
    """Why ``value`` does not fit ``field``, or None."""
    if value is None:
        return None if field.nullable else f"field '{field.name}' is missing"
    t = field.type
    if pa.types.is_integer(t):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return None
            return f"field '{field.name}' must be an integer, got {value!r:.60}"
    elif pa.types.is_floating(t):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"field '{field.name}' must be a number, got {value!r:.60}"
        if not math.isfinite(value):
            return f"field '{field.name}' must be finite, got {value!r}"
    elif pa.types.is_string(t):
        if not isinstance(value, str):
            return f"field '{field.name}' must be a string, got {value!r:.60}"
    elif pa.types.is_boolean(t):
        if not isinstance(value, bool):
            return f"field '{field.name}' must be true or false, got {value!r:.60}"
    elif pa.types.is_list(t):
        if not isinstance(value, list):
            return f"field '{field.name}' must be a list"
    return None


def check(record: Any, schema: pa.Schema) -> dict:
    """Return ``record`` if it matches ``schema``; raise RecordError with the reason otherwise."""
    if not isinstance(record, dict):
        raise RecordError(f"record must be a JSON object, got {type(record).__name__}")
    v = record.get("v")
    if v != SCHEMA_VERSION:
        raise RecordError(f"unknown record version v={v!r} (this build reads v={SCHEMA_VERSION})")
    for field in schema:
        why = _check_value(field, record.get(field.name))
        if why:
            raise RecordError(why)
    return record


_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def encode(records: Iterable[dict]) -> bytes:
    """A batch of records as one Kafka message value: newline-delimited JSON, one record per line.

    NDJSON rather than a JSON array so that a consumer can parse many messages at once with Arrow's
    C++ JSON reader (``decode_many``).
    """
    return "\n".join(map(_ENCODE, records)).encode()


def encode_requests(records: Iterable[dict]) -> bytes:
    """``encode`` for REQUEST records, 2-3x faster (a fixed template; the hot path of ingest).

    The records must already be valid (``check``/ingest validation): a non-finite ``ts`` would not be
    caught here.
    """
    from json.encoder import encode_basestring_ascii as q

    return "\n".join([
        f'{{"v":{r["v"]},"request_id":{q(r["request_id"])},"run_id":{q(r["run_id"])},"ts":{float(r["ts"])!r},'
        f'"adapter_id":{q(r["adapter_id"])},"adapter_rank":{int(r["adapter_rank"])},'
        f'"prompt_tokens":{int(r["prompt_tokens"])},"output_tokens":{int(r["output_tokens"])},'
        f'"source":{q(r["source"])}}}' for r in records]).encode()


def decode(value: bytes, schema: pa.Schema) -> list[dict]:
    """Records from one message value; RecordError if a line is not valid JSON or a record is wrong."""
    records = []
    for line in value.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RecordError(f"not valid JSON: {err}") from None
        records.append(check(obj, schema))
    return records


def _arrow_problem(table: pa.Table, schema: pa.Schema) -> str | None:
    """What the fast Arrow parse let through that ``check`` would refuse (version, nulls, NaN)."""
    import pyarrow.compute as pc

    if table.num_rows and not pc.all(pc.equal(table["v"], SCHEMA_VERSION)).as_py():
        return "unknown version"
    for field in schema:
        col = table[field.name]
        if not field.nullable and col.null_count:
            return f"field '{field.name}' is missing"
        if pa.types.is_floating(field.type) and table.num_rows:
            if not pc.all(pc.is_finite(col.fill_null(0.0))).as_py():
                return f"field '{field.name}' not finite"
    return None


def decode_many(values: list[bytes], schema: pa.Schema) -> tuple[pa.Table, list[tuple[int, str, bytes]]]:
    """Decode many message values at once into one Arrow table with exactly ``schema``'s columns.

    Returns ``(table, bad)`` where ``bad`` lists ``(message index, reason, raw line)`` for every record
    that was refused. The common case (all valid) is parsed in one call to Arrow's JSON reader; only
    when that fails are the messages re-read one record at a time to find the bad ones.
    """
    import io

    import pyarrow.json as pj

    if values:
        try:
            table = pj.read_json(
                io.BytesIO(b"\n".join(values)),
                read_options=pj.ReadOptions(block_size=1 << 24),
                parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="error"))
            if _arrow_problem(table, schema) is None:
                return table.select(schema.names).cast(schema), []
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            pass
    good: list[dict] = []
    bad: list[tuple[int, str, bytes]] = []
    for i, value in enumerate(values):
        for line in value.splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                extra = set(obj) - set(schema.names) if isinstance(obj, dict) else set()
                if extra:
                    raise RecordError(f"unknown field(s) {sorted(extra)}")
                good.append(check(obj, schema))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                bad.append((i, f"not valid JSON: {err}", line))
            except RecordError as err:
                bad.append((i, str(err), line))
    return to_table(good, schema), bad


def to_table(records: list[dict], schema: pa.Schema) -> pa.Table:
    """Records as an Arrow table with exactly the schema's columns."""
    return pa.Table.from_pylist(records, schema=schema)


BY_NAME = {s.metadata[b"record"].decode(): s for s in (REQUEST, TELEMETRY, WINDOW, RECOMMENDATION, DEADLETTER)}
