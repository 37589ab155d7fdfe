"""The reliability table: the pipeline under SIGKILLs and broker restarts, counted from the lake.

    python -m benchmarks.reliability [--requests 19000] [--bad-rows 1000] [--kills 8] [--broker-restarts 2]

One scenario (also the fault tests' harness, tests/e2e/test_faults.py): a trace with malformed rows mixed
in is ingested into a private real broker; then the consumers (``CONSUMERS``: replay and lake sink today)
run as processes while, at random moments, one of them is SIGKILLed or the broker is stopped, and every
consumer that dies is restarted (what a supervisor or compose's ``restart: on-failure`` does). At the end
the lake is compared with what was accepted: each accepted request must have exactly one telemetry row,
every window of the run must be present once, and every rejected row must be in the dead-letter table with
its reason. Prints the table as Markdown (for benchmarks/RESULTS.md) and one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ADAPTWIN = [sys.executable, "-m", "adaptwin"]

# Rows no reader can accept, one per failure class the validators know (each must be dead-lettered).
BAD_ROWS = (
    b"not a timestamp,100,20",
    b"2023-11-16 18:17:04.0319600,-5,8",
    b"2023-11-16 18:17:04.0319600,abc,8",
    b"2023-11-16 18:17:04.0319600,100",
    b"2023-11-16 18:17:04.0319600,nan,8",
    b"2023-11-16 18:17:04.0319600,100,1e999",
    b"\xff\xfe\x00garbage,1,2",
    b"2023-13-45 99:99:99,100,20",
)


@dataclass
class Scenario:
    """Where one run lives and its ids; consumers build their command lines from it."""

    bootstrap: str
    lake: Path
    workdir: Path
    ingest_run: str
    replay_run: str
    sink_group: str


@dataclass(frozen=True)
class Consumer:
    """A long-running consumer the fault run kills and restarts.

    ``to_completion``: it exits 0 when its work is done (its last stdout line is its JSON summary);
    otherwise it runs until stopped (SIGTERM) once the lake holds everything.
    """

    name: str
    argv: Callable[[Scenario], list[str]]
    to_completion: bool


def _replay_argv(s: Scenario) -> list[str]:
    # small transactions and flushes: a kill lands inside an open transaction most of the time; paced (a trace
    # hour in 24 s) so that the faults land mid-replay however fast the machine
    return ADAPTWIN + ["replay", "--run-id-in", s.ingest_run, "--run-id", s.replay_run, "--served", "12",
                       "--max-loras", "4", "--bootstrap", s.bootstrap, "--json", "--no-progress",
                       "--commit-interval", "0.3", "--flush-records", "200", "--speedup", "150"]


def _sink_argv(s: Scenario) -> list[str]:
    return ADAPTWIN + ["sink", "--bootstrap", s.bootstrap, "--lake", str(s.lake), "--group", s.sink_group,
                       "--max-age", "0.3"]


def _learner_argv(s: Scenario) -> list[str]:
    # --no-twin: what-if twin runs would make the learner the slowest consumer by far
    return ADAPTWIN + ["learn", "--bootstrap", s.bootstrap, "--run-id-in", s.replay_run, "--checkpoint",
                       str(s.workdir / "learner"), "--until-run-end", "--no-twin", "--json"]


# The consumers under fault injection (the fault tests and the table use these). The streaming learner is
# optional (`--with learner`; checked: one recommendation per window, none twice); the sweep workers have
# their own fault test (tests/e2e/test_sweep_faults.py).
CONSUMERS: list[Consumer] = [
    Consumer("replay", _replay_argv, to_completion=True),
    Consumer("sink", _sink_argv, to_completion=False),
]
OPTIONAL_CONSUMERS: dict[str, Consumer] = {
    "learner": Consumer("learner", _learner_argv, to_completion=True),
}


@dataclass
class Reliability:
    kills: int = 0  # SIGKILLs of consumers during the run
    kills_by_consumer: dict[str, int] = field(default_factory=dict)
    broker_restarts: int = 0
    faults_mid_replay: int = 0  # kills and broker restarts that happened while the replay was still working
    compactions: int = 0  # `lake compact` passes run between the faults (beside the sink)
    files_merged: int = 0
    compaction_skipped: list[str] = field(default_factory=list)  # why a pass could not run (broker down)
    crashes_restarted: int = 0  # consumers that exited non-zero on their own (e.g. broker down) and restarted
    rows_tried: int = 0  # data rows in the trace
    rows_produced: int = 0  # accepted by ingest, published to adaptwin.requests
    requests_in_lake: int = 0
    telemetry_in_lake: int = 0
    lost: int = 0  # accepted requests without a telemetry row
    duplicated: int = 0  # telemetry rows beyond one per request
    windows_expected: int = 0
    windows_in_lake: int = 0
    windows_complete: bool = False
    bad_rows_tried: int = 0
    dead_lettered_by_ingest: int = 0
    dead_letters_in_lake: int = 0
    dead_letters_without_reason: int = 0
    recommendations_expected: int | None = None  # with the learner: one per window of the run
    recommendations_in_lake: int | None = None
    recommendations_distinct: int | None = None  # distinct window_end
    replay_summary: dict = field(default_factory=dict)
    ingest_s: float = 0.0
    faults_s: float = 0.0
    drain_s: float = 0.0
    wall_s: float = 0.0


def write_trace(path: Path, requests: int, bad_rows: int, seed: int) -> int:
    """The first ``requests`` rows of the Azure conversation trace with ``bad_rows`` malformed rows mixed in."""
    from adaptwin.ingest.readers.shipped import shipped_path

    lines = shipped_path("azure-conv").read_bytes().split(b"\n")
    header, good = lines[0], [x for x in lines[1:] if x.strip()][:requests]
    rng = random.Random(seed)
    rows = list(good)
    for i in range(bad_rows):
        rows.insert(rng.randrange(len(rows) + 1), BAD_ROWS[i % len(BAD_ROWS)])
    path.write_bytes(b"\n".join([header, *rows]) + b"\n")
    return len(good)


def ingest(s: Scenario, trace: Path) -> dict:
    out = subprocess.run(ADAPTWIN + ["ingest", "--trace", str(trace), "--format", "azure", "--adapters", "16",
                                     "--ranks", "8,16", "--run-id", s.ingest_run, "--bootstrap", s.bootstrap,
                                     "--json"], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"ingest failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Supervisor:
    """Keeps every consumer running: restarts whatever died unless it finished its work."""

    def __init__(self, scenario: Scenario, consumers: list[Consumer], report: Reliability):
        self.s = scenario
        self.consumers = {c.name: c for c in consumers}
        self.report = report
        self.procs: dict[str, subprocess.Popen] = {}
        self.done: dict[str, dict] = {}
        self.logs = scenario.workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self._killed: set[str] = set()

    def start(self, name: str) -> None:
        c = self.consumers[name]
        stdout = open(self.logs / f"{name}.out", "a")
        stderr = open(self.logs / f"{name}.err", "a")
        self.procs[name] = subprocess.Popen(c.argv(self.s), stdout=stdout, stderr=stderr)
        stdout.close()
        stderr.close()

    def poll(self) -> None:
        for name, proc in list(self.procs.items()):
            rc = proc.poll()
            if rc is None or name in self.done:
                continue
            if rc == 0 and self.consumers[name].to_completion:
                lines = (self.logs / f"{name}.out").read_text().strip().splitlines()
                self.done[name] = json.loads(lines[-1])
                continue
            if name in self._killed:
                self._killed.discard(name)
            else:
                self.report.crashes_restarted += 1
                log.info("%s exited with %s on its own; restarting it", name, rc)
                time.sleep(0.5)  # e.g. broker down: do not spin
            self.start(name)

    def kill(self, name: str) -> bool:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None or name in self.done:
            return False
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self._killed.add(name)
        self.report.kills += 1
        self.report.kills_by_consumer[name] = self.report.kills_by_consumer.get(name, 0) + 1
        return True

    def running(self, name: str) -> bool:
        return name not in self.done

    def stop_all(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def lake_counts(s: Scenario) -> dict:
    from adaptwin.ingest import catalog

    def one(sql: str) -> dict:
        return catalog.query(s.lake, sql).to_pylist()[0]

    tel = one(f"select count(*) n, count(distinct request_id) d from telemetry where run_id = '{s.replay_run}'")
    req = one(f"select count(*) n, count(distinct request_id) d from requests where run_id = '{s.ingest_run}'")
    missing = one(f"select count(*) n from (select distinct request_id from requests where run_id = '{s.ingest_run}'"
                  f" except select request_id from telemetry where run_id = '{s.replay_run}')")
    wins = catalog.query(s.lake, f"select scope, window_start, window_end from windows where run_id = "
                                 f"'{s.replay_run}' order by scope, window_start").to_pylist()
    dead = one(f"select count(*) n, count(*) filter (where reason is null or reason = '') no_reason from deadletter "
               f"where run_id = '{s.ingest_run}'")
    recs = one(f"select count(*) n, count(distinct window_end) d from recommendations where run_id = "
               f"'{s.replay_run}' and kind = 'recommendation'")
    return {"recommendations": recs["n"], "recommendations_distinct": recs["d"],
            "telemetry": tel["n"], "telemetry_distinct": tel["d"], "requests": req["n"],
            "requests_distinct": req["d"], "missing": missing["n"], "windows": wins, "dead": dead["n"],
            "dead_no_reason": dead["no_reason"]}


def windows_complete(windows: list[dict], summary: dict) -> bool:
    per = [(w["window_start"], w["window_end"]) for w in windows if w["scope"] == "window"]
    runs = [w for w in windows if w["scope"] == "run"]
    if len(windows) != summary.get("windows") or len(runs) != 1 or not per:
        return False
    width = per[0][1] - per[0][0]
    return (per == [(width * i, width * (i + 1)) for i in range(len(per))]
            and abs(per[-1][1] - summary["duration_s"]) < 1e-6)


def compact_once(s: Scenario, report: Reliability) -> None:
    """One `lake compact` pass beside the running sink; skipped while the broker is down."""
    from adaptwin.cliutil import UserError
    from adaptwin.ingest import maintenance

    try:
        done = maintenance.compact(maintenance.CompactConfig(s.lake, s.bootstrap, group_id=s.sink_group))
    except UserError as err:
        report.compaction_skipped.append(str(err)[:200])
        return
    report.compactions += 1
    report.files_merged += done.merged_files


def run_scenario(broker, workdir: Path, requests: int = 6000, bad_rows: int = 200, kills: int = 4,
                 broker_restarts: int = 1, seed: int = 0, consumers: list[Consumer] | None = None,
                 compact: bool = True, timeout_s: float = 240.0) -> Reliability:
    """Ingest, then run the consumers under ``kills`` SIGKILLs and ``broker_restarts`` broker stops at random
    moments (and, with ``compact``, a lake compaction after each fault), let them finish, and count what
    the lake holds. ``broker`` is a started LocalBroker (private: it is restarted)."""
    from adaptwin.kafka import ensure_topics

    consumers = list(consumers or CONSUMERS)
    t0 = time.monotonic()
    rng = random.Random(seed)
    tag = f"{seed}-{int(time.time() * 1000) % 10**8}"
    s = Scenario(bootstrap=broker.bootstrap, lake=workdir / "lake", workdir=workdir, ingest_run=f"rel-in-{tag}",
                 replay_run=f"rel-rp-{tag}", sink_group=f"rel-sink-{tag}")
    report = Reliability(bad_rows_tried=bad_rows)
    ensure_topics(s.bootstrap)
    trace = workdir / "trace.csv"
    report.rows_tried = write_trace(trace, requests, bad_rows, seed)
    produced = ingest(s, trace)
    report.ingest_s = round(time.monotonic() - t0, 1)
    report.rows_produced = produced["accepted"]
    report.dead_lettered_by_ingest = produced["dead_lettered"]

    sup = Supervisor(s, consumers, report)
    for c in consumers:
        sup.start(c.name)
    # the faults, in random order, each after a random pause; a kill hits the next consumer (in turn) that is
    # still working, so a consumer that finished early does not use up the kills
    events = ["kill"] * kills + ["broker"] * broker_restarts
    rng.shuffle(events)
    turn = 0
    deadline = time.monotonic() + timeout_s
    t_faults = time.monotonic()
    try:
        for kind in events:
            until = time.monotonic() + rng.uniform(0.3, 2.0)
            while time.monotonic() < until:
                sup.poll()
                time.sleep(0.05)
            mid_replay = sup.running("replay")
            if kind == "broker":
                broker.stop()
                time.sleep(rng.uniform(0.5, 2.0))
                broker.start()
                report.broker_restarts += 1
                report.faults_mid_replay += mid_replay
            else:
                working = [c.name for c in consumers if sup.running(c.name)]  # the sink always is
                name = working[turn % len(working)]
                turn += 1
                if sup.kill(name):
                    report.faults_mid_replay += mid_replay
            if compact and s.lake.exists():
                compact_once(s, report)
        finishing = [c.name for c in consumers if c.to_completion]
        while any(sup.running(n) for n in finishing):
            if time.monotonic() > deadline:
                raise TimeoutError(f"consumers {finishing} did not finish in {timeout_s:.0f} s; logs in {sup.logs}")
            sup.poll()
            time.sleep(0.1)
        summary = sup.done["replay"]
        report.faults_s = round(time.monotonic() - t_faults, 1)
        t_drain = time.monotonic()
        report.replay_summary = summary
        report.windows_expected = summary["windows"]
        # the sink runs until the lake holds everything, then stops cleanly (SIGTERM)
        while time.monotonic() < deadline:
            sup.poll()
            counts = lake_counts(s) if s.lake.exists() else None
            if (counts and counts["telemetry"] >= summary["telemetry"] and len(counts["windows"]) >= summary["windows"]
                    and counts["dead"] >= report.dead_lettered_by_ingest
                    and counts["requests"] >= report.rows_produced
                    and ("learner" not in sup.done or counts["recommendations"] >= summary["windows"] - 1)):
                break
            time.sleep(0.5)
        report.drain_s = round(time.monotonic() - t_drain, 1)
    finally:
        sup.stop_all()
    if compact:
        compact_once(s, report)  # after the sink's last commit: everything merges, nothing may change
    counts = lake_counts(s)
    report.requests_in_lake = counts["requests"]
    report.telemetry_in_lake = counts["telemetry"]
    report.lost = counts["missing"] + max(0, report.rows_produced - counts["requests_distinct"])
    report.duplicated = (counts["telemetry"] - counts["telemetry_distinct"]) + (counts["requests"]
                                                                                - counts["requests_distinct"])
    report.windows_in_lake = len(counts["windows"])
    report.windows_complete = windows_complete(counts["windows"], summary)
    report.dead_letters_in_lake = counts["dead"]
    report.dead_letters_without_reason = counts["dead_no_reason"]
    if "learner" in sup.done:
        report.recommendations_expected = sum(1 for w in counts["windows"] if w["scope"] == "window")
        report.recommendations_in_lake = counts["recommendations"]
        report.recommendations_distinct = counts["recommendations_distinct"]
    report.wall_s = round(time.monotonic() - t0, 1)
    return report


def markdown(reports: list[Reliability]) -> str:
    head = ("| run | kills | broker restarts | faults mid-replay | crashes restarted | compactions (files merged) "
            "| rows produced | requests in lake | telemetry in lake | lost | duplicated | windows in lake / expected "
            "| recommendations in lake / windows | bad rows tried | dead-lettered ingest / in lake "
            "| wall s (ingest, faults, drain) |\n" + "|---" * 16 + "|")
    rows = []
    for i, r in enumerate(reports):
        kills = ", ".join(f"{name} {n}" for name, n in r.kills_by_consumer.items())
        recs = ("—" if r.recommendations_in_lake is None else
                f"{r.recommendations_in_lake} ({r.recommendations_distinct} distinct) / {r.recommendations_expected}")
        rows.append(
            f"| {i + 1} | {r.kills} ({kills}) | {r.broker_restarts} | {r.faults_mid_replay} | {r.crashes_restarted} "
            f"| {r.compactions} ({r.files_merged}) | {r.rows_produced:,} | {r.requests_in_lake:,} "
            f"| {r.telemetry_in_lake:,} | {r.lost} | {r.duplicated} "
            f"| {r.windows_in_lake} / {r.windows_expected}{'' if r.windows_complete else ' (INCOMPLETE)'} | {recs} "
            f"| {r.bad_rows_tried:,} | {r.dead_lettered_by_ingest:,} / {r.dead_letters_in_lake:,} "
            f"| {r.wall_s} ({r.ingest_s}, {r.faults_s}, {r.drain_s}) |")
    return "\n".join([head, *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=19_000, help="good trace rows (Azure conv has 19,366)")
    ap.add_argument("--bad-rows", type=int, default=1000)
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--broker-restarts", type=int, default=2)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--with", dest="extra", action="append", default=[], choices=sorted(OPTIONAL_CONSUMERS),
                    help="also run (and kill) this consumer")
    args = ap.parse_args()
    consumers = CONSUMERS + [OPTIONAL_CONSUMERS[name] for name in args.extra]
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    from adaptwin.broker import LocalBroker, free_port

    reports = []
    with tempfile.TemporaryDirectory(prefix="adaptwin-reliability-") as tmp:
        broker = LocalBroker(port=free_port(), controller_port=free_port(), data_dir=Path(tmp) / "kafka",
                             heap="-Xmx384m").start()
        try:
            for i in range(args.runs):
                work = Path(tmp) / f"run{i}"
                work.mkdir()
                reports.append(run_scenario(broker, work, requests=args.requests, bad_rows=args.bad_rows,
                                            kills=args.kills, broker_restarts=args.broker_restarts,
                                            seed=args.seed + i, consumers=consumers, timeout_s=900))
        finally:
            broker.stop()
    print(markdown(reports))
    print(json.dumps([dataclasses.asdict(r) | {"replay_summary": None} for r in reports], separators=(",", ":")))


if __name__ == "__main__":
    main()
