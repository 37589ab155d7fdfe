"""The README's commands work as written (against the test broker and a temporary lake)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.broker


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    usage = text.split("## Using it", 1)[1]
    blocks = re.findall(r"```sh\n(.*?)```", usage, re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("adaptwin ")]


# Commands that serve until stopped; tests/dashboard/test_browser.py starts the dashboard as written.
SERVICES = {"dashboard"}


def test_readme_has_the_two_commands_first():
    first_block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)[1]
    assert [line.split("#")[0].strip() for line in first_block.splitlines()] == ["make demo", "make test"]


def test_readme_commands_run(bootstrap, tmp_path):
    commands = readme_commands()
    assert any(c.startswith("adaptwin ingest") for c in commands) and any("query" in c for c in commands)
    env = dict(os.environ, ADAPTWIN_BOOTSTRAP=bootstrap, ADAPTWIN_LAKE=str(tmp_path / "lake"),
               ADAPTWIN_CACHE=str(tmp_path / "cache"))  # the learner's checkpoint, twin-run caches
    adaptwin = str(Path(sys.executable).with_name("adaptwin"))
    outputs = {}
    for command in commands:
        argv = shlex.split(command)
        if argv[1] in SERVICES:
            continue
        done = subprocess.run([adaptwin, *argv[1:]], capture_output=True, text=True, env=env, timeout=300,
                              cwd=tmp_path)  # relative outputs (a sweep's folder) land there
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
        outputs[command] = done.stdout
    by_run = next(out for cmd, out in outputs.items() if "group by 1" in cmd and "requests" in cmd)
    assert "conv1" in by_run and "paper1" in by_run
    changes = next(out for cmd, out in outputs.items() if "from recommendations" in cmd)
    assert "conv1-twin" in changes  # the learner's recommendations reached the lake
