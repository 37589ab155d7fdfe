import csv
import json
import subprocess
import sys

import pytest

from adaptwin.cli import main

from .conftest import LLAMA


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_run_json_is_last_line_with_contract_fields(capsys):
    rc, out, _ = run_cli(capsys, "twin", "run", "--model", LLAMA, "--rates", "0.1,0.05,0.025", "--ranks", "8,16,32",
                         "--served", "16", "--max-loras", "8", "--duration", "300", "--json")
    assert rc == 0
    obj = json.loads(out.strip().splitlines()[-1])
    assert set(obj) == {"total_throughput", "ideal_total_throughput", "starved", "arrivals", "finished",
                        "mean_ttft_ms", "mean_itl_ms", "adapter_loads", "wall_s"}
    assert obj["starved"] in (0, 1) and type(obj["starved"]) is int
    assert 0 < obj["finished"] <= obj["arrivals"]


@pytest.mark.parametrize("argv, match", [
    (["--model", "nope", "--rates", "0.1", "--ranks", "8", "--served", "4", "--max-loras", "2"], "unknown model"),
    (["--model", LLAMA, "--rates", "0.1", "--ranks", "8", "--served", "4", "--max-loras", "8"], "cannot exceed"),
    (["--model", LLAMA, "--rates", "-1", "--ranks", "8", "--served", "4", "--max-loras", "2"], "rates must be"),
    (["--model", LLAMA, "--rates", "nan", "--ranks", "8", "--served", "4", "--max-loras", "2"], "rates must be"),
    (["--model", LLAMA, "--rates", "0", "--ranks", "8", "--served", "4", "--max-loras", "2"], "no arrivals"),
    # a family missing from the profile: tests/profiler/test_adapters.py (the shipped profiles price all four)
])
def test_run_bad_input_is_a_clear_error(capsys, argv, match):
    rc, _, err = run_cli(capsys, "twin", "run", *argv, "--duration", "60", "--json")
    assert rc == 2
    assert match in err


def test_run_knobs_and_tables(capsys, tmp_path):
    req, win = tmp_path / "req.parquet", tmp_path / "win.parquet"
    rc, out, _ = run_cli(capsys, "twin", "run", "--model", LLAMA, "--rates", "0.5", "--ranks", "8", "--served", "4",
                         "--max-loras", "2", "--duration", "120", "--max-num-seqs", "8", "--max-model-len", "1024",
                         "--requests-out", str(req), "--windows-out", str(win), "--json")
    assert rc == 0
    import pyarrow.parquet as pq

    t = pq.read_table(req)
    assert t.num_rows == json.loads(out.splitlines()[-1])["arrivals"] or t.num_rows >= 1
    # prompt + max_tokens above --max-model-len: rejected, never finished
    rows = t.to_pylist()
    assert all(r["rejected"] for r in rows if r["prompt_tokens"] + r["output_tokens"] > 1024)
    assert not any(r["finished"] for r in rows if r["rejected"])
    assert pq.read_table(win).num_rows == 2


def test_run_trace(capsys):
    rc, out, _ = run_cli(capsys, "twin", "run", "--model", LLAMA, "--trace", "azure-code", "--served", "8",
                         "--max-loras", "4", "--duration", "120", "--json")
    assert rc == 0
    assert json.loads(out.splitlines()[-1])["arrivals"] > 0


def test_validate_keeps_order_columns_and_uses_processes(tmp_path):
    scen = tmp_path / "scen.csv"
    rows = [
        ("llama-3.1-8b-instruct", "0.1;0.05;0.025", "8;16", 32, 8, 16, 120, "a"),
        ("qwen-2.5-7b-instruct", "0.1;0.05;0.025", "8;16;32", 16, 16, 32, 60, "b"),
        ("llama-3.1-8b-instruct", "1.6;0.8;0.4", "8;16", 16, 8, 16, 60, "c"),
        ("llama-3.1-8b-instruct", "0.1", "8", 4, 8, 8, 60, "bad"),
    ]
    with scen.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "rates", "ranks", "served_adapters", "max_loras", "max_lora_rank", "duration_s", "tag"])
        w.writerows(rows)
    out = tmp_path / "out.csv"
    proc = subprocess.run([sys.executable, "-m", "adaptwin", "twin", "validate", "--scenarios", str(scen), "--out",
                           str(out), "--jobs", "2", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["rows"] == 4
    got = list(csv.DictReader(out.open()))
    assert [g["tag"] for g in got] == ["a", "b", "c", "bad"]
    assert all(g["sim_starved"] in ("0", "1") for g in got[:3])
    assert float(got[0]["sim_total_throughput"]) > 0
    assert "cannot exceed" in got[3]["sim_error"]
    # the same rows with one process give the same numbers
    out1 = tmp_path / "out1.csv"
    subprocess.run([sys.executable, "-m", "adaptwin", "twin", "validate", "--scenarios", str(scen), "--out",
                    str(out1)], capture_output=True, text=True, timeout=300, check=True)
    one = list(csv.DictReader(out1.open()))
    assert [g["sim_total_throughput"] for g in one] == [g["sim_total_throughput"] for g in got]


def test_validate_missing_column_is_a_clear_error(capsys, tmp_path):
    scen = tmp_path / "s.csv"
    scen.write_text("model,rates\nllama-3.1-8b-instruct,0.1\n")
    rc, _, err = run_cli(capsys, "twin", "validate", "--scenarios", str(scen), "--out", str(tmp_path / "o.csv"))
    assert rc == 2 and "lacks column" in err


def test_fit_command_writes_a_loadable_profile(capsys, tmp_path):
    from pathlib import Path

    cal = Path("/work/shared/data/calibration")
    if not cal.is_dir():
        pytest.skip("shared calibration data not available")
    out = tmp_path / "p.json"
    rc, stdout, _ = run_cli(capsys, "twin", "fit", "--calibration", str(cal), "--model", LLAMA, "--out", str(out))
    assert rc == 0 and "decode" in stdout
    from adaptwin.twin.profile import load_profile

    assert load_profile(path=out).model == LLAMA
    rc, _, err = run_cli(capsys, "twin", "fit", "--calibration", str(cal), "--model", "gpt-9", "--out", str(out))
    assert rc == 2 and "no calibration data" in err
