"""The wheel carries everything the package needs at run time (traces, profiles, length tables)."""

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, cwd=out)
    (whl,) = out.glob("adaptwin-*.whl")
    return whl


def test_wheel_lists_parts_and_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for part in ("ingest", "twin", "replay", "learner", "dashboard", "profiler"):
        assert f"adaptwin/{part}/__init__.py" in names
    assert "adaptwin/ingest/traces/AzureLLMInferenceTrace_conv.csv" in names
    assert any(n.startswith("adaptwin/ingest/traces/servegen_m-small/") for n in names)
    # no top-level generic module names leak into site-packages
    assert not any(n.split("/")[0] in {"twin", "ingest", "dashboard", "replay"} for n in names)


def test_installed_wheel_runs_outside_checkout(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    # Dependencies come from the project venv's site-packages (a path entry, so its editable-install hook
    # is not activated); the package itself comes only from the wheel.
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "project-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "ADAPTWIN_LAKE"}}
    work = tmp_path / "elsewhere"
    work.mkdir()
    help_out = subprocess.run([str(env_dir / "bin" / "adaptwin"), "--help"], capture_output=True, text=True,
                              cwd=work, env=env, check=True).stdout
    assert "ingest" in help_out and "query" in help_out
    where = subprocess.run([str(py), "-c", "import adaptwin.ingest as m; print(m.__file__)"], capture_output=True,
                           text=True, cwd=work, env=env, check=True).stdout
    assert str(env_dir) in where and str(ROOT) not in where
    data = subprocess.run([str(py), "-c", "from importlib.resources import files; "
                           "print(files('adaptwin.ingest').joinpath('traces/AzureLLMInferenceTrace_conv.csv')"
                           ".read_text().splitlines().__len__())"], capture_output=True, text=True, cwd=work, env=env,
                          check=True).stdout
    assert int(data) == 19_367  # header + 19,366 requests
    q = subprocess.run([str(env_dir / "bin" / "adaptwin"), "query", "select count(*) from requests", "--lake",
                        str(work / "lake")], capture_output=True, text=True, cwd=work, env=env)
    assert q.returncode == 0, q.stderr
