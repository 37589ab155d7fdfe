"""Fixtures of the dashboard tests: lakes (with data, empty, with a corrupt file) and AppTest helpers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent


def _load(name: str):
    # tests/ is not a package on sys.path (pytest --import-mode=importlib): load the helper by path
    key = f"adaptwin_dashboard_tests_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, _HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


lakedata = _load("lakedata")



@pytest.fixture(scope="session")
def lakedata_module():
    return lakedata


@pytest.fixture(scope="session")
def sample_lake(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("lake-sample")
    sample = lakedata.write_sample_lake(root, n=2000, duration=240.0, seed=1)
    return root, sample


@pytest.fixture
def empty_lake(tmp_path) -> Path:
    return tmp_path / "lake-empty"  # does not even exist yet: the dashboard must start on it


@pytest.fixture
def page_app(monkeypatch):
    """page_app(module, lake) -> an AppTest that renders one page against ``lake`` (not run yet)."""
    from streamlit.testing.v1 import AppTest

    def make(module: str, lake: Path, bootstrap: str = "127.0.0.1:1"):
        monkeypatch.setenv("ADAPTWIN_LAKE", str(lake))
        monkeypatch.setenv("ADAPTWIN_BOOTSTRAP", bootstrap)
        script = f"from adaptwin.dashboard import {module}\n{module}.render()\n"
        return AppTest.from_string(script, default_timeout=30)
    return make
