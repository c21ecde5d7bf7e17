"""The fault corpus: bad inputs made from one tiny phantom, and what lsdc must do with them.

The phantom is generated once per session (64 px, 3 train + 2 test studies, every train study
with coordinates); each case copies it (`data`), damages one thing, and checks that the message
names the file, study or line, that the affected study is skipped or degraded and flagged, that
every other study is processed, and that no partial file remains. Helpers reach the tests through
the `fx` fixture (the suite imports test modules with importlib, so they cannot import helpers).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

from lsdc.synth import generate_dataset

# Small settings: the corpus checks behaviour, not image quality.
SEQUENCE = ["size=32", "num_slices=4"]
MULTITASK = [
    "crop_size=32",
    "hires_max=0",
    "selection.prefer_labelled=true",
    "selection.without_prediction=middle",
]


@pytest.fixture(scope="session")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults_phantom")
    return generate_dataset(
        root / "data",
        train_studies=3,
        test_studies=2,
        size=64,
        seed=21,
        coords_fraction=1.0,
        progress=False,
    )


# `--preset tiny`, one epoch a model: the settings of the shared `fitted` runs folder.
TINY_FIT = ["multitask.engine.epochs=1", "sequence.engine.epochs=1"]


def fit_tiny(data: Path, runs: Path) -> list[str]:
    """`lsdc fit --preset tiny` of `data` into `runs` (resuming what is there) -> its lines."""
    from lsdc.pipeline import fit

    lines: list[str] = []
    fit(data, runs, preset="tiny", overrides=TINY_FIT, log=lines.append, progress=False)
    return lines


@pytest.fixture
def runs_copy(fitted: Path, tmp_path: Path) -> Path:
    """A private copy of the fitted runs folder (without its caches and checkpoints), free to
    damage."""
    return Path(
        shutil.copytree(
            fitted / "runs",
            tmp_path / "runs",
            ignore=shutil.ignore_patterns("cache", "checkpoints"),
        )
    )


@pytest.fixture
def data(phantom: Path, tmp_path: Path) -> Path:
    """A private copy of the phantom, free to damage."""
    return Path(shutil.copytree(phantom, tmp_path / "data"))


def studies(data: Path, split: str = "train") -> list[int]:
    desc = pd.read_csv(data / f"{split}_series_descriptions.csv")
    return sorted(int(s) for s in desc["study_id"].unique())


def series_dir(data: Path, study: int, series_type: str, split: str = "train") -> Path:
    desc = pd.read_csv(data / f"{split}_series_descriptions.csv")
    rows = desc[(desc.study_id == study) & (desc.series_description == series_type)]
    return data / f"{split}_images" / str(study) / str(int(rows.series_id.iloc[0]))


def dcm_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.dcm"), key=lambda p: int(p.stem))


def no_partial_files(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if ".tmp" in p.name]
    assert leftovers == [], leftovers


def run_sequence(data: Path, cache: Path, split: str = "train"):  # noqa: ANN201 - CacheRunReport
    from lsdc.preprocess.sequence import preprocess_dataset

    return preprocess_dataset(data, cache, split=split, overrides=SEQUENCE, progress=False)


def run_multitask(data: Path, cache: Path):  # noqa: ANN201 - CacheRunReport
    from lsdc.preprocess.multitask import preprocess_dataset

    return preprocess_dataset(data, cache, overrides=MULTITASK, progress=False)


def index(data: Path, split: str = "train"):  # noqa: ANN201 - IndexResult
    from lsdc.io.index import build_index

    return build_index(data, split=split, workers=1, progress=False)


def problems_about(result, text: str) -> list[str]:  # noqa: ANN001
    """Index problems whose path or reason contains `text`, as "path: reason"."""
    return [f"{p.path}: {p.reason}" for p in result.problems if text in f"{p.path}: {p.reason}"]


@pytest.fixture
def fx() -> ModuleType:
    return sys.modules[__name__]
