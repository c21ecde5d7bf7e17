"""Fixtures shared across test folders. Keep this file small; folder-specific fixtures live in
the folder's own conftest.py."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


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
