"""The replay driver with the twin backend, in memory (no broker): accounting, refusals, ordering, backlog."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest

from adaptwin import schemas
from adaptwin.cliutil import UserError
from adaptwin.replay.backends.twin import TwinBackend, adapter_index
from adaptwin.replay.engine import Replay, ReplayOptions, infer_ranks
from adaptwin.replay.source import RecordSource
from adaptwin.replay.telemetry import Checkpoint, MemoryEmitter
from adaptwin.twin import ServerConfig, paper_workload, simulate
from adaptwin.twin.lengths import load_lengths

MODEL = "llama-3.1-8b-instruct"


def _records(arrivals, ranks, run_id="w") -> list[dict]:
    return [{"v": 1, "request_id": f"{run_id}-{i}", "run_id": run_id, "ts": t, "adapter_id": f"lora-{a}",
             "adapter_rank": int(ranks[a]), "prompt_tokens": p, "output_tokens": o, "source": f"test:{i}"}
            for i, (t, a, p, o) in enumerate(zip(arrivals.time.tolist(), arrivals.adapter.tolist(),
                                                  arrivals.prompt.tolist(), arrivals.output.tolist()))]


def _partitioned(records, partitions=4, per_batch=50):
    """Records as Kafka would deliver them: per-adapter partitions, batches interleaved round-robin."""
    parts = [[r for r in records if adapter_index(r["adapter_id"]) % partitions == p] for p in range(partitions)]
    chunks = [[(p, part[i:i + per_batch]) for i in range(0, len(part), per_batch)] for p, part in enumerate(parts)]
    out = []
    while any(chunks):
        for c in chunks:
            if c:
                out.append(c.pop(0))
    return out


def _replay(records, served, max_loras, duration=None, **kw):
    opts = ReplayOptions(run_id="test", served=served, max_loras=max_loras, model=MODEL, duration_s=duration,
                         **{k: v for k, v in kw.items() if k in ReplayOptions.__dataclass_fields__})
    source = RecordSource(_partitioned(records, per_batch=kw.get("per_batch", 50)), lateness_s=kw.get("lateness", 2.0))
    emitter = MemoryEmitter()
    summary = Replay(opts, source, TwinBackend(window_s=opts.window_s), emitter).run()
    return summary, emitter


@pytest.fixture(scope="module")
def lengths():
    return load_lengths(MODEL)


@pytest.mark.parametrize("served,max_loras,rates,duration,starved", [
    (16, 4, [0.4, 0.2, 0.1], 600.0, 0), (8, 8, [0.05, 0.025], 600.0, 0), (16, 2, [0.8, 0.4], 300.0, 1)])
def test_run_record_reproduces_the_twin_summary(lengths, served, max_loras, rates, duration, starved):
    arrivals, ranks = paper_workload(rates, [8, 16], served, duration, seed=3, lengths=lengths)
    expected = simulate(ServerConfig(model=MODEL, served=served, max_loras=max_loras, adapter_ranks=ranks),
                        arrivals, duration).summary()
    summary, em = _replay(_records(arrivals, ranks), served, max_loras, duration=duration, ranks=ranks)
    assert summary["rank_mismatch"] == 0
    for key in ("total_throughput", "ideal_total_throughput", "starved", "arrivals", "finished", "mean_ttft_ms",
                "mean_itl_ms", "adapter_loads"):
        assert summary[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-3), key
    run = [w for w in em.windows if w["scope"] == "run"]
    assert len(run) == 1 and run[0]["throughput"] == pytest.approx(expected["total_throughput"], rel=1e-6)
    assert run[0]["starved"] == expected["starved"] == starved


def test_records_match_their_schemas_and_windows_add_up(lengths):
    arrivals, ranks = paper_workload([0.5, 0.2], [8, 16, 32], 12, 300.0, seed=1, lengths=lengths)
    summary, em = _replay(_records(arrivals, ranks), 12, 3, duration=300.0, window_s=60.0)
    schemas.to_table(em.telemetry, schemas.TELEMETRY)  # raises if a field does not fit
    schemas.to_table(em.windows, schemas.WINDOW)
    for r in em.telemetry[:50] + em.windows:
        schemas.check(r, schemas.TELEMETRY if "request_id" in r else schemas.WINDOW)
        assert set(r) == set((schemas.TELEMETRY if "request_id" in r else schemas.WINDOW).names)
    assert sorted(r["request_id"] for r in em.telemetry) == sorted(f"w-{i}" for i in range(len(arrivals)))
    wins = [w for w in em.windows if w["scope"] == "window"]
    run = next(w for w in em.windows if w["scope"] == "run")
    assert [(w["window_start"], w["window_end"]) for w in wins] == [(60.0 * i, 60.0 * (i + 1)) for i in range(5)]
    assert sum(w["offered_tokens"] for w in wins) == run["offered_tokens"]
    assert sum(w["completed_tokens"] for w in wins) == run["completed_tokens"]
    assert sum(w["arrivals"] for w in wins) == run["arrivals"] == len(arrivals)
    for w in wins + [run]:
        assert w["throughput"] == pytest.approx(w["completed_tokens"] / (w["window_end"] - w["window_start"]))
        ratio = 1 - w["completed_tokens"] / w["offered_tokens"] if w["offered_tokens"] else 0.0
        assert w["starvation_ratio"] == pytest.approx(ratio) and w["starved"] == int(ratio >= 0.1)
        assert sum(a["offered_tokens"] for a in w["adapters"]) == w["offered_tokens"]
        assert sum(a["completed_tokens"] for a in w["adapters"]) == w["completed_tokens"]
        assert 0.0 <= w["kv_usage"] <= 1.0 and w["running"] >= 0 and w["waiting"] >= 0
    # offered in the arrival window, completed in the finish window (checked against telemetry)
    fin = [t for t in em.telemetry if t["finished"]]
    by_finish = np.bincount([int((t["ts"] + t["e2e_ms"] / 1000) // 60) for t in fin],
                            weights=[t["prompt_tokens"] + t["output_tokens"] for t in fin], minlength=5)
    assert [w["completed_tokens"] for w in wins] == by_finish[:5].astype(int).tolist()
    assert sum(w["adapter_loads"] for w in wins) == run["adapter_loads"] == summary["adapter_loads"]


def test_unserved_adapters_are_offered_but_refused(lengths):
    arrivals, ranks = paper_workload([0.2], [8], 6, 120.0, seed=2, lengths=lengths)
    records = _records(arrivals, ranks)
    records[3]["adapter_id"] = "client-a"  # not a lora-k name
    summary, em = _replay(records, 4, 2, duration=120.0)
    unserved = [r for r in records if adapter_index(r["adapter_id"]) not in range(4)]
    assert summary["refused"] == len(unserved) > 0
    refused = [t for t in em.telemetry if t["error"]]
    assert {t["request_id"] for t in refused} == {r["request_id"] for r in unserved}
    assert all(not t["finished"] and t["ttft_ms"] is None for t in refused)
    assert len(em.dead) == len(unserved) and all(d["stage"] == "replay" and d["run_id"] == "test" for d in em.dead)
    run = next(w for w in em.windows if w["scope"] == "run")
    off = {a["adapter_id"]: a for a in run["adapters"]}
    assert off["lora-5"]["completed_tokens"] == 0 and off["lora-5"]["starvation_ratio"] == 1.0
    assert run["offered_tokens"] == sum(r["prompt_tokens"] + r["output_tokens"] for r in records)
    assert len(em.telemetry) == len(records)


def test_out_of_order_delivery_within_lateness_gives_identical_records(lengths):
    arrivals, ranks = paper_workload([0.3, 0.1], [8, 16], 8, 180.0, seed=4, lengths=lengths)
    records = _records(arrivals, ranks)
    _, ordered = _replay(records, 8, 4, duration=180.0)
    rng = random.Random(0)
    jittered = sorted(records, key=lambda r: r["ts"] + rng.uniform(0, 1.0))  # ≤ 1 s out of order, lateness 2 s
    summary, shuffled = _replay(jittered, 8, 4, duration=180.0, per_batch=7)
    assert summary["late"] == 0
    key = lambda r: r["request_id"]  # noqa: E731
    assert sorted(shuffled.telemetry, key=key) == sorted(ordered.telemetry, key=key)
    assert shuffled.windows == ordered.windows


def test_late_requests_are_replayed_not_dropped(lengths):
    arrivals, ranks = paper_workload([0.3], [8], 4, 120.0, seed=5, lengths=lengths)
    records = _records(arrivals, ranks)
    records.append(dict(records[0], request_id="straggler", ts=1.0, adapter_id="lora-0"))  # after ts ~120 in lora-0
    summary, em = _replay(records, 4, 4, duration=120.0, lateness=0.0, discover_s=0.0, per_batch=5)
    assert summary["late"] >= 1
    assert any(t["request_id"] == "straggler" for t in em.telemetry)
    assert len(em.telemetry) == len(records)


def test_in_flight_bound_holds_requests_in_the_client_and_reports_them(lengths):
    arrivals, ranks = paper_workload([2.0], [8], 4, 60.0, seed=6, lengths=lengths)
    records = _records(arrivals, ranks)
    summary, em = _replay(records, 4, 1, duration=60.0, max_backlog=20)
    assert summary["held_max"] > 0
    assert len(em.telemetry) == len({t["request_id"] for t in em.telemetry}) == len(records)
    held_at_end = [t for t in em.telemetry if t["error"] and "held" in t["error"]]
    assert summary["finished"] + len(held_at_end) <= len(records)
    assert em.windows[0]["waiting"] > 0  # the backlog shows up


def test_restart_skips_what_was_committed(lengths):
    arrivals, ranks = paper_workload([0.3], [8], 4, 240.0, seed=7, lengths=lengths)
    records = _records(arrivals, ranks)

    class Slow(MemoryEmitter):  # commit after every tick
        pass

    opts = ReplayOptions(run_id="test", served=4, max_loras=2, model=MODEL, duration_s=240.0, commit_interval_s=0.0)
    first = Slow()
    Replay(opts, RecordSource(_partitioned(records)), TwinBackend(), first).run()
    cp = first.checkpoints[100]  # as if killed after the 101st commit
    second = MemoryEmitter()
    summary = Replay(opts, RecordSource(_partitioned(records)), TwinBackend(), second, checkpoint=cp).run()
    assert summary["resumed_after_tick"] == cp.tick
    assert first.telemetry[:cp.telemetry] + second.telemetry == first.telemetry
    assert first.windows[:cp.windows] + second.windows == first.windows
    done = Replay(opts, RecordSource(_partitioned(records)), TwinBackend(), MemoryEmitter(),
                  checkpoint=first.checkpoints[-1]).run()
    assert done["resumed"] == "already complete"


def test_restart_with_changed_input_refuses_to_continue(lengths):
    arrivals, ranks = paper_workload([0.3], [8], 4, 120.0, seed=8, lengths=lengths)
    records = _records(arrivals, ranks)
    opts = ReplayOptions(run_id="test", served=4, max_loras=2, model=MODEL, duration_s=120.0)
    cp = Checkpoint(tick=60, telemetry=1, windows=0, dead=0)
    with pytest.raises(UserError, match="did not re-create"):
        Replay(opts, RecordSource(_partitioned(records)), TwinBackend(), MemoryEmitter(), checkpoint=cp).run()


def test_infer_ranks_follows_the_round_robin_pattern():
    assert infer_ranks(6, np.array([0, 1, 2, 4]), np.array([8, 16, 8, 8])) == (8, 16, 8, 16, 8, 16)
    assert infer_ranks(3, np.array([], dtype=np.int64), np.array([], dtype=np.int64)) == (8, 8, 8)
    assert infer_ranks(4, np.array([0, 1, 9]), np.array([32, 8, 64])) == (32, 8, 32, 8)


def test_pace_slows_the_twin_to_the_wall_clock_without_changing_results(lengths):
    arrivals, ranks = paper_workload([0.3], [8], 4, 240.0, seed=9, lengths=lengths)
    records = _records(arrivals, ranks)
    fast, fast_em = _replay(records, 4, 2, duration=240.0)
    paced, paced_em = _replay(records, 4, 2, duration=240.0, pace=200.0)  # 240 trace s: at least 1.2 wall s
    assert paced["wall_s"] >= 240.0 / 200.0 - 0.01 > fast["wall_s"]
    assert paced_em.telemetry == fast_em.telemetry and paced_em.windows == fast_em.windows
    # a restarted replay re-creates the committed ticks at full speed and paces only the rest
    opts = ReplayOptions(run_id="test", served=4, max_loras=2, model=MODEL, duration_s=240.0, commit_interval_s=0.0)
    first = MemoryEmitter()
    Replay(opts, RecordSource(_partitioned(records)), TwinBackend(), first).run()
    cp = first.checkpoints[199]
    restarted = Replay(dataclasses.replace(opts, pace=200.0), RecordSource(_partitioned(records)), TwinBackend(),
                       MemoryEmitter(), checkpoint=cp)
    restarted.run()
    assert restarted._pace_origin[1] == (cp.tick + 1) * opts.tick_s
    with pytest.raises(UserError, match="speedup"):
        ReplayOptions(run_id="test", served=4, max_loras=2, pace=0.0)
