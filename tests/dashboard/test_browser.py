"""The real thing: ``adaptwin dashboard`` in headless Chromium (Debian's, driven by Playwright) on a lake
written by a short real replay, every page opened, visible numbers checked against DuckDB, screenshots
saved to docs/screenshots/ (the README and docs/dashboard.md show them).

The lake, all through the real broker: ``adaptwin ingest`` of the first five minutes of the shipped Azure
conversation trace (three deliberately broken rows, dead-lettered) → ``adaptwin replay --backend twin`` (16
served adapters, max_loras 4) and ``adaptwin replay --backend vllm`` against ``adaptwin twin serve`` (vLLM's
API in scaled wall time) → ``adaptwin learn`` (the streaming learner: the twin replay's windows → recommendations) → ``adaptwin sink``
(read_committed).

Needs /usr/bin/chromium (``apt-get install -y chromium``); skipped without it. No browser download.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pytest

from adaptwin import schemas
from adaptwin.broker import free_port
from adaptwin.ingest import catalog
from adaptwin.ingest.readers.shipped import shipped_path

lakedata = sys.modules["adaptwin_dashboard_tests_lakedata"]

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
ADAPTWIN = [sys.executable, "-m", "adaptwin"]
# a closed network: nothing but 127.0.0.1 resolves, no background services phone home
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
    "--disable-domain-reliability", "--disable-client-side-phishing-detection", "--no-first-run",
    "--no-default-browser-check", "--metrics-recording-only", "--disable-breakpad",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]
RUN = "dash-e2e"  # the ingest run
TWIN_RUN, REAL_RUN = "dash-e2e-twin", "dash-e2e-vllm"
TRACE_S = 300  # trace seconds ingested and replayed on the twin
REAL_S = TRACE_S  # trace seconds replayed on twin serve (wall time = REAL_S / SPEEDUP)
SPEEDUP = 10
MODEL = "llama-3.1-8b-instruct"  # the replay's default model

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium: apt-get install -y chromium")


@dataclass
class Sample:
    requests: int  # requests of the ingest run in the lake
    twin: dict  # the replays' --json summaries
    real: dict
    held_windows: pa.Table  # the real replay's last two windows, published during the test


def _json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _cli(*args: str, timeout: float = 180) -> str:
    out = subprocess.run([*ADAPTWIN, *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def pipeline_lake(kafka_broker, tmp_path_factory) -> tuple[Path, Sample]:
    bootstrap = kafka_broker.bootstrap
    work = tmp_path_factory.mktemp("dash-e2e")
    lake = work / "lake"
    lines = shipped_path("azure-conv").read_bytes().splitlines()
    lines[5] = lines[5].rsplit(b",", 1)[0] + b",abc"  # bad_type
    lines[9] = lines[9].rsplit(b",", 1)[0] + b",-5"  # out_of_range
    lines[13] = lines[13] + b",extra"  # unparsable
    trace = work / "conv.csv"
    trace.write_bytes(b"\n".join(lines) + b"\n")
    ing = _json(_cli("ingest", "--trace", str(trace), "--format", "azure", "--adapters", "24", "--duration",
                     str(TRACE_S), "--run-id", RUN, "--bootstrap", bootstrap, "--json"))
    common = ["--run-id-in", RUN, "--served", "16", "--max-loras", "4", "--window", "10", "--bootstrap", bootstrap,
              "--json", "--no-progress"]
    twin = _json(_cli("replay", *common, "--backend", "twin", "--model", MODEL, "--run-id", TWIN_RUN))
    # the "real" server: twin serve behind vLLM's API, driven by the vllm backend over HTTP in scaled wall time
    serve = subprocess.Popen([*ADAPTWIN, "twin", "serve", "--model", MODEL, "--port", "0", "--max-cpu-loras", "16",
                              "--max-loras", "4",
                              "--speedup", str(SPEEDUP)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True, start_new_session=True)
    try:
        first = serve.stdout.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", first)
        assert url, first
        real = _json(_cli("replay", *common, "--backend", "vllm", "--url", url.group(0), "--speedup", str(SPEEDUP),
                          "--duration", str(REAL_S), "--run-id", REAL_RUN, timeout=300))
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(timeout=15)
    # the streaming learner turns the twin replay's windows into recommendations (kind recommendation / drift)
    learned = _json(_cli("learn", "--run-id-in", TWIN_RUN, "--until-run-end", "--bootstrap", bootstrap,
                         "--checkpoint", str(work / "learner"), "--no-progress", "--json", timeout=300))
    assert learned["recommendations"] > 0, learned
    _cli("sink", "--group", f"dash-e2e-{os.getpid()}", "--idle-exit", "3", "--max-age", "0.5",
         "--bootstrap", bootstrap, "--lake", str(lake), "--json")
    n = _q(lake, f"select count(*) n from requests where run_id = '{RUN}'")["n"]
    assert n == ing["accepted"] > 1000 and ing["dead_lettered"] == 3, ing
    assert _q(lake, f"select count(*) n from telemetry where run_id = '{TWIN_RUN}'")["n"] == twin["telemetry"] == n
    assert _q(lake, f"select count(*) n from telemetry where run_id = '{REAL_RUN}'")["n"] == real["telemetry"]
    assert _q(lake, f"select count(*) n from recommendations where run_id = '{TWIN_RUN}'")["n"] >= \
        learned["recommendations"]
    # the real replay's last two windows are held back and published while the Live page is open (what a
    # running replay does next); the rest of its windows are republished as they were, last, so the real run's
    # files are the newest and Live and Adapters select it by default
    windows = catalog.query(lake, f"select * from windows where run_id = '{REAL_RUN}' order by window_end")
    windows = windows.select(schemas.WINDOW.names).cast(schemas.WINDOW)
    scope = windows["scope"].to_pylist()
    held = [i for i, sc in enumerate(scope) if sc == "window"][-2:]
    for f in lake.glob(f"windows/run_id={REAL_RUN}/date=*/*.parquet"):
        f.unlink()
    lakedata.write(lake, "windows", windows.take([i for i in range(len(scope)) if i not in held]), REAL_RUN)
    for f in sorted(lake.glob(f"*/run_id={REAL_RUN}/date=*/*.parquet")):
        os.utime(f)
    return lake, Sample(n, twin, real, windows.take(held))


@pytest.fixture(scope="module")
def dashboard(pipeline_lake, kafka_broker):
    lake, _ = pipeline_lake
    port = free_port()
    proc = subprocess.Popen(
        [*ADAPTWIN, "dashboard", "--lake", str(lake), "--port", str(port), "--bootstrap", kafka_broker.bootstrap,
         "--refresh", "2", "--cache-ttl", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the dashboard did not answer /_stcore/health in 60 s"
            time.sleep(0.3)
        yield url, port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1440, "height": 1900}, device_scale_factor=1)
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    context.close()


def _open(page, url: str, *selectors: str) -> None:
    page.goto(url)
    page.wait_for_selector('[data-testid="stMainBlockContainer"] h1')
    for sel in selectors:
        page.wait_for_selector(sel, state="visible")
    _settle(page)


def _settle(page) -> None:
    """Wait until Streamlit is not running the script and charts have drawn."""
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=30_000)
    page.wait_for_timeout(400)


def _metric(page, label: str) -> str:
    box = page.locator('[data-testid="stMetric"]').filter(
        has=page.locator('[data-testid="stMetricLabel"]', has_text=re.compile(f"^{re.escape(label)}$")))
    return box.first.locator('[data-testid="stMetricValue"]').inner_text().strip()


def _num(text: str) -> float:
    return float(text.split()[0].replace(",", "").rstrip("%"))


def _shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _q(lake: Path, sql: str) -> dict:
    return catalog.query(lake, sql).to_pylist()[0]


def test_every_page_in_chromium(dashboard, pipeline_lake, page):
    url, _ = dashboard
    lake, sample = pipeline_lake
    charts = '[data-testid="stVegaLiteChart"]'

    # Live: the newest run is selected; its numbers are DuckDB's; new windows appear without a reload
    _open(page, f"{url}/",  # Live is the default page, served at /
          '[data-testid="stMetric"]', charts)
    run = REAL_RUN  # written last, so the newest
    want = _q(lake, f"select count(*) n, count(*) filter (where finished) f from telemetry where run_id = '{run}'")
    assert _num(_metric(page, "Requests")) == want["n"] == sample.real["telemetry"]
    assert _num(_metric(page, "Finished")) == want["f"]
    windows = _q(lake, f"select count(*) n from windows where run_id = '{run}' and scope = 'window'")["n"]
    assert _num(_metric(page, "Windows")) == windows
    _shot(page, "live")
    extra = sample.held_windows
    lakedata.write(lake, "windows", extra, run)
    page.wait_for_function(  # the fragment reruns by itself every 2 s: no reload, no click
        """n => [...document.querySelectorAll('[data-testid="stMetric"]')].some(m =>
              m.innerText.startsWith('Windows') && m.innerText.includes(String(n)))""",
        arg=windows + extra.num_rows, timeout=20_000)

    # Adapters
    _open(page, f"{url}/adapters", '[data-testid="stMetric"]', charts)
    r, b = REAL_RUN, "vllm"  # the newest series is picked by default
    want = _q(lake, f"select count(distinct a.adapter_id) n, sum(a.offered_tokens) o from (select unnest(adapters) a "
                    f"from windows where run_id = '{r}' and backend = '{b}' and scope = 'window')")
    assert _num(_metric(page, "Adapters seen")) == want["n"]
    assert _num(_metric(page, "Offered tokens")) == want["o"]
    _shot(page, "adapters")

    # Recommendations
    _open(page, f"{url}/recommendations", '[data-testid="stMetric"]', charts)
    want = _q(lake, f"select served s, max_loras m from recommendations where run_id = '{TWIN_RUN}' "
                    "and kind = 'recommendation' order by window_end desc limit 1")
    assert _num(_metric(page, "Served adapters: recommended")) == want["s"]
    assert _num(_metric(page, "max_loras: recommended")) == want["m"]
    assert _num(_metric(page, "Served adapters: current")) == 16
    _shot(page, "recommendations")

    # Twin vs real
    _open(page, f"{url}/twin-vs-real", '[data-testid="stMetric"]', charts, '[data-testid="stDataFrame"]')
    pairs = catalog.query(lake, f"""select t.throughput tw, r.throughput re
        from (select * from windows where run_id = '{TWIN_RUN}' and scope = 'window') t
        join (select * from windows where run_id = '{REAL_RUN}' and scope = 'window') r
        using (window_start, served, max_loras)""").to_pylist()
    from adaptwin.dashboard.sql_common import half_smape_py

    assert _num(_metric(page, "Matched windows")) == len(pairs)
    assert _num(_metric(page, "Throughput half-sMAPE")) == pytest.approx(
        half_smape_py([p["re"] for p in pairs], [p["tw"] for p in pairs]), abs=0.006)
    _shot(page, "twin-vs-real")

    # Pipeline: dead letters from the real ingest, lag of the real sink group
    _open(page, f"{url}/pipeline", '[data-testid="stMetric"]', '[data-testid="stDataFrame"]')
    dead = _q(lake, "select count(*) n from deadletter")["n"]
    assert dead >= 3
    assert _num(_metric(page, "Dead-lettered rows")) == dead
    page.wait_for_selector("text=Consumer lag")
    assert _num(_metric(page, "Files")) == sum(1 for _ in lake.glob("*/run_id=*/date=*/*.parquet"))
    _shot(page, "pipeline")

    # Query: an example runs and its row count is DuckDB's; writes and files outside the lake are refused
    _open(page, f"{url}/query", "textarea")
    sql = "SELECT adapter_id, count(*) AS requests FROM requests GROUP BY 1 ORDER BY 2 DESC"
    _run_sql(page, sql)
    page.wait_for_selector('[data-testid="stDataFrame"]')
    n = len(catalog.query(lake, sql))
    page.wait_for_selector(f"text=/^{n:,} rows/")
    page.wait_for_selector(charts)
    _settle(page)
    _shot(page, "query")
    for bad in ("COPY (SELECT 1) TO '/tmp/adaptwin-dash.csv'", "SELECT * FROM read_csv('/etc/passwd')"):
        _run_sql(page, bad)
        page.wait_for_selector('[data-testid="stAlertContentError"] >> text=/refused/')


def _run_sql(page, sql: str) -> None:
    area = page.locator("textarea")
    area.fill(sql)
    page.get_by_role("button", name="Run").click()
    _settle(page)


def test_dashboard_binds_loopback_only(dashboard):
    _, port = dashboard
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        assert all(re.search(r"127\.0\.0\.1:%d\b" % port, line) for line in out.stdout.strip().splitlines()), out.stdout


def test_screenshots_exist_for_every_page(dashboard):
    # runs after test_every_page_in_chromium (same module, file order)
    for name in ("live", "adapters", "recommendations", "twin-vs-real", "query", "pipeline"):
        shot = SHOTS / f"{name}.png"
        assert shot.exists() and shot.stat().st_size > 10_000, shot
