"""``twin serve``: vLLM's API, metrics and fault injection, on a free local port."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from adaptwin.replay.backends.promtext import parse
from adaptwin.replay.serve import Faults, ServeConfig, ServerThread
from adaptwin.replay.serve.config import FaultError

MODEL = "llama-3.1-8b-instruct"


def cfg(**kw) -> ServeConfig:
    base = dict(model=MODEL, max_cpu_loras=4, max_loras=2, ranks=(8, 16), port=0)
    base.update(kw)
    return ServeConfig(**base)


@pytest.fixture(scope="module")
def srv():
    with ServerThread(cfg(speedup=5.0, max_model_len=4096, fault_endpoint=True)) as s:
        yield s


@pytest.fixture
def client(srv):
    with httpx.Client(base_url=srv.url, timeout=20) as c:
        yield c


def sse_events(resp) -> list:
    out = []
    for line in resp.iter_lines():
        if line.startswith("data:"):
            data = line[5:].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_lists_base_first_then_adapters(client):
    data = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [MODEL, "lora-0", "lora-1", "lora-2", "lora-3"]
    assert data[0]["parent"] is None and data[0]["max_model_len"] == 4096
    assert all(m["parent"] == MODEL for m in data[1:])
    assert client.get("/health").status_code == 200


def test_stream_sends_one_event_per_token(client):
    body = {"model": "lora-1", "prompt": "one two three four five", "max_tokens": 7, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with client.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": "abc"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    tokens = [e for e in events[:-1] if e["choices"]]
    assert len(tokens) == 7
    assert [e["usage"]["completion_tokens"] for e in tokens] == list(range(1, 8))
    assert all(e["usage"]["prompt_tokens"] == 5 for e in tokens)
    assert [e["choices"][0]["finish_reason"] for e in tokens] == [None] * 6 + ["length"]
    assert all(e["id"] == "cmpl-abc" and e["object"] == "text_completion" for e in tokens)
    final = events[-2]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 7
    served = client.get("/adaptwin/served").json()["requests"]
    row = next(r for r in served if r["id"] == "cmpl-abc")
    assert row["prompt_tokens"] == 5 and row["output_tokens"] == 7 and row["ttft_ms"] > 0 and row["itl_ms"] > 0


def test_non_streamed_completion_and_token_id_prompt(client):
    r = client.post("/v1/completions", json={"model": "lora-0", "prompt": list(range(300)), "max_tokens": 3})
    assert r.status_code == 200
    out = r.json()
    assert out["usage"] == {"prompt_tokens": 300, "total_tokens": 303, "completion_tokens": 3,
                            "prompt_tokens_details": None}
    assert out["choices"][0]["finish_reason"] == "length"
    # a batch of one prompt, as a list of ids inside a list
    r = client.post("/v1/completions", json={"model": "lora-2", "prompt": [[1, 2, 3]], "max_tokens": 1})
    assert r.json()["usage"]["prompt_tokens"] == 3


def test_errors_look_like_vllm(client):
    r = client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404
    assert r.json()["error"] == {"message": "The model `nope` does not exist.", "type": "NotFoundError",
                                 "param": "model", "code": 404}
    r = client.post("/v1/completions", json={"model": "lora-0", "prompt": list(range(4000)), "max_tokens": 200})
    assert r.status_code == 400 and "maximum context length is 4096 tokens" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 400 and "adapter" in r.json()["error"]["message"]
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = client.post("/v1/completions", json={"model": "lora-0", "prompt": ["a", "b"]})
    assert r.status_code == 400 and "one prompt" in r.json()["error"]["message"]
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/completions").status_code == 405


def test_metrics_have_vllm_names(client):
    client.post("/v1/completions", json={"model": "lora-3", "prompt": "a b c", "max_tokens": 4})
    fams = parse(client.get("/metrics").text)
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:lora_requests_info", "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                 "vllm:e2e_request_latency_seconds", "vllm:generation_tokens", "vllm:prompt_tokens",
                 "vllm:num_preemptions"):
        assert name in fams, name
    assert fams["vllm:generation_tokens"].type == "counter"
    assert any(s.name == "vllm:generation_tokens_total" and s.value >= 4 for s in fams["vllm:generation_tokens"].samples)
    ttft = fams["vllm:time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    inf = [s for s in ttft.samples if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"][0]
    count = [s for s in ttft.samples if s.name.endswith("_count")][0]
    assert inf.value == count.value >= 1
    info = fams["vllm:lora_requests_info"].samples
    assert info and set(info[0].labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    assert info[0].labels["max_lora"] == "2"


def test_metrics_show_running_adapters_while_busy(srv):
    with httpx.Client(base_url=srv.url, timeout=20) as c:
        body = {"model": "lora-2", "prompt": "x " * 100, "max_tokens": 400, "stream": True}
        with c.stream("POST", "/v1/completions", json=body) as r:
            it = r.iter_lines()
            next(l for l in it if l.startswith("data:"))  # the request is running now
            fams = parse(httpx.get(srv.url + "/metrics").text)
            running = [s for s in fams["vllm:num_requests_running"].samples][0].value
            newest = max(fams["vllm:lora_requests_info"].samples, key=lambda s: s.value)
            assert running >= 1
            assert "lora-2" in newest.labels["running_lora_adapters"].split(",")
            kv = fams["vllm:kv_cache_usage_perc"].samples[0].value
            assert 0 < kv <= 1


def test_fault_endpoint_forces_errors_and_resets(srv, client):
    r = client.post("/fault", json={"next": ["5xx", "reset", "ok"], "error_status": 503})
    assert r.status_code == 200 and r.json()["next"] == ["5xx", "reset", "ok"]
    r = client.post("/v1/completions", json={"model": "lora-0", "prompt": "a", "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == 503
    with pytest.raises(httpx.TransportError):
        client.post("/v1/completions", json={"model": "lora-0", "prompt": "a", "max_tokens": 2})
    r = client.post("/v1/completions", json={"model": "lora-0", "prompt": "a", "max_tokens": 2})
    assert r.status_code == 200
    # mid-stream reset after half of the tokens
    client.post("/fault", json={"next": ["midstream"]})
    got = 0
    with pytest.raises(httpx.TransportError):
        with client.stream("POST", "/v1/completions",
                           json={"model": "lora-1", "prompt": "a", "max_tokens": 6, "stream": True}) as r:
            for line in r.iter_lines():
                got += line.startswith("data:")
    assert got == 3
    assert client.post("/fault", json={"bogus": 1}).status_code == 400
    assert client.post("/fault", json={"reset": True}).json()["next"] == []


def test_fault_spec_is_checked():
    with pytest.raises(FaultError):
        Faults(error_rate=1.5)
    with pytest.raises(FaultError):
        Faults(error_rate=0.6, reset_rate=0.6)
    with pytest.raises(FaultError):
        Faults(next=("explode",))
    assert Faults.from_json({"latency_ms": 5}, Faults(error_rate=0.1)).error_rate == 0.1


def test_lora_load_unload_and_runtime_switch():
    with ServerThread(cfg(register_at_start=False)) as s, httpx.Client(base_url=s.url, timeout=10) as c:
        assert [m["id"] for m in c.get("/v1/models").json()["data"]] == [MODEL]
        r = c.post("/v1/load_lora_adapter", json={"lora_name": "lora-0", "lora_path": "/x/lora-0"})
        assert r.status_code == 200 and "added successfully" in r.text
        assert c.post("/v1/load_lora_adapter", json={"lora_name": "lora-0", "lora_path": "/x"}).status_code == 400
        assert c.post("/v1/completions", json={"model": "lora-0", "prompt": "a", "max_tokens": 1}).status_code == 200
        for k in range(1, 4):
            assert c.post("/v1/load_lora_adapter", json={"lora_name": f"a{k}", "lora_path": "p"}).status_code == 200
        full = c.post("/v1/load_lora_adapter", json={"lora_name": "extra", "lora_path": "p"})
        assert full.status_code == 400 and "max-cpu-loras" in full.json()["error"]["message"]
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 200
        assert c.post("/v1/unload_lora_adapter", json={"lora_name": "a2"}).status_code == 404
        assert c.post("/v1/completions", json={"model": "a2", "prompt": "a"}).status_code == 404
        assert c.get("/v1/models").json()["data"][1]["root"] == "/x/lora-0"
    with ServerThread(cfg(runtime_lora_updating=False, api_key="sekret")) as s:
        assert httpx.post(s.url + "/v1/load_lora_adapter", json={"lora_name": "z"},
                          headers={"Authorization": "Bearer sekret"}).status_code == 404
        assert httpx.get(s.url + "/v1/models").status_code == 401
        assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(s.url + "/metrics").status_code == 200  # like vLLM: metrics stay open


def test_speedup_scales_twin_time():
    """At speedup 20 the twin's 40 decode steps (~0.6 twin s) take ~30 wall ms, not 600."""
    with ServerThread(cfg(speedup=20.0)) as s, httpx.Client(base_url=s.url, timeout=10) as c:
        t = time.perf_counter()
        r = c.post("/v1/completions", json={"model": "lora-0", "prompt": "a", "max_tokens": 40})
        wall = time.perf_counter() - t
        assert r.status_code == 200
        e2e = c.get("/adaptwin/served").json()["requests"][-1]["e2e_ms"] / 1e3
        assert e2e > 0.3
        # unscaled, the request would take e2e wall seconds; half of that leaves room for a loaded CI machine
        assert wall < e2e / 2, (wall, e2e)


def _serve_cmd() -> list[str]:
    """`adaptwin twin serve` as a process."""
    return [sys.executable, "-m", "adaptwin"]


def test_cli_serves_on_a_free_port_and_stops_on_sigterm():
    cmd = _serve_cmd() + ["twin", "serve", "--model", MODEL, "--max-cpu-loras", "3", "--max-loras", "2",
                          "--ranks", "8,16", "--speedup", "10", "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
        url = line.split("listening on ")[1].split()[0]
        ids = [m["id"] for m in httpx.get(url + "/v1/models", timeout=10).json()["data"]]
        assert ids == [MODEL, "lora-0", "lora-1", "lora-2"]
        r = httpx.post(url + "/v1/completions", json={"model": "lora-2", "prompt": "a b", "max_tokens": 2}, timeout=10)
        assert r.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_cli_rejects_bad_flags():
    cmd = _serve_cmd() + ["twin", "serve", "--model", MODEL, "--max-cpu-loras", "2", "--max-loras", "4",
                          "--port", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "max-cpu-loras" in out.stderr


def test_a_steps_first_tokens_are_written_before_its_later_tokens():
    """All of a step's tokens are due at its end; the first ones (each carries a whole TTFT) go out first."""
    from adaptwin.replay.serve.server import TwinServer, _Live
    from adaptwin.twin.config import Arrivals

    server = TwinServer(cfg(max_loras=4))
    eng = server.engine
    arrivals = [(0.0, 0, 64, 30), (0.05, 1, 64, 30), (0.1, 2, 64, 30), (0.15, 3, 64, 30)]
    for rid, (t, adapter, prompt, out) in enumerate(arrivals):
        eng.add_arrivals(Arrivals([t], [adapter], [prompt], [out]))
        server._live[rid] = _Live(rid, f"cmpl-{rid}", f"lora-{adapter}", prompt, out, True, False, False,
                                  resp=None, created=0)
    mixed = 0
    while eng.time < 0.6:
        before, step_start = list(eng.running), eng.time
        eng.advance_until(eng.time + 1e-9)
        sends, done = server._collect(before, step_start)
        firsts = [lv.sent == len(parts) for lv, parts in sends]  # its events start at token 1
        assert firsts == sorted(firsts, reverse=True), firsts  # no first token after a later one
        mixed += any(firsts) and not all(firsts)
        for lv in done:
            del server._live[lv.rid]
    assert mixed >= 2  # the case was exercised: steps with both kinds of tokens


def test_arrival_is_when_the_request_reached_the_server():
    """The twin's arrival lies between the client's send and the first byte of the answer (speedup 1)."""
    import socket

    with ServerThread(cfg(speedup=1.0)) as s:
        body = json.dumps({"model": "lora-0", "prompt": "a b c", "max_tokens": 2, "stream": True}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\nx-request-id: "
                f"arr\r\ncontent-length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", s.server.port)) as sock:
            sock.sendall(head)
            time.sleep(0.2)  # the body comes 200 ms after the head: the request is in only then
            sent = time.perf_counter()
            sock.sendall(body)
            got = sock.recv(1)
            answered = time.perf_counter()
            while not got.endswith(b"0\r\n\r\n"):  # the whole stream, so that the twin has finished it
                got += sock.recv(65536)
        with httpx.Client(base_url=s.url, timeout=10) as c:
            served = c.get("/adaptwin/served").json()
    row = next(r for r in served["requests"] if r["id"] == "cmpl-arr")
    arrival = served["start_perf_counter"] + row["arrival_s"]
    assert sent <= arrival <= answered, (sent, arrival, answered)
