"""``adaptwin profile vllm`` + ``twin fit`` (issue 10 item 1).

* the fit recovers known constants from synthetic calibration CSVs with noise, with and without base-model runs;
* bad calibration data (negative latencies, missing columns, no KV figure) is refused with a message that says so;
* round trip: profile a real ``adaptwin twin serve`` process, fit, and recover the twin's own profile constants
  within 5 %; ``--launch`` restarts the server per KV configuration and reads vllm:cache_config_info.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaptwin.profiler.fit import FitError, fit_profile
from adaptwin.profiler.vllm_profile import META_FILE, write_csvs
from adaptwin.twin.engine import Engine
from adaptwin.twin.config import ServerConfig
from adaptwin.twin.profile import Profile, load_profile

MODEL = "llama-3.1-8b-instruct"
CLI = [sys.executable, "-m", "adaptwin"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
#: twin serve runs at half real time in the round trip: on a loaded 2-core machine a server that falls behind sends
#: tokens in catch-up bursts, which a client cannot tell from fast steps
SPEEDUP = "0.5"


# ----------------------------------------------------------------------------------------------------------
# synthetic calibration data
TRUE = {"base_ms": 9.0, "decode_ms_per_seq": 0.05, "lora_base": 2.0, "lora_seq": 0.01, "lora_adapter": 0.6,
        "pre": 0.03, "lora_pre": 0.02, "skip": 0.004}


def synthetic(folder: Path, *, base_runs: bool, noise: float = 0.01, seed: int = 0) -> Path:
    rnd = random.Random(seed)

    def n(v: float) -> float:
        return v * (1 + rnd.gauss(0, noise))

    t = TRUE
    rows: dict[str, list[dict]] = {k: [] for k in ("est_default_latency.csv", "est_latency_overhead.csv",
                                                    "est_loading_time.csv", "est_kv_capacity.csv",
                                                    "est_scheduler_overhead.csv")}
    for N in (1, 8, 16, 32, 64, 128):
        if base_runs:
            rows["est_default_latency.csv"].append({"model": "m", "experiment": "decode", "status": "ok",
                                                    "mean_batch_size": N,
                                                    "mean_itl_ms": n(t["base_ms"] + t["decode_ms_per_seq"] * N)})
        lora = t["base_ms"] + t["lora_base"] + (t["decode_ms_per_seq"] + t["lora_seq"]) * N + t["lora_adapter"]
        rows["est_latency_overhead.csv"].append({"model": "m", "experiment": "decode_lora", "status": "ok",
                                                 "mean_batch_size": N, "adapters_with_traffic": 1,
                                                 "mean_itl_ms": n(lora)})
    for A in (1, 2, 4, 8, 16, 32):
        y = (t["base_ms"] + t["lora_base"] + (t["decode_ms_per_seq"] + t["lora_seq"]) * 32 + t["lora_adapter"] * A)
        rows["est_latency_overhead.csv"].append({"model": "m", "experiment": "overhead_small", "status": "ok",
                                                 "mean_batch_size": 32, "adapters_with_traffic": A,
                                                 "mean_itl_ms": n(y)})
    for P in (16, 256, 512, 1024, 1536):
        fixed = 12.0
        if base_runs:
            rows["est_default_latency.csv"].append({"model": "m", "experiment": "prefill", "status": "ok",
                                                    "set_input_length": P, "min_ttft_ms": n(fixed + t["pre"] * P)})
        rows["est_default_latency.csv"].append({"model": "m", "experiment": "prefill_lora", "status": "ok",
                                                "set_input_length": P,
                                                "min_ttft_ms": n(fixed + 2 + (t["pre"] + t["lora_pre"]) * P)})
    for rank, ms in ((8, 7.0), (16, 6.0)):
        rows["est_loading_time.csv"].append({"model": "m", "adapter_rank": rank, "max_lora_rank": 16,
                                             "status": "ok", "mean_activation_time_ms": n(ms)})
    for g, r in ((1, 8), (4, 8), (4, 16), (8, 16)):
        rows["est_kv_capacity.csv"].append({"model": "m", "max_loras": g, "max_lora_rank": r, "status": "ok",
                                            "kv_cache_tokens": int(500_000 - 40 * g * r)})
    rows["est_kv_capacity.csv"].append({"model": "m", "max_loras": 64, "max_lora_rank": 64,
                                        "status": "failed:start-up"})
    for w in (0, 250, 500, 1000):
        rows["est_scheduler_overhead.csv"].append({"source": "profile_vllm", "avg_waiting_queue": w,
                                                   "mean_itl_ms": n(10.0 + t["skip"] * w), "status": "ok"})
    # a shot whose holders ended before its probe: recorded, not fitted (it would double the slope)
    rows["est_scheduler_overhead.csv"].append({"source": "profile_vllm", "avg_waiting_queue": 300,
                                               "mean_itl_ms": 25.0, "status": "failed:waiting_not_steady"})
    write_csvs(rows, folder)
    meta = {"schema": 1, "model": "m", "max_loras": 8, "max_lora_rank": 16, "notes": [],
            "server": {"max_model_len": 4096, "version": "test", "block_size": 16}}
    (folder / META_FILE).write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("base_runs", [True, False])
def test_fit_recovers_known_constants_from_noisy_data(tmp_path: Path, base_runs: bool) -> None:
    prof = fit_profile(synthetic(tmp_path, base_runs=base_runs), "m", "cpu")
    st, t = prof["step_time"], TRUE
    if base_runs:  # the no-LoRA runs separate the LoRA terms
        expect = {"base_ms": t["base_ms"], "decode_ms_per_seq": t["decode_ms_per_seq"], "lora_base_ms": t["lora_base"],
                  "lora_ms_per_seq": t["lora_seq"], "prefill_ms_per_token": t["pre"],
                  "lora_ms_per_prefill_token": t["lora_pre"]}
        tolerances = {"lora_base_ms": 0.15, "lora_ms_per_seq": 0.25}  # differences of two noisy fits
    else:  # a LoRA-only server: the same step times for every LoRA batch
        expect = {"base_ms": t["base_ms"] + t["lora_base"], "decode_ms_per_seq": t["decode_ms_per_seq"] + t["lora_seq"],
                  "lora_base_ms": 0.0, "lora_ms_per_seq": 0.0, "prefill_ms_per_token": t["pre"] + t["lora_pre"]}
        tolerances = {}
    expect["lora_ms_per_adapter"] = t["lora_adapter"]
    for key, want in expect.items():
        tol = tolerances.get(key, 0.05)
        assert st[key] == pytest.approx(want, rel=tol, abs=1e-9), (key, st[key], want)
    assert prof["scheduler"]["ms_per_waiting_skipped"] == pytest.approx(t["skip"], rel=0.15)
    assert prof["scheduler"]["base_ms"] == 0.0 and prof["scheduler"]["ms_per_running"] == 0.0
    assert prof["loading_ms"]["16"]["8"] == pytest.approx(7.0, rel=0.05)
    kv = prof["kv_capacity"]
    assert kv["linear"]["tokens_per_slot_rank"] == pytest.approx(40, rel=1e-6)
    assert kv["failed"] == [[64, 64]]
    assert prof["limits"] == {"max_model_len": 4096, "client_max_waiting": None}
    p = Profile.from_dict(prof)  # the twin reads it
    assert p.kv_capacity_tokens(4, 16) == 500_000 - 40 * 64
    assert p.step.step_ms(10, 0, 2) > p.step.step_ms(10, 0, 1) > p.step.step_ms(1, 0, 1)


def test_scheduler_slope_below_noise_is_stored_as_zero(tmp_path: Path) -> None:
    cal = synthetic(tmp_path, base_runs=False)
    _edit_csv(cal / "est_scheduler_overhead.csv", "mean_itl_ms", "9.9", line=5)  # W = 1000 read faster than W = 0
    prof = fit_profile(cal, "m", "cpu")
    assert prof["scheduler"]["ms_per_waiting_skipped"] == 0.0
    assert prof["meta"]["fits"]["scheduler"]["form"].startswith("itl_ms = itl_0 + ms_per_waiting_skipped * W")


def _edit_csv(path: Path, column: str, value: str, line: int = 2) -> None:
    lines = path.read_text().splitlines()
    head = lines[0].split(",")
    cells = lines[line - 1].split(",")
    cells[head.index(column)] = value
    lines[line - 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def test_negative_latency_is_refused(tmp_path: Path) -> None:
    cal = synthetic(tmp_path, base_runs=False)
    _edit_csv(cal / "est_latency_overhead.csv", "mean_itl_ms", "-3.5", line=3)
    with pytest.raises(FitError, match=r"est_latency_overhead.csv line 3: mean_itl_ms = -3.5 must be > 0"):
        fit_profile(cal, "m", "cpu")


def test_missing_column_and_missing_kv_are_refused(tmp_path: Path) -> None:
    cal = synthetic(tmp_path / "a", base_runs=False)
    text = (cal / "est_default_latency.csv").read_text().replace("min_ttft_ms", "fastest_ttft")
    (cal / "est_default_latency.csv").write_text(text)
    with pytest.raises(FitError, match="lacks column.*min_ttft_ms"):
        fit_profile(cal, "m", "cpu")
    cal = synthetic(tmp_path / "b", base_runs=False)
    (cal / "est_kv_capacity.csv").unlink()
    with pytest.raises(FitError, match="no successful start-up"):
        fit_profile(cal, "m", "cpu")
    cal = synthetic(tmp_path / "c", base_runs=False)
    with pytest.raises(FitError, match="profiled as model 'm'"):
        fit_profile(cal, "other-model", "cpu")


def test_twin_fit_cli_reports_bad_profile_data_in_one_line(tmp_path: Path) -> None:
    cal = synthetic(tmp_path / "cal", base_runs=True)
    _edit_csv(cal / "est_default_latency.csv", "mean_itl_ms", "nan")
    r = subprocess.run(CLI + ["twin", "fit", "--calibration", str(cal), "--model", "m", "--out",
                              str(tmp_path / "p.json")], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 2, r.stderr
    assert "adaptwin: error:" in r.stderr and "mean_itl_ms is not finite" in r.stderr
    assert "Traceback" not in r.stderr


def test_profile_vllm_needs_exactly_one_server(tmp_path: Path) -> None:
    r = subprocess.run(CLI + ["profile", "vllm", "--out", str(tmp_path)], capture_output=True, text=True, env=ENV,
                       timeout=60)
    assert r.returncode == 2 and "exactly one of --url" in r.stderr


# ----------------------------------------------------------------------------------------------------------
# round trip against twin serve
def _serve(profile: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(CLI + ["twin", "serve", "--model", MODEL, "--max-cpu-loras", "10", "--max-loras", "8",
                                   "--ranks", "8,16", "--speedup", SPEEDUP, "--port", "0", "--profile", str(profile),
                                   *extra], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV,
                            start_new_session=True)
    line = proc.stdout.readline()
    assert "listening on" in line, line
    return proc, line.split("listening on ")[1].split()[0]


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.fixture
def twin_profile(tmp_path: Path) -> Path:
    """The shipped Llama profile as a file (twin serve and the test read the same constants), without the
    context-length (KV read) term: the quick profile measures decode at one short context, so that term would land
    in the per-request slope (docs/profiler.md)."""
    from importlib import resources

    data = json.loads(resources.files("adaptwin.twin").joinpath("profiles", f"h100-64gb__{MODEL}.json").read_text())
    data["step_time"]["kv_read_ms_per_ktoken"] = 0.0
    path = tmp_path / "twin-profile.json"
    path.write_text(json.dumps(data))
    return path


def test_round_trip_twin_serve_profile_fit_recovers_constants(tmp_path: Path, twin_profile: Path) -> None:
    """Profile a twin serve process (quick), fit, compare with what the twin computes from its own profile."""
    proc, url = _serve(twin_profile)
    out = tmp_path / "cal"
    try:
        t0 = time.monotonic()
        r = subprocess.run(CLI + ["profile", "vllm", "--url", url, "--out", str(out), "--quick", "--ranks", "8,16",
                                  "--experiments", "decode,lora,prefill,loading,scheduler,kv",
                                  "--decode-batches", "1,16,32,48",
                                  "--lora-batches", "16", "--prefill-tokens", "16,1536", "--repeats", "3",
                                  "--loading-repeats", "3", "--json"],
                           capture_output=True, text=True, env=ENV, timeout=240)
        profile_s = time.monotonic() - t0
    finally:
        _stop(proc)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["twin"] is True and summary["speedup"] == float(SPEEDUP)
    assert any("base model" in n for n in summary["notes"])  # twin serve refuses base-model completions
    fitted = tmp_path / "fitted.json"
    r = subprocess.run(CLI + ["twin", "fit", "--calibration", str(out), "--model", MODEL, "--gpu", "twin",
                              "--out", str(fitted)], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(fitted.read_text())

    # what the twin computes for LoRA steps with this server's max_lora_rank (16): the identifiable combinations
    prof = load_profile(MODEL, path=twin_profile)
    eng = Engine(ServerConfig(model=MODEL, served=10, max_loras=8, adapter_ranks=(8, 16) * 5), prof)
    want = {
        "base_ms": eng._c_base + eng._l_base + eng._s_base,
        "decode_ms_per_seq": eng._c_dec + eng._l_dec + eng._s_run + eng._l_adk,
        "lora_ms_per_adapter": eng._l_ad + eng._l_adk * 16,  # A varied at N = 16
        "prefill_ms_per_token": eng._c_pre + eng._l_pre + eng._l_adk,
    }
    st = got["step_time"]
    report = {k: (round(st[k], 5), round(v, 5), f"{100 * (st[k] / v - 1):+.1f} %") for k, v in want.items()}
    print(f"round trip (profile {profile_s:.1f} s):", report)
    for key, value in want.items():
        assert st[key] == pytest.approx(value, rel=0.05), report
    # waiting requests the scheduler scans and skips every step (W = 0 and 150, from the server's ITL histogram)
    skip = got["scheduler"]["ms_per_waiting_skipped"]
    print(f"scheduler: ms_per_waiting_skipped {skip:.6g} against the twin's {eng._s_wait:.6g} "
          f"({100 * (skip / eng._s_wait - 1):+.1f} %)")
    assert skip == pytest.approx(eng._s_wait, rel=0.05), got["meta"]["fits"].get("scheduler")
    assert got["scheduler"]["base_ms"] == got["scheduler"]["ms_per_running"] == 0.0  # inside the step terms
    for rank in (8, 16):
        assert got["loading_ms"]["16"][str(rank)] == pytest.approx(prof.load_ms(16, rank), rel=0.05), got["loading_ms"]
    kv = got["kv_capacity"]["table"]
    assert kv == [{"max_loras": 8, "max_lora_rank": 16, "kv_cache_tokens": eng.capacity_blocks * 16}]
    assert got["limits"]["max_model_len"] == eng.max_model_len


def test_launch_restarts_the_server_per_kv_configuration(tmp_path: Path, twin_profile: Path) -> None:
    out = tmp_path / "cal"
    launch = [sys.executable, "-m", "adaptwin", "twin", "serve", "--model", MODEL, "--max-cpu-loras", "10",
              "--ranks", "8,16", "--speedup", "1", "--profile", str(twin_profile)]
    r = subprocess.run(CLI + ["profile", "vllm", "--out", str(out), "--experiments", "kv", "--ranks", "8,16",
                              "--max-loras", "2", "--max-lora-rank", "16", "--kv-grid", "4:16,8:32,11:16", "--json",
                              "--launch", "--", *launch], capture_output=True, text=True, env=ENV, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = (out / "est_kv_capacity.csv").read_text().splitlines()
    prof = load_profile(MODEL, path=twin_profile)
    got = {(int(x.split(",")[1]), int(x.split(",")[2])): x.split(",")[6] for x in rows[1:]}
    for g, rank in ((2, 16), (4, 16), (8, 32)):
        assert int(got[(g, rank)]) == prof.kv_capacity_tokens(g, rank) // 16 * 16, (g, rank, got)
    assert got[(11, 16)] == ""  # max_loras above --max-cpu-loras: the server refuses to start, recorded as failed
    assert "failed" in next(x for x in rows if x.split(",")[1:3] == ["11", "16"])


def test_stream_gap_ignores_a_stall_and_its_catch_up_burst() -> None:
    from adaptwin.profiler.vllm_profile import _robust_gap

    step = 0.015
    times = [(0.1 + i * step, i) for i in range(1, 61)]
    # the client is descheduled for 0.2 s at token 50: tokens 50..55 arrive together, then on time again
    stalled = [(max(t, 0.1 + 55 * step) if 50 <= n <= 55 else t, n) for t, n in times]
    stalled[-1] = (stalled[-1][0] + 0.05, stalled[-1][1])  # and the last token arrives late
    assert _robust_gap(stalled) == pytest.approx(step, rel=0.02)
    ends = (stalled[-1][0] - stalled[0][0]) / (stalled[-1][1] - stalled[0][1])
    assert abs(ends / step - 1) > 0.04  # what the two end points alone would say
