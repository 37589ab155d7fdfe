"""`adaptwin lake compact` / `lake retention`: same query results, offset-range names, crash leftovers never
counted twice, nothing past the sink's committed offsets touched, and compaction beside a running sink."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from adaptwin import schemas
from adaptwin.cliutil import UserError
from adaptwin.config import TOPICS
from adaptwin.ingest import catalog, lake, maintenance
from adaptwin.ingest.maintenance import CompactConfig
from adaptwin.kafka import make_producer

ADAPTWIN = [sys.executable, "-m", "adaptwin"]
SUMMARY = ("select run_id, date, count(*) n, count(distinct request_id) d, sum(prompt_tokens) p, "
           "min(ts) t0, max(ts) t1 from requests group by all order by all")


def _req(run_id: str, i: int) -> dict:
    return {"v": 1, "request_id": f"{run_id}-{i}", "run_id": run_id, "ts": i * 0.01, "adapter_id": f"lora-{i % 7}",
            "adapter_rank": 8, "prompt_tokens": 100 + i % 50, "output_tokens": 10 + i % 5, "source": "test"}


def _fake_sink_lake(root: Path, batches: int = 12, per_batch: int = 50, partitions: int = 2,
                    date: dt.date | None = None) -> dict[tuple[str, int], int]:
    """Files as the sink writes them (two runs interleaved in each batch); returns the next offsets."""
    date = date or dt.date.today()
    offset = {p: 0 for p in range(partitions)}
    i = 0
    for b in range(batches):
        for p in range(partitions):
            first = offset[p]
            last = first + per_batch - 1
            for run in ("run-a", "run-b"):
                rows = [_req(run, i + k) for k in range(per_batch // 2)]
                i += per_batch // 2
                lake.write_atomic(schemas.to_table(rows, schemas.REQUEST),
                                  lake.file_path(root, "requests", run, date, p, first, last))
            offset[p] = last + 1
    return {(TOPICS.requests, p): off for p, off in offset.items()}


def _summary(root: Path) -> list[dict]:
    return catalog.query(root, SUMMARY).to_pylist()


def test_compaction_keeps_query_results_and_offset_range_names(tmp_path):
    ends = _fake_sink_lake(tmp_path)
    before = _summary(tmp_path)
    n_before = len(lake.files(tmp_path, "requests"))
    # partition 0 fully committed; partition 1 committed up to (not including) its last 3 batches
    committed = {(TOPICS.requests, 0): ends[(TOPICS.requests, 0)], (TOPICS.requests, 1): 9 * 50}
    report = maintenance.compact(CompactConfig(tmp_path, "unused:0"), committed=committed)
    assert _summary(tmp_path) == before
    after = lake.files(tmp_path, "requests")
    assert len(after) == report.files_after == n_before - report.merged_files + report.written_files
    by_part = {p: sorted((f.first_offset, f.last_offset) for f in after if f.partition == p
                         and "run-a" in str(f.path)) for p in (0, 1)}
    assert by_part[0] == [(0, 599)]  # one merged file, named after the whole range
    # partition 1: the committed batches merged, the 3 uncommitted ones untouched, still their own files
    assert by_part[1] == [(0, 449), (450, 499), (500, 549), (550, 599)]
    assert report.skipped_uncommitted == 2 * 3
    assert not list(tmp_path.rglob("*.tmp"))
    # the sink's restart clean-up after compaction still removes exactly the uncommitted files
    removed = lake.drop_uncommitted(tmp_path, "requests", 1, 9 * 50)
    assert sorted(Path(p).name for p in removed) == sorted(
        [f"p001-{a:012d}-{a + 49:012d}.parquet" for a in (450, 500, 550)] * 2)
    # compacting again changes nothing
    again = maintenance.compact(CompactConfig(tmp_path, "unused:0"), committed=committed)
    assert again.written_files == 0


def test_max_rows_bounds_merged_files(tmp_path):
    ends = _fake_sink_lake(tmp_path, batches=10, partitions=1)
    before = _summary(tmp_path)
    maintenance.compact(CompactConfig(tmp_path, "unused:0", max_rows=100), committed=ends)
    sizes = [pq.read_metadata(f.path).num_rows for f in lake.files(tmp_path, "requests")]
    assert max(sizes) <= 100 and len(sizes) == 2 * 3  # per run 250 rows in files of 25: 100 + 100 + 50
    assert _summary(tmp_path) == before


def test_interrupted_compaction_is_never_counted_twice(tmp_path):
    """A crash between the merged file's rename and the inputs' removal: readers skip the covered inputs,
    the next compaction removes them."""
    ends = _fake_sink_lake(tmp_path, partitions=1)
    before = _summary(tmp_path)
    inputs = sorted(lake.files(tmp_path, "requests"), key=lambda f: f.first_offset)
    run_a = [f for f in inputs if "run-a" in str(f.path)][:5]
    # what _merge does up to the rename, then "crash": the inputs stay
    merged = pa.concat_tables([pq.ParquetFile(f.path).read() for f in run_a])
    lake.write_atomic(merged, run_a[0].path.parent / f"p000-{0:012d}-{run_a[-1].last_offset:012d}.parquet")
    assert len(maintenance.covered(lake.files(tmp_path, "requests"))) == 5
    assert _summary(tmp_path) == before  # not twice
    report = maintenance.compact(CompactConfig(tmp_path, "unused:0"), committed=ends)
    assert report.covered_removed == 5
    assert not maintenance.covered(lake.files(tmp_path, "requests"))
    assert _summary(tmp_path) == before


def test_retention_drops_only_old_date_partitions(tmp_path):
    today = dt.date(2026, 3, 10)
    for age in (0, 1, 2, 5):
        _fake_sink_lake(tmp_path, batches=2, partitions=1, date=today - dt.timedelta(days=age))
    dry = maintenance.retention(tmp_path, 1, today=today, dry_run=True)
    assert dry.partitions_removed == 4 and len(lake.files(tmp_path, "requests")) == 16  # 2 runs × 2 dates
    report = maintenance.retention(tmp_path, 1, today=today)
    dates = sorted({f.path.parent.name for f in lake.files(tmp_path, "requests")})
    assert dates == ["date=2026-03-09", "date=2026-03-10"]
    assert report.files_removed == 8 and report.cutoff == "2026-03-09"
    with pytest.raises(UserError, match="0 or more"):
        maintenance.retention(tmp_path, -1)


def test_retention_cli_keeps_today(tmp_path):
    today = dt.datetime.now(dt.timezone.utc).date()
    for age in (0, 10):
        _fake_sink_lake(tmp_path, batches=1, partitions=1, date=today - dt.timedelta(days=age))
    cmd = ADAPTWIN + ["lake", "retention", "--lake", str(tmp_path), "--keep-days", "3", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["partitions_removed"] == 2 and report["files_removed"] == 2  # two runs, the old date each
    assert {f.path.parent.name for f in lake.files(tmp_path, "requests")} == {f"date={today.isoformat()}"}


def test_cli_refuses_unknown_tables_and_needs_the_broker(tmp_path):
    out = subprocess.run(ADAPTWIN + ["lake", "compact", "--lake", str(tmp_path), "--tables", "nope"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "unknown lake table" in out.stderr
    out = subprocess.run(ADAPTWIN + ["lake", "retention", "--lake", str(tmp_path / "nope"), "--older-than", "1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "no lake at" in out.stderr and not (tmp_path / "nope").exists()
    _fake_sink_lake(tmp_path, batches=2, partitions=1)
    out = subprocess.run(ADAPTWIN + ["lake", "compact", "--lake", str(tmp_path), "--bootstrap", "127.0.0.1:9"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "committed offsets" in out.stderr
    assert len(lake.files(tmp_path, "requests")) == 4  # nothing merged without knowing what is committed


def _produce(bootstrap: str, run_id: str, n: int, per_message: int, pause_s: float, first: int = 0) -> None:
    producer = make_producer(bootstrap)
    for start in range(first, n, per_message):
        recs = [_req(run_id, i) for i in range(start, min(n, start + per_message))]
        producer.send(TOPICS.requests, key=recs[0]["adapter_id"].encode(), value=schemas.encode(recs))
        if pause_s:
            time.sleep(pause_s)
    producer.flush()
    producer.close()


def test_compaction_while_the_sink_writes(bootstrap, tmp_path):
    """A sink process publishes every 0.1 s while `adaptwin lake compact` runs again and again (and
    `lake retention` once): every query in between sees each row at most once, and at the end exactly once,
    in fewer files; retention removed only the old partitions."""
    run_id = f"cmp-{uuid.uuid4().hex[:8]}"
    group = f"g-{run_id}"
    n = 20_000
    old = dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=5)
    _fake_sink_lake(tmp_path, batches=2, partitions=1, date=old)  # runs run-a, run-b, five days ago
    sink = subprocess.Popen(ADAPTWIN + ["sink", "--bootstrap", bootstrap, "--lake", str(tmp_path), "--topics",
                                        TOPICS.requests, "--group", group, "--max-age", "0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # the sink's start takes seconds under load: let it store a first message before the rest flows, so
    # that it publishes many small files while the compactions run
    _produce(bootstrap, run_id, 100, 100, 0)
    deadline = time.monotonic() + 90
    while not any(f"run_id={run_id}" in str(f.path) for f in lake.files(tmp_path, "requests")):
        assert time.monotonic() < deadline and sink.poll() is None, "the sink stored nothing in 90 s"
        time.sleep(0.1)
    producer = threading.Thread(target=_produce, args=(bootstrap, run_id, n, 100, 0.03, 100))
    producer.start()
    compactions = merged = 0
    row = {"n": 0, "d": 0}
    deadline = time.monotonic() + 120
    try:
        # compact until the sink has stored every row, checking each time what a reader sees
        while (producer.is_alive() or row["n"] < n) and time.monotonic() < deadline:
            out = subprocess.run(ADAPTWIN + ["lake", "compact", "--lake", str(tmp_path), "--bootstrap", bootstrap,
                                             "--group", group, "--tables", "requests", "--json"],
                                 capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
            merged += json.loads(out.stdout.strip().splitlines()[-1])["merged_files"]
            compactions += 1
            if compactions == 2:
                out = subprocess.run(ADAPTWIN + ["lake", "retention", "--lake", str(tmp_path), "--older-than", "1",
                                                 "--json"], capture_output=True, text=True, timeout=120)
                assert out.returncode == 0, out.stderr
                assert json.loads(out.stdout.strip().splitlines()[-1])["partitions_removed"] == 2
            row = catalog.query(tmp_path, f"select count(*) n, count(distinct request_id) d from requests "
                                          f"where run_id = '{run_id}'").to_pylist()[0]
            assert row["n"] == row["d"], f"a reader saw rows twice after {compactions} compactions"
        producer.join()
    finally:
        sink.terminate()
        sink.wait(timeout=60)
    mine = lambda: [f for f in lake.files(tmp_path, "requests") if f"run_id={run_id}" in str(f.path)]  # noqa: E731
    files_before = len(mine())
    # no --group: the group the sink bound the lake to
    final = subprocess.run(ADAPTWIN + ["lake", "compact", "--lake", str(tmp_path), "--bootstrap", bootstrap,
                                       "--json"], capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    assert (row["n"], row["d"]) == (n, n)
    assert merged > 0, "no compaction merged anything while the sink ran: the test tested nothing"
    after = mine()
    partitions = {f.partition for f in after}
    # all committed: one file per Kafka partition (the loop's last pass may already have merged everything)
    assert len(after) == len(partitions) <= files_before, ([f.path.name for f in after], files_before, final.stdout)
    row = catalog.query(tmp_path, f"select count(*) n, count(distinct request_id) d from requests "
                                  f"where run_id = '{run_id}'").to_pylist()[0]
    assert (row["n"], row["d"]) == (n, n)
    assert not [f for f in lake.files(tmp_path, "requests") if f"date={old.isoformat()}" in str(f.path)]
    # the sink restarts on the compacted lake without dropping or rewriting anything
    again = subprocess.run(ADAPTWIN + ["sink", "--bootstrap", bootstrap, "--lake", str(tmp_path), "--topics",
                                       TOPICS.requests, "--group", group, "--idle-exit", "1.5", "--json"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    stats = json.loads(again.stdout.strip().splitlines()[-1])
    assert stats["removed_uncommitted"] == 0 and stats["rows"] == 0
    assert os.path.exists(after[0].path)


_COMPACT_IN_CHILD = """
import sys
from pathlib import Path
from adaptwin.config import TOPICS
from adaptwin.ingest import maintenance
end = int(sys.argv[2])
print("go", flush=True)  # imports done: the compaction starts now
maintenance.compact(maintenance.CompactConfig(Path(sys.argv[1]), "unused:0", tables=("requests",), max_rows=150),
                    committed={(TOPICS.requests, 0): end})
"""


def _compact_child(root: Path, end: str) -> tuple[subprocess.Popen, float]:
    """A compaction process, returned once its imports are done, with the time it said so."""
    child = subprocess.Popen([sys.executable, "-c", _COMPACT_IN_CHILD, str(root), end], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "go"
    return child, time.monotonic()


def test_sigkilled_compaction_never_shows_a_row_twice(tmp_path):
    """`compact` as a process, SIGKILLed at random moments of its work (writing, renaming, removing): after each
    kill the lake reads the same; the next run cleans up and finishes the job. Every round starts again from the
    uncompacted lake, and kills fall inside the duration of a full compaction measured first, so they land while
    it works whatever the machine's speed."""
    import random
    import shutil
    import signal

    template = tmp_path / "template"
    ends = _fake_sink_lake(template, batches=120, per_batch=10, partitions=1)  # 240 files of 5 rows
    before = _summary(template)
    end = str(ends[(TOPICS.requests, 0)])
    work = tmp_path / "lake"
    shutil.copytree(template, work)
    child, t0 = _compact_child(work, end)
    assert child.wait(timeout=120) == 0
    full_s = time.monotonic() - t0
    rng = random.Random(3)
    kills = debris = 0
    for _ in range(6):
        shutil.rmtree(work)
        shutil.copytree(template, work)
        child, _ = _compact_child(work, end)
        time.sleep(rng.uniform(0.05, 0.9) * full_s)
        if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.wait()
        debris += len(maintenance.covered(lake.files(work, "requests")))
        assert _summary(work) == before, f"after {kills} kills"
        final, _ = _compact_child(work, end)  # the next run cleans up and finishes
        assert final.wait(timeout=120) == 0
        assert _summary(work) == before
        files = lake.files(work, "requests")
        assert not maintenance.covered(files) and not list(work.rglob("*.tmp"))
        assert all(pq.read_metadata(f.path).num_rows <= 150 for f in files) and len(files) < 240
    assert kills >= 4, f"only {kills} of 6 compactions were killed while working (a full one took {full_s:.2f} s)"
    print(f"{kills} kills; covered leftovers seen after them: {debris}; a full compaction {full_s:.2f} s")
