"""The built wheel carries everything the package reads at run time (the offline install path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy without the editable install's egg-info: setuptools would otherwise take
    # its file list from there and pass a wheel that a clean checkout builds without data files.
    tree = tmp_path_factory.mktemp("tree")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    skip = shutil.ignore_patterns("*.egg-info", "__pycache__")
    shutil.copytree(ROOT / "src", tree / "src", ignore=skip)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(out), str(tree)],
        check=True,
        capture_output=True,
    )
    (path,) = out.glob("lsdc-*.whl")
    return path


def test_the_wheel_holds_every_package_file(wheel: Path) -> None:
    src = ROOT / "src"
    wanted = {
        p.relative_to(src).as_posix()
        for p in (src / "lsdc").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    held = set(zipfile.ZipFile(wheel).namelist())
    assert wanted - held == set()


@pytest.mark.slow
def test_the_wheel_installed_without_an_index_writes_a_phantom(wheel: Path, tmp_path: Path) -> None:
    # --target plus PYTHONPATH stands in for a clean environment whose dependencies come
    # from elsewhere (a Kaggle image, a wheelhouse): the lsdc code must be the wheel's.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q"]
        + ["--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import sys, lsdc, lsdc.cli;"
        f"assert lsdc.__file__.startswith({str(target)!r}), lsdc.__file__;"
        "sys.argv = ['lsdc', 'synth', 'ph', '--train-studies', '1', '--test-studies', '1',"
        " '--size', '64'];"
        "lsdc.cli.main()"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "ph" / "train.csv").is_file()
