"""The streaming learner (`adaptwin learn`): drift, a traffic shift the recommendation follows, dead letters, the lake,
and exactly-once across SIGKILL — on real replay windows and a real Kafka broker."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from kafka import TopicPartition

from adaptwin import schemas
from adaptwin.cliutil import UserError
from adaptwin.config import TOPICS
from adaptwin.kafka import make_consumer, make_producer

sys.path.insert(0, str(Path(__file__).parent))
from streamdata import MODEL, WARM_FILE, replay_windows, shift_trace  # noqa: E402

from adaptwin.learner.checkpoint import read_meta  # noqa: E402
from adaptwin.learner.consumer import LearnerConfig, run  # noqa: E402
from adaptwin.learner.policy import PolicyConfig, twin_what_if  # noqa: E402
from adaptwin.learner.stream import StreamConfig, StreamLearner  # noqa: E402

ADAPTWIN = [sys.executable, "-m", "adaptwin"]
SHIFT_S = 900.0


@pytest.fixture(scope="module")
def shift_windows(tmp_path_factory) -> list[dict]:
    """A real twin replay (served 32, max_loras 16) of 30 min whose traffic shifts at 15 min."""
    trace = shift_trace(tmp_path_factory.mktemp("trace") / "shift.csv", rate=0.09, shift_s=SHIFT_S)
    return replay_windows(trace, 32, 16, run_id=f"shift-{uuid.uuid4().hex[:6]}")


@pytest.fixture(scope="module")
def warm_csv(tmp_path_factory) -> Path:
    """2,000 rows sampled (seed 0) from the paper-twin sweep (ml_train_sim.csv.gz), as a small plain CSV."""
    import random

    out = tmp_path_factory.mktemp("warm") / "warm.csv"
    with gzip.open(WARM_FILE, "rt") as src:
        header, *rows = src.readlines()
    out.write_text(header + "".join(random.Random(0).sample(rows, 2000)))
    return out


def _window(k: int, run_id: str, factor: float = 1.0, served: int = 32, max_loras: int = 16) -> dict:
    offered = 60 * 1500
    adapters = [{"adapter_id": f"lora-{a}", "offered_tokens": offered // served, "completed_tokens": 0,
                 "starvation_ratio": 0.0} for a in range(served)]
    done = int(offered * 0.99 * factor)
    return {"v": 1, "run_id": run_id, "backend": "twin", "scope": "window", "window_start": 60.0 * k,
            "window_end": 60.0 * (k + 1), "served": served, "max_loras": max_loras, "max_lora_rank": 16,
            "arrivals": 200, "finished": 198, "offered_tokens": offered, "completed_tokens": done,
            "throughput": done / 60, "starvation_ratio": 1 - done / offered, "starved": int(done <= 0.9 * offered),
            "running": 10.0, "waiting": 0.0, "kv_usage": 0.2, "adapter_loads": 0, "mean_ttft_ms": 50.0,
            "mean_itl_ms": 20.0, "adapters": adapters}


# ------------------------------------------------------------------------------------------------------------------
def test_drift_is_detected_and_published_when_the_server_slows_down():
    """Same workload and configuration, then the server completes 40 % less: a drift record within 4 windows."""
    sl = StreamLearner(StreamConfig(models=("linear", "hoeffding"), policy=PolicyConfig(grid=(8, 16, 32, 64))))
    kinds = []
    for k in range(25):
        kinds.append([r["kind"] for r in sl.process(_window(k, "drift", factor=1.0 if k < 15 else 0.6))])
    assert all("drift" not in ks for ks in kinds[:15]), kinds[:15]
    first = next(i for i, ks in enumerate(kinds) if "drift" in ks)
    assert 15 <= first <= 18, kinds
    assert sl.drifts >= 1 and sl.model.version >= 2
    assert all(ks.count("recommendation") == 1 for ks in kinds)  # one recommendation per window, drift or not


def test_recommendation_follows_a_traffic_shift(shift_windows, warm_csv):
    """Rates ×2, new adapters and reversed skew at 15 min: the recommended served count drops within 2 windows and
    stays, and the twin agrees that the new recommendation does not starve while the old one does."""
    from adaptwin.learner.dataset import read_runs
    from adaptwin.learner.online import warm_runs
    from adaptwin.learner.workload import Workload

    sl = StreamLearner(StreamConfig(ranks=(8, 16)))
    sl.warm(warm_runs(read_runs(str(warm_csv)), MODEL, 2000), "ml")
    sl.twin_warm_pending = 10.0
    ask = lambda wl, s, m, d: twin_what_if(wl, s, m, d)  # noqa: E731
    recs = [r for w in shift_windows for r in sl.process(w, ask) if r["kind"] == "recommendation"]
    assert len(recs) == sum(w["scope"] == "window" for w in shift_windows)
    before = [(r["served"], r["max_loras"]) for r in recs if r["window_end"] <= SHIFT_S]
    after = [(r["served"], r["max_loras"]) for r in recs if r["window_end"] > SHIFT_S]
    old = before[-1]
    assert len(set(before[-5:])) == 1, before  # settled before the shift
    settled = after[1:]  # the window holding the shift, plus one more
    assert all(c[0] < old[0] for c in settled), (old, after)
    assert len(set(settled)) <= 2, after
    # ground truth from the twin, on the traffic of the last three windows
    wl = Workload.from_windows([w for w in shift_windows if w["scope"] == "window"][-3:], MODEL, (8, 16))
    assert twin_what_if(wl, *after[-1], 300.0)[1] == 0
    assert twin_what_if(wl, *old, 300.0)[1] == 1


# ------------------------------------------------------------------------------------------------------------------
def _produce(bootstrap: str, topic: str, values: list[bytes], key: bytes = b"run") -> None:
    producer = make_producer(bootstrap)
    for v in values:
        producer.send(topic, key=key, value=v)
    producer.flush()
    producer.close()


def _read_all(bootstrap: str, topic: str) -> list[dict]:
    consumer = make_consumer(bootstrap, None, isolation_level="read_committed")
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    end = consumer.end_offsets([tp])[tp]
    out = []
    deadline = time.monotonic() + 30
    while consumer.position(tp) < end and time.monotonic() < deadline:
        for msgs in consumer.poll(timeout_ms=500).values():
            for m in msgs:
                out += [json.loads(line) for line in m.value.splitlines() if line.strip()]
    consumer.close()
    return out


def test_malformed_windows_go_to_the_deadletter_topic_and_recommendations_reach_the_lake(bootstrap, make_topic,
                                                                                           tmp_path):
    from adaptwin.ingest import catalog
    from adaptwin.ingest.sink import LakeSink, SinkConfig

    run_id = f"dl-{uuid.uuid4().hex[:8]}"
    windows = make_topic(prefix="win")
    good = [_window(k, run_id) for k in range(4)]
    bad_end = dict(_window(9, run_id), window_end=0.0)
    values = [schemas.encode([good[0]]), b"{not json", schemas.encode([good[1]]),
              json.dumps(dict(good[2], v=7)).encode(), json.dumps({k: v for k, v in good[2].items()
                                                                    if k != "served"}).encode(),
              schemas.encode([bad_end]), schemas.encode([good[2], good[3]])]
    _produce(bootstrap, windows, values)
    summary = run(LearnerConfig(bootstrap, tmp_path / "ckpt", group=f"g-{run_id}", windows_topic=windows,
                                stream=StreamConfig(models=("linear",), policy=PolicyConfig(grid=(8, 16, 32))),
                                idle_exit_s=2.0, ask_twin=False, progress=False))
    assert summary["windows_learned"] == 4 and summary["dead_letters"] == 4 and summary["published"] == 4
    # the group's committed offsets belong to that configuration: a learner with other options is refused
    with pytest.raises(UserError, match="other options"):
        run(LearnerConfig(bootstrap, tmp_path / "ckpt2", group=f"g-{run_id}", windows_topic=windows,
                          stream=StreamConfig(models=("hoeffding",)), idle_exit_s=1.0, ask_twin=False,
                          progress=False))
    LakeSink(SinkConfig(bootstrap, tmp_path / "lake", topics=(TOPICS.recommendations, TOPICS.deadletter),
                        group_id=f"sink-{run_id}", idle_exit_s=1.5, max_age_s=0.3)).run()
    lake = tmp_path / "lake"
    recs = catalog.query(lake, f"select window_end, served, max_loras, model from recommendations "
                               f"where run_id = '{run_id}' and kind = 'recommendation' order by window_end").to_pylist()
    assert [r["window_end"] for r in recs] == [60.0, 120.0, 180.0, 240.0]
    assert all(r["served"] in (8, 16, 32) and r["model"] == "linear" for r in recs)
    dead = catalog.query(lake, "select run_id, reason from deadletter where stage = 'learner' and source like "
                               f"'{windows}%' order by line").to_pylist()
    reasons = " | ".join(d["reason"] for d in dead)
    assert len(dead) == 4, dead
    assert "not valid JSON" in reasons and "v=7" in reasons and "'served' is missing" in reasons
    assert "window_end" in reasons
    assert sum(d["run_id"] == run_id for d in dead) == 3  # the unparsable one is filed under "learner"


def test_a_checkpoint_of_an_older_learner_is_refused_with_what_to_do(bootstrap, make_topic, tmp_path):
    from adaptwin.learner import checkpoint

    old = StreamLearner(StreamConfig(models=("linear",)))
    del old.state_format  # what a learner before the verdict book wrote
    checkpoint.save(tmp_path / "ckpt", old, {"offsets": {}})
    windows = make_topic(prefix="win")
    _produce(bootstrap, windows, [schemas.encode([_window(0, "old")])])
    with pytest.raises(UserError, match="older adaptwin learner.*another --checkpoint"):
        run(LearnerConfig(bootstrap, tmp_path / "ckpt", group=f"g-old-{uuid.uuid4().hex[:6]}", windows_topic=windows,
                          stream=StreamConfig(models=("linear",)), idle_exit_s=1.0, ask_twin=False, progress=False))


# ------------------------------------------------------------------------------------------------------------------
def _learn_cmd(bootstrap: str, windows: str, recs: str, group: str, ckpt: Path, warm: Path, run_in: str,
               *extra: str) -> list[str]:
    return ADAPTWIN + ["learn", "--bootstrap", bootstrap, "--windows-topic", windows, "--recommendations-topic", recs,
                       "--group", group, "--checkpoint", str(ckpt), "--warm-start", str(warm), "--warm-rows", "500",
                       "--run-id-in", run_in, "--until-run-end", "--idle-exit", "60", "--no-twin", "--ranks", "8,16",
                       "--grid", "16,32,64,128,256", "--no-progress", "--json", *extra]


def _committed(bootstrap: str, group: str, topic: str) -> int:
    consumer = make_consumer(bootstrap, group)
    try:
        om = consumer.committed(TopicPartition(topic, 0))
        return om if isinstance(om, int) else (om.offset if om is not None else -1)
    finally:
        consumer.close(autocommit=False)


def test_sigkill_mid_stream_then_resume_publishes_every_recommendation_once(bootstrap, make_topic, tmp_path,
                                                                             shift_windows, warm_csv):
    """A learner SIGKILLed mid-stream and restarted publishes exactly the records of a learner never killed: one per
    window, none twice, none missing, with the same content (the checkpoint restores the models exactly)."""
    windows, ref_topic, kill_topic = make_topic(prefix="win"), make_topic(prefix="rec"), make_topic(prefix="rec")
    wins = [w for w in shift_windows if w["scope"] == "window"]
    values = [schemas.encode([w]) for w in shift_windows]
    _produce(bootstrap, windows, values[:18])
    # the learner that is killed: checkpoints every 4 windows, the stream still flowing
    g = f"kill-{uuid.uuid4().hex[:6]}"
    run_in = shift_windows[0]["run_id"]
    cmd = _learn_cmd(bootstrap, windows, kill_topic, g, tmp_path / "ck-kill", warm_csv, run_in, "--checkpoint-every",
                     "4")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while _committed(bootstrap, g, windows) < 7 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    time.sleep(1.0)  # a commit the learner sent just before dying completes at the coordinator
    at_kill = _committed(bootstrap, g, windows)
    assert 7 <= at_kill < len(values)
    meta = read_meta(tmp_path / "ck-kill") or {"offsets": {"0": 0}, "windows_learned": 0}
    ckpt_offset = int(meta["offsets"]["0"])
    assert ckpt_offset <= at_kill and meta["windows_learned"] == ckpt_offset  # never ahead of the commit
    _produce(bootstrap, windows, values[18:])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = json.loads(out.stdout.strip().splitlines()[-1])
    assert resumed["windows_learned"] == len(wins)  # counted over the restart: nothing skipped, nothing twice
    # the windows between the checkpoint and the commit were re-learned by the restored model, not re-published
    assert resumed["relearned_without_publishing"] == at_kill - ckpt_offset
    assert resumed["published"] == len(wins) - (at_kill - ckpt_offset) - ckpt_offset
    # the reference learner, never killed
    ref = subprocess.run(_learn_cmd(bootstrap, windows, ref_topic, f"ref-{g}", tmp_path / "ck-ref", warm_csv, run_in),
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    got, want = _read_all(bootstrap, kill_topic), _read_all(bootstrap, ref_topic)
    rec_ends = [r["window_end"] for r in got if r["kind"] == "recommendation"]
    assert rec_ends == [w["window_end"] for w in wins]  # no gap, no duplicate, in order
    strip = lambda rs: [{k: (round(v, 6) if isinstance(v, float) else v) for k, v in r.items()} for r in rs]  # noqa
    assert strip(got) == strip(want)


# ------------------------------------------------------------------------------------------------------------------
def test_demo_like_stream_first_recommendation_is_twin_confirmed_and_stable(bootstrap, make_topic, tmp_path):
    """What `adaptwin demo` does, smaller: a real twin replay (32 adapters, served 32 / max_loras 16, steady traffic)
    through Kafka into the learner with `--warm-start twin`. The first recommendation is one the twin confirms does
    not starve on the run's traffic, and without drift in the traffic the recommendation changes at most twice."""
    from adaptwin.learner.workload import Workload

    trace = shift_trace(tmp_path / "steady.csv", duration_s=900.0, shift_s=900.0, adapters=32, new_adapters=0,
                        rate=0.12, seed=3)
    run_id = f"steady-{uuid.uuid4().hex[:6]}"
    stream = replay_windows(trace, 32, 16, run_id=run_id)
    windows, recs_topic = make_topic(prefix="win"), make_topic(prefix="rec")
    _produce(bootstrap, windows, [schemas.encode([w]) for w in stream])
    summary = run(LearnerConfig(bootstrap, tmp_path / "ckpt", group=f"g-{run_id}", windows_topic=windows,
                                recommendations_topic=recs_topic,
                                stream=StreamConfig(ranks=(8, 16), run_id=run_id,
                                                    policy=PolicyConfig(explore_budget_s=30.0)),
                                until_run_end=True, idle_exit_s=30.0, warm_start=("twin",), twin_budget_s=30.0,
                                progress=False))
    wins = [w for w in stream if w["scope"] == "window"]
    recs = [r for r in _read_all(bootstrap, recs_topic) if r["kind"] == "recommendation"]
    assert summary["windows_learned"] == len(wins) and len(recs) == len(wins)
    assert all(r["asked_twin"] is not None for r in recs)
    first = (recs[0]["served"], recs[0]["max_loras"])
    assert recs[0]["reason"].startswith("first recommendation"), recs[0]["reason"]
    changes = [r for r in recs[1:] if r["changed"]]
    assert len(changes) <= 2, [(r["window_end"], r["served"], r["max_loras"], r["reason"]) for r in changes]
    assert all("starves" not in r["reason"].split(";")[0] or "twin found" in r["reason"] for r in changes)
    # ground truth: the twin on the traffic of the whole run (what-if 600 s)
    wl = Workload.from_windows(wins, MODEL, (8, 16))
    for cfg in {first, (recs[-1]["served"], recs[-1]["max_loras"])}:
        answer = twin_what_if(wl, *cfg, 600.0)
        assert answer is not None and answer[1] == 0, (cfg, answer)


class _Predictor:
    """A model whose predictions are a fixed table (served, max_loras) -> (throughput, starvation probability): the
    policy's rules are checked on their own, whatever a river model would have learned."""

    n_learned = 100  # past the policy's warm-up gate

    def __init__(self, table: dict) -> None:
        self.table = table
        self.warmed: list = []

    def predict(self, x: dict):
        from adaptwin.learner.online import StreamPrediction

        thr, p = self.table.get((int(x["served"]), int(x["max_loras"])), (1.0, 1.0))
        return StreamPrediction(thr, 0.97 * thr, 1.03 * thr, thr, 0.0, p)

    def warm(self, runs) -> int:
        self.warmed += list(runs)
        return len(runs)


def _workload():
    from adaptwin.learner.workload import Workload

    return Workload(MODEL, (0.1,) * 16, (8, 16), 16, 60.0)


def test_policy_hysteresis_and_the_cost_of_a_restart():
    from adaptwin.learner.policy import Policy

    pol = Policy(PolicyConfig(grid=(16, 32, 64), served_margin=0.02, restart_margin=0.05, twin_per_window=0))
    m = _Predictor({(32, 16): (1000.0, 0.0), (16, 16): (500.0, 0.0)})
    d = pol.decide(m, _workload())
    assert (d.served, d.max_loras, d.changed, d.reason) == (32, 16, True, "first recommendation")
    # +3 % by changing max_loras (a vLLM restart): under the 5 % margin, kept
    m.table[(32, 32)] = (1030.0, 0.0)
    d = pol.decide(m, _workload())
    assert (d.served, d.max_loras, d.changed) == (32, 16, False) and "restart" in d.reason
    # +3 % by changing only the served set (runtime): over the 2 % margin, changed
    m.table[(64, 16)] = (1030.0, 0.0)
    m.table[(32, 32)] = (1000.0, 0.0)
    d = pol.decide(m, _workload())
    assert (d.served, d.max_loras, d.changed) == (64, 16, True) and "served-set" in d.reason
    # the current one is now predicted to starve: change even for less throughput
    m.table[(64, 16)] = (1030.0, 0.9)
    d = pol.decide(m, _workload())
    assert (d.served, d.max_loras, d.changed) == (32, 16, True) and "predicted to starve" in d.reason


def test_policy_asks_the_twin_when_unsure_and_learns_its_answer():
    from adaptwin.learner.policy import Policy

    asked = []

    def twin(workload, served, max_loras, duration):
        asked.append((served, max_loras))
        return (900.0, 1) if (served, max_loras) == (64, 64) else (1190.0, 0)

    pol = Policy(PolicyConfig(grid=(16, 32, 64), twin_per_window=2, explore_budget_s=0))  # per-window questions only
    # (64, 64) looks best but is uncertain (p = 0.4): the twin says it starves; (64, 32) is uncertain too, the twin
    # says it does not starve, so it is taken although the model alone (p = 0.3 > 0.2) would have refused it
    m = _Predictor({(64, 64): (1300.0, 0.4), (64, 32): (1200.0, 0.3), (32, 32): (800.0, 0.0)})
    d = pol.decide(m, _workload(), ask_twin=twin)
    assert asked == [(64, 64), (64, 32)]
    assert (d.served, d.max_loras, d.asked_twin) == (64, 32, True)
    assert "twin on (64, 64): starves" in d.reason and "twin on (64, 32): 1,190 tok/s" in d.reason
    assert [(r.scenario.served, r.throughput, r.starved) for r in m.warmed] == [(64, 900.0, 1), (64, 1190.0, 0)]
    # the same traffic again: answers come from the cache, the twin is not run again
    pol.decide(m, _workload(), ask_twin=twin)
    assert len(asked) == 2


def test_policy_fairness_limit_moves_to_a_lighter_configuration():
    from adaptwin.learner.policy import Policy

    pol = Policy(PolicyConfig(grid=(16, 32, 64), twin_per_window=0, max_adapter_starvation=0.1))
    m = _Predictor({(64, 16): (1300.0, 0.0), (32, 16): (1000.0, 0.0), (64, 64): (1250.0, 0.0)})
    assert (pol.decide(m, _workload()).served, pol.current) == (64, (64, 16))
    win = _window(0, "fair", served=64, max_loras=16)
    assert pol.decide(m, _workload(), win).changed is False  # every adapter served: the limit holds
    win["adapters"][5]["starvation_ratio"] = 0.35  # lora-5 starved 35 % while the total did not
    d = pol.decide(m, _workload(), win)
    assert (d.served, d.max_loras, d.changed) == (64, 64, True)  # 1 adapter per slot instead of 4
    assert "adapter lora-5 starved 35%" in d.reason
