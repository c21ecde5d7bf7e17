"""Fixtures shared across test folders. Keep this file small; folder-specific fixtures live in
the folder's own conftest.py."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with `data` (10 train + 3 test phantom studies, 64 px, seed 3) and `runs`,
    fitted on it once per session with `--preset tiny`, one epoch a model (fitting is the
    expensive part); tests copy `runs` before damaging it."""
    from lsdc.pipeline import fit
    from lsdc.synth import generate_dataset

    root = tmp_path_factory.mktemp("fitted")
    generate_dataset(
        root / "data", train_studies=10, test_studies=3, size=64, seed=3, progress=False
    )
    # The faults' `fit_tiny` resumes this folder with the same settings (its TINY_FIT).
    epochs = ["multitask.engine.epochs=1", "sequence.engine.epochs=1"]
    fit(
        root / "data",
        root / "runs",
        preset="tiny",
        overrides=epochs,
        log=lambda _: None,
        progress=False,
    )
    return root


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: tiny convolutions run many times slower when two
    threads fight other jobs for a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def npz_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the .npz members read from now on (every file), in order."""
    read: list[str] = []
    original = np.lib.npyio.NpzFile.__getitem__

    def spy(self, key):
        read.append(key)
        return original(self, key)

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", spy)
    return read


def _write_toy_sequence_cache(
    root: Path,
    n_studies: int = 8,
    *,
    size: int = 32,
    num_slices: int = 10,
    seed: int = 0,
    split: str = "train",
    missing: dict[int, int] | None = None,
) -> Path:
    """A sequence cache of random studies whose spinal labels follow the brightness of the
    Sagittal T2 stack (so a model can learn something); `missing` maps study index -> series
    type index to leave out."""
    from lsdc.constants import TARGETS
    from lsdc.preprocess.cache import StudyCache

    cache = StudyCache(
        root, "sequence", {"num_slices": num_slices, "size": size, "split": split, "toy": seed}
    )
    rng = np.random.default_rng(seed)
    for i in range(n_studies):
        sid = 1000 + i
        labels = rng.choice(3, size=len(TARGETS), p=[0.7, 0.2, 0.1]).astype(np.int8)
        labels[rng.random(len(TARGETS)) < 0.1] = -1
        images = rng.integers(0, 120, (3, num_slices, size, size)).astype(np.uint8)
        images[1] += np.uint8(40 * max(int(labels[0]), 0))
        mask = np.ones(3, bool)
        if missing and i in missing:
            mask[missing[i]] = False
            images[missing[i]] = 0
        arrays = {"images": images, "series_mask": mask}
        if split == "train":
            arrays["labels"] = labels
        cache.save(sid, arrays, {"study_id": sid})
    return Path(root)


@pytest.fixture
def toy_sequence_cache(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `toy_sequence_cache(n_studies=8, size=32, ...)` -> a sequence cache folder."""
    counter = iter(range(10_000))

    def make(**kwargs) -> Path:
        return _write_toy_sequence_cache(tmp_path / f"seqcache{next(counter)}", **kwargs)

    return make


def _write_toy_multitask_cache(
    root: Path,
    n_studies: int = 6,
    *,
    size: int = 32,
    hires: int = 0,
    seed: int = 0,
    split: str = "train",
    absent: dict[int, str] | None = None,
    ordered: bool = False,
    uncoordinated: Collection[int] = (),
) -> Path:
    """A multitask cache of random studies written directly (no DICOM): every crop is noise
    with a bright dot on each keypoint whose size grows with the keypoint's severity (so a model
    can learn something). `hires` > 0 also stores each crop at that size as its native window;
    `absent` maps study index -> a crop key stored as missing. `ordered`: the dots lie at fixed
    places in the anatomy's order (sagittal levels top to bottom, the patient's left axial point
    on the right of the image), so that only their size, the severity, varies. The studies of
    `uncoordinated` (indices) have no known keypoint, as studies without coordinates."""
    from lsdc.constants import SERIES_TYPES, TARGETS
    from lsdc.preprocess.cache import StudyCache
    from lsdc.preprocess.multitask import CACHE_FORMAT, _empty_crop, crop_key, keypoint_names
    from lsdc.preprocess.slice_relevance import tasks_for

    config = {"format": CACHE_FORMAT, "crop_size": size, "split": split, "toy": seed}
    cache = StudyCache(root, "multitask", config)
    rng = np.random.default_rng(seed)

    def draw(pts: np.ndarray, radii: np.ndarray, side: int) -> np.ndarray:
        yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
        img = rng.uniform(0.0, 0.25, (3, side, side)).astype(np.float32)
        for (x, y), r in zip((pts + 0.5) * side / size - 0.5, radii * side / size, strict=True):
            img[:, ((xx - x) ** 2 + (yy - y) ** 2) < r * r] = 0.9
        return img

    for i in range(n_studies):
        sid = 1000 + i
        labels = rng.choice(3, size=len(TARGETS), p=[0.6, 0.25, 0.15]).astype(np.int8)
        arrays, crops = {}, []
        for st in SERIES_TYPES:
            for task in tasks_for(st):
                key = crop_key(st, task)
                names = keypoint_names(st, task)
                item = _empty_crop(size, len(names), 3)
                present = not (absent and absent.get(i) == key)
                if present:
                    pts = rng.uniform(0.25 * size, 0.75 * size, (len(names), 2))
                    if ordered:
                        k = len(names)
                        line = np.linspace(0.2, 0.8, k) * size
                        pts[:] = 0.5 * size
                        pts[:, int(k == 2)] = line[::-1] if k == 2 else line
                    idx = [TARGETS.index(f"{c}_{lv}") for c, lv in names]
                    radii = 1.0 + 0.06 * size * np.maximum(labels[idx], 0)
                    window = np.array([10, 10 + 2 * size, 20, 20 + 2 * size])
                    item.update(
                        image=draw(pts, radii, size).astype(np.float16),
                        hires=(draw(pts, radii, hires) if hires else np.zeros((3, 0, 0))).astype(
                            np.float16
                        ),
                        slice_indices=np.array([3, 4, 5]),
                        instance_numbers=np.array([7, 6, 5]),
                        keypoints=pts.astype(np.float32),
                        keypoint_mask=np.full(len(names), i not in uncoordinated),
                        keypoint_native=(pts * 2 + window[[2, 0]]).astype(np.float32),
                        window=window,
                        volume_shape=np.array([9, 100, 100]),
                        pixel_spacing=np.array([0.5, 0.8]),
                        present=np.array(True),
                    )
                for name, value in item.items():
                    arrays[f"{key}__{name}"] = value
                crops.append(
                    {"key": key, "series_type": st, "task": task, "source": "oof" if present
                     else None, "series_id": 10 * i + 1 if present else None,
                     "keypoint_names": [f"{c}_{lv}" for c, lv in names], "probability": None}
                )  # fmt: skip
        arrays["labels"] = labels if split == "train" else np.full(len(TARGETS), -1, np.int8)
        cache.save(sid, arrays, {"study_id": sid, "split": split, "crops": crops})
    return Path(root)


@pytest.fixture
def toy_multitask_cache(tmp_path: Path) -> Callable[..., Path]:
    """Factory: `toy_multitask_cache(n_studies=6, size=32, hires=0, ...)` -> a multitask cache."""
    counter = iter(range(10_000))

    def make(**kwargs) -> Path:
        return _write_toy_multitask_cache(tmp_path / f"mtcache{next(counter)}", **kwargs)

    return make
