"""The package installs as a wheel and runs its defaults from any folder: the shipped weights travel inside it.

Builds the wheel from a copy of the package sources (offline, no build isolation, so the repository is not
touched), installs it with ``--no-deps`` into a fresh target folder, and runs programs from another folder with
only that folder on ``PYTHONPATH`` (the dependencies come from the current environment).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "namm_transfer", "adapters", "evals", "weights")


def _run(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, the folder it is installed into)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy(path, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(root / "dist"), str(source)], root)
    (wheel,) = (root / "dist").glob("namm_transfer-*.whl")
    _run([*pip, "install", "--no-deps", "--no-index", "--target", str(root / "site"), str(wheel)], root)
    return wheel, root / "site"


def test_the_wheel_carries_every_shipped_file_and_stays_small(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [p.relative_to(ROOT).as_posix() for p in (ROOT / "weights").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    missing = [name for name in shipped if f"namm_transfer/{name}" not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert wheel.stat().st_size < 64 * 2**20


@pytest.mark.slow
def test_the_installed_package_runs_its_defaults_from_another_folder(installed, tmp_path):
    _, site = installed
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([sys.executable, "-c", "import namm_transfer.methods as m, json; w = m.load_namm_option(None); "
                  "print(json.dumps([m.__file__, str(m.shipped_weights(m.SHIPPED_NAMM)), w.config.update_every]))"],
                 elsewhere, env)
    module, weights, period = json.loads(where.stdout)
    assert Path(module).is_relative_to(site) and Path(weights).is_relative_to(site) and period == 256
    assert "usage:" in _run([sys.executable, "-m", "namm_transfer.demo", "--help"], elsewhere, env).stdout
    done = _run([sys.executable, "-m", "namm_transfer.text", "--methods", "namm", "--tasks", "passkey", "--items", "1",
                 "--length", "256", "--ratios", "", "--out", "results"], elsewhere, env)
    summary = json.loads((elsewhere / "results" / "summary.json").read_text())
    assert [row["method"] for row in summary["methods"]] == ["namm"], done.stdout
