"""Fixtures of the profiler tests."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest


@pytest.fixture(scope="session")
def load_script() -> Callable[[Path], ModuleType]:
    """Imports a stand-alone GPU script (not part of the package) as a module of its own."""
    def load(path: Path) -> ModuleType:
        spec = importlib.util.spec_from_file_location(f"{path.stem}_under_test", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod
    return load
