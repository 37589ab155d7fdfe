"""Record schemas: the JSON wire format and its validation (pure logic, no broker)."""

import json
import math

import pytest

from adaptwin import schemas

REQ = {"v": 1, "request_id": "r1", "run_id": "t", "ts": 1.25, "adapter_id": "lora-1", "adapter_rank": 8,
       "prompt_tokens": 100, "output_tokens": 20, "source": "x:2"}


def test_round_trip_batch():
    recs = [dict(REQ, request_id=f"r{i}") for i in range(5)]
    value = schemas.encode(recs)
    assert value.count(b"\n") == 4
    assert schemas.decode(value, schemas.REQUEST) == recs


@pytest.mark.parametrize("change,reason", [
    ({"v": 2}, "unknown record version"),
    ({"prompt_tokens": "12"}, "must be an integer"),
    ({"ts": None}, "'ts' is missing"),
    ({"adapter_id": 3}, "must be a string"),
])
def test_check_refuses_with_reason(change, reason):
    with pytest.raises(schemas.RecordError, match=reason):
        schemas.check(dict(REQ, **change), schemas.REQUEST)


def test_encode_refuses_nan():
    with pytest.raises(ValueError):
        schemas.encode([dict(REQ, ts=math.nan)])


def test_decode_many_fast_path_matches_schema():
    values = [schemas.encode([dict(REQ, request_id=f"{m}-{i}") for i in range(3)]) for m in range(4)]
    table, bad = schemas.decode_many(values, schemas.REQUEST)
    assert bad == []
    assert table.num_rows == 12
    assert table.schema.equals(schemas.REQUEST)


def test_decode_many_isolates_bad_records():
    good = schemas.encode([REQ, dict(REQ, request_id="r2")])
    nan_line = json.dumps(dict(REQ, request_id="r3", ts=float("nan"))).encode()  # Python writes NaN
    values = [good, b"not json", schemas.encode([dict(REQ, v=7)]), nan_line, schemas.encode([dict(REQ, extra=1)])]
    table, bad = schemas.decode_many(values, schemas.REQUEST)
    assert table.column("request_id").to_pylist() == ["r1", "r2"]
    reasons = {i: r for i, r, _ in bad}
    assert set(reasons) == {1, 2, 3, 4}
    assert "not valid JSON" in reasons[1]
    assert "version" in reasons[2]
    assert "finite" in reasons[3]
    assert "unknown field" in reasons[4]


def test_window_with_per_adapter_list_round_trips():
    win = {"v": 1, "run_id": "r", "backend": "twin", "scope": "window", "window_start": 0.0, "window_end": 60.0,
           "served": 4, "max_loras": 2, "max_lora_rank": 8, "arrivals": 10, "finished": 9, "offered_tokens": 1000,
           "completed_tokens": 900, "throughput": 15.0, "starvation_ratio": 0.1, "starved": 1, "running": 2.5,
           "waiting": 0.0, "kv_usage": 0.1, "adapter_loads": 3, "mean_ttft_ms": 50.0, "mean_itl_ms": 12.0,
           "adapters": [{"adapter_id": "lora-0", "offered_tokens": 500, "completed_tokens": 400,
                         "starvation_ratio": 0.2}]}
    table, bad = schemas.decode_many([schemas.encode([win])], schemas.WINDOW)
    assert bad == []
    assert table.to_pylist()[0]["adapters"][0]["completed_tokens"] == 400


def test_encode_requests_matches_the_generic_encoder():
    recs = [dict(REQ, request_id=f'r"{i}\\', source="f\u00e9:1", ts=i / 3) for i in range(50)]
    assert schemas.encode_requests(recs) == schemas.encode(recs)
    assert schemas.decode(schemas.encode_requests(recs), schemas.REQUEST) == recs
