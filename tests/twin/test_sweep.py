"""Sweeps without Kafka: designs, rows, the resumable Parquet dataset, ``adaptwin sweep`` (twin/sweep.py,
replay/sweep_cli.py)."""

import argparse
import json

import pyarrow.parquet as pq
import pytest

from adaptwin.cliutil import UserError
from adaptwin.replay.sweep_cli import register_sweep
from adaptwin.twin import ConfigError
from adaptwin.twin.runner import run_scenario
from adaptwin.twin.sweep import (ROW_FIELDS, SweepDataset, SweepTask, check_design, grid_design, random_design,
                                 run_local, run_task)

LLAMA = "llama-3.1-8b-instruct"
QWEN = "qwen-2.5-7b-instruct"


def test_grid_design_keeps_max_loras_within_served_and_ids_are_stable():
    tasks = grid_design([(LLAMA, (0.4, 0.2), (8, 16)), (QWEN, (0.1,), (32,))], served=[32, 16, 64],
                        max_loras=[16, 64], duration=60.0, seeds=[0, 1])
    assert all(t.max_loras <= t.served for t in tasks)
    assert len(tasks) == 2 * 2 * 4  # per workload and seed: (16,16) (32,16) (64,16) (64,64)
    assert len({t.task_id for t in tasks}) == len(tasks)
    again = grid_design([(LLAMA, (0.4, 0.2), (8, 16))], served=[16], max_loras=[16], duration=60.0)
    assert again[0].task_id == tasks[0].task_id  # same run, same id, whoever plans it
    assert SweepTask.from_dict(tasks[3].to_dict()) == tasks[3]
    assert tasks[0].max_lora_rank == 16 and tasks[-1].max_lora_rank == 32


def test_random_design_is_seeded_and_paper_like():
    a = random_design(20, [LLAMA, QWEN], seed=3, duration=60.0)
    b = random_design(20, [LLAMA, QWEN], seed=3, duration=60.0)
    assert [t.task_id for t in a] == [t.task_id for t in b] and len(a) == 20
    assert [t.task_id for t in random_design(20, [LLAMA], seed=4)] != [t.task_id for t in a]
    assert all(t.max_loras <= t.served and len(t.rates) == 3 and t.max_lora_rank == max(t.ranks) for t in a)


@pytest.mark.parametrize("call,match", [
    (lambda: grid_design([(LLAMA, (), (8,))], [16], [16]), "needs finite rates"),
    (lambda: grid_design([(LLAMA, (0.0,), (8,))], [16], [16]), "some traffic"),
    (lambda: grid_design([(LLAMA, (0.1,), ())], [16], [16]), "ranks"),
    (lambda: grid_design([(LLAMA, (0.1,), (8, 32))], [16], [16], max_lora_rank=16), "above --max-lora-rank"),
    (lambda: grid_design([(LLAMA, (0.1,), (8,))], [], [16]), "empty grid"),
    (lambda: grid_design([(LLAMA, (0.1,), (8,))], [8], [16]), "empty grid"),
    (lambda: grid_design([], [8], [8]), "no workload"),
    (lambda: check_design(grid_design([(LLAMA, (0.1,), (64,))], [8], [8])), "largest rank"),
    (lambda: check_design(grid_design([("no-such-model", (0.1,), (8,))], [8], [8])), "unknown model"),
    (lambda: SweepTask.from_dict({"model": LLAMA}), "not a sweep task"),
    (lambda: random_design(0, [LLAMA]), "positive number"),
])
def test_invalid_designs_get_clear_errors(call, match):
    with pytest.raises(ConfigError, match=match):
        call()


def test_a_row_is_the_runs_summary_plus_features():
    task = SweepTask(QWEN, (0.4, 0.2), (8, 16), served=8, max_loras=4, max_lora_rank=16, duration=120.0, seed=2)
    row = run_task(task)
    assert set(row) == set(ROW_FIELDS) and row["error"] == ""
    want = run_scenario(QWEN, (0.4, 0.2), (8, 16), 8, 4, 16, 120.0, 2, window_s=60.0).summary()
    for k in ("total_throughput", "ideal_total_throughput", "starved", "arrivals", "finished", "mean_itl_ms"):
        assert row[k] == want[k], k
    assert row["served_adapters"] == 8 and row["rates"] == "0.4;0.2" and row["ranks"] == "8;16"
    assert row["offered_rps"] == pytest.approx(4 * 0.4 + 4 * 0.2)
    # a configuration vLLM cannot start is a row with the reason, not a crash
    bad = run_task(SweepTask(LLAMA, (0.1,), (32,), served=128, max_loras=128, max_lora_rank=32, duration=60.0))
    assert "vLLM" in bad["error"] and bad["total_throughput"] is None


def test_local_sweep_is_resumable_and_never_duplicates(tmp_path):
    tasks = grid_design([(QWEN, (0.4, 0.2), (8, 16))], served=[4, 8, 16], max_loras=[4, 8], duration=60.0)
    ds = SweepDataset(tmp_path / "ds")
    first = run_local(tasks[:3], ds, jobs=1)
    assert first == {"planned": 3, "skipped": 0, "run": 3, "errors": 0}
    second = run_local(tasks + tasks[:2], ds, jobs=2, flush_every=2)  # duplicates in the design count once
    assert second["planned"] == len(tasks) and second["skipped"] == 3 and second["run"] == len(tasks) - 3
    table = ds.read()
    assert sorted(table.column("task_id").to_pylist()) == sorted(t.task_id for t in tasks)
    assert run_local(tasks, ds)["run"] == 0
    # a crash between two part files leaves whole files only; a stray temp file is ignored
    (ds.path / ".part-x.parquet.tmp").write_bytes(b"half a file")
    assert ds.read().num_rows == len(tasks)
    assert pq.read_table(ds.parts()[0]).schema.names == list(ROW_FIELDS)


def _cli(argv):
    parser = argparse.ArgumentParser()
    register_sweep(parser.add_subparsers())
    args = parser.parse_args(["sweep"] + argv)
    return args.func(args)


def test_cli_grid_json_and_resume(tmp_path, capsys):
    argv = ["--out", str(tmp_path / "ds"), "--model", QWEN, "--rates", "0.4,0.2", "--rates", "0.1", "--ranks", "8,16",
            "--served", "4,8", "--max-loras", "4", "--duration", "60", "--jobs", "2", "--json", "--no-progress"]
    assert _cli(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["planned"] == 4 and out["run"] == 4 and out["rows"] == 4
    assert _cli(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["run"] == 0 and out["skipped"] == 4 and out["rows"] == 4


@pytest.mark.parametrize("argv,match", [
    (["--ranks", "8"], "no workload"),
    (["--rates", "0.1"], "no ranks"),
    (["--rates", "0.1", "--rates", "0.2", "--rates", "0.3", "--ranks", "8", "--ranks", "16"], "one per --rates"),
    (["--rates", "0.1", "--ranks", "64"], "largest rank"),
    (["--rates", "0.1", "--ranks", "8", "--served", "8", "--max-loras", "16"], "empty grid"),
    (["--rates", "0", "--ranks", "8"], "some traffic"),
    (["--random", "3", "--rates", "0.1"], "not both"),
    (["--rates", "0.1", "--ranks", "8", "--jobs", "0"], "--jobs"),
])
def test_cli_errors(tmp_path, argv, match):
    with pytest.raises(UserError, match=match):
        _cli(["--out", str(tmp_path / "ds"), "--duration", "60"] + argv)
