"""Self-supervised super-resolution training on a (tiny, hand-written) multitask cache."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lsdc.cli import app
from lsdc.config import load_config
from lsdc.constants import AXIAL_T2
from lsdc.models.superres import load_sr
from lsdc.preprocess.cache import StudyCache
from lsdc.preprocess.multitask import CACHE_FORMAT, _empty_crop, crop_key, keypoint_names
from lsdc.training.superres import (
    SRTrainConfig,
    _crop_slices,
    degrade,
    fit_sr,
    reservoir,
    split_studies,
    study_images,
    train_sr,
)

# Small and quick, but enough to beat bicubic clearly (about +3 dB on these images).
FAST = ["channels=16", "num_blocks=2", "patch=24", "batch_size=16", "lr=2e-3"]
SAGITTAL_TASK = ("Sagittal T2/STIR", "spinal_canal_stenosis")
AXIAL_TASK = (AXIAL_T2, "l4_l5")
ABSENT_TASK = ("Sagittal T1", "left_neural_foraminal_narrowing")


# One torch thread: see the `one_thread` fixture.
pytestmark = pytest.mark.usefixtures("one_thread")


def toy_image(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """(size, size) float32 in [0, 1]: smooth blobs (soft tissue) plus sharp rectangles and
    discs (bone, canal), the mix of smooth areas and edges that SR has to restore."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    img = np.full((size, size), 0.1, np.float32)
    for _ in range(4):
        cy, cx = rng.uniform(0, size, 2)
        s = rng.uniform(4, 12)
        img += 0.3 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    for _ in range(3):
        y0, x0 = rng.integers(0, size - 16, 2)
        h, w = rng.integers(6, 16, 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0.5, 0.9)
    for _ in range(2):
        cy, cx = rng.uniform(8, size - 8, 2)
        r = rng.uniform(3, 8)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0.6, 1.0)
    return np.clip(img, 0, 1)


def write_toy_multitask_cache(
    root: Path,
    n_studies: int = 6,
    size: int = 64,
    seed: int = 0,
    absent_only: int = 0,
    hires: bool = False,
) -> Path:
    """A multitask cache written directly (no DICOM): per study a present sagittal and axial
    crop of toy slices and one absent crop; the last `absent_only` studies have no present
    crop at all. With `hires`, the crops hold the toy slices as `hires` and a 2x smaller
    `image`."""
    rng = np.random.default_rng(seed)
    config = {"format": CACHE_FORMAT, "crop_size": size, "split": "train"}
    cache = StudyCache(root, "multitask", config)
    for i in range(n_studies):
        arrays, crops = {}, []
        for st, task in (SAGITTAL_TASK, AXIAL_TASK, ABSENT_TASK):
            names = keypoint_names(st, task)
            item = _empty_crop(size, len(names), 3)
            if (st, task) != ABSENT_TASK and i < n_studies - absent_only:
                base = toy_image(rng, size)
                # Neighbouring slices: the same anatomy, slightly moved and dimmed.
                slices = [np.roll(base, k, axis=1) * (1 - 0.05 * abs(k)) for k in (-1, 0, 1)]
                stack = np.stack(slices).astype(np.float16)
                item.update(image=stack, present=np.array(True))
                if hires:
                    item.update(image=stack[:, ::2, ::2], hires=stack)
            key = crop_key(st, task)
            arrays.update({f"{key}__{name}": v for name, v in item.items()})
            crops.append(
                {
                    "key": key,
                    "series_type": st,
                    "task": task,
                    "keypoint_names": [f"{c}_{lv}" for c, lv in names],
                    "series_id": None,
                    "source": None,
                    "probability": None,
                }
            )
        cache.save(1000 + i, arrays, {"study_id": 1000 + i, "split": "train", "crops": crops})
    return Path(root)


def test_split_studies_is_seeded_and_disjoint():
    ids = list(range(10, 20))
    train, val = split_studies(ids, 0.2, seed=3)
    assert (train, val) == split_studies(ids[::-1], 0.2, seed=3)
    assert len(val) == 2 and sorted(train + val) == ids
    assert split_studies(ids, 0.2, seed=4) != (train, val)
    assert len(split_studies([1, 2], 0.9, seed=0)[0]) == 1  # both sides keep a study
    with pytest.raises(ValueError, match="at least 2"):
        split_studies([1], 0.5, seed=0)


def test_highest_resolution_window_is_used():
    image = np.zeros((3, 8, 8), np.float16)
    hires = np.ones((3, 20, 24), np.float16)
    assert _crop_slices(SimpleNamespace(image=image, hires=hires)).shape == (3, 20, 24)
    assert _crop_slices(SimpleNamespace(image=image, hires=np.zeros(0))).shape == (3, 8, 8)
    assert _crop_slices(SimpleNamespace(image=image)).dtype == np.float32


def test_study_images_take_hires_slices_of_present_crops(tmp_path):
    cache = write_toy_multitask_cache(tmp_path / "c", n_studies=2, size=32, hires=True)
    images = study_images(StudyCache.open(cache), 1000)
    assert len(images) == 6  # 2 present crops x 3 slices; the absent crop gives none
    assert all(im.shape == (32, 32) and im.dtype == np.float32 for im in images)


def test_degrade_downsamples_and_adds_seeded_noise():
    hr = torch.rand(2, 1, 16, 12)
    lr = degrade(hr, 4, 0.05, torch.Generator().manual_seed(0))
    assert lr.shape == (2, 1, 4, 3)
    assert float(lr.min()) >= 0 and float(lr.max()) <= 1
    torch.testing.assert_close(lr, degrade(hr, 4, 0.05, torch.Generator().manual_seed(0)))
    assert not torch.equal(lr, degrade(hr, 4, 0.0))


def test_reservoir_keeps_a_seeded_uniform_sample_holding_no_more_than_the_cap():
    assert reservoir(iter(range(5)), 0, seed=0) == list(range(5))  # 0: everything
    assert reservoir(iter(range(5)), 9, seed=0) == list(range(5))
    alive, peak = set(), 0

    class Item:  # counts the items alive at once: those the reservoir still holds
        def __init__(self, i: int) -> None:
            self.i = i
            alive.add(i)

        def __del__(self) -> None:
            alive.discard(self.i)

    def stream(n: int):
        nonlocal peak
        for i in range(n):
            peak = max(peak, len(alive))
            yield Item(i)

    kept = reservoir(stream(1000), 10, seed=1)
    assert peak <= 11 and len(kept) == 10  # the cap, plus the item being considered
    sample = [item.i for item in kept]
    assert len(sample) == 10 and sample == sorted(set(sample)) and sample[-1] >= 100
    assert sample == reservoir(iter(range(1000)), 10, seed=1) != reservoir(range(1000), 10, 2)
    counts = np.zeros(10)
    for seed in range(400):  # uniform: each decile kept about equally often
        counts += np.bincount(np.array(reservoir(range(100), 10, seed)) // 10, minlength=10)
    assert counts.min() > 0.7 * counts.mean()


def test_train_sr_caps_the_slices_it_holds(tmp_path):
    cache = write_toy_multitask_cache(tmp_path / "cache", n_studies=6)
    over = [*FAST, "steps=2", "val_fraction=0.34", "max_images=5", "max_val_images=3"]
    report = train_sr(cache, tmp_path / "run", overrides=over)
    assert (report.images_train, report.images_val) == (5, 3)


def test_training_is_deterministic():
    rng = np.random.default_rng(0)
    images = [toy_image(rng, 32) for _ in range(4)]
    cfg = load_config(SRTrainConfig, None, [*FAST, "steps=5"])
    (a, hist_a), (b, hist_b) = fit_sr(images, cfg), fit_sr(images, cfg)
    assert hist_a == hist_b
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    with pytest.raises(ValueError, match="at least 48 px"):
        fit_sr(images, load_config(SRTrainConfig, None, ["patch=48"]))


def test_train_sr_beats_bicubic_and_writes_the_run_folder(tmp_path):
    cache = write_toy_multitask_cache(tmp_path / "cache", n_studies=6)
    run = tmp_path / "run"
    report = train_sr(cache, run, overrides=[*FAST, "steps=400", "val_fraction=0.34"])
    # 4 train studies x 2 present crops x 3 slices; 2 held-out studies.
    assert (report.images_train, report.images_val) == (24, 12)
    assert report.psnr_sr > report.psnr_bicubic + 0.5, report
    assert report.ssim_sr > report.ssim_bicubic, report
    for name in ("config.yaml", "sr.json", "model.safetensors", "report.json", "examples.png"):
        assert (run / name).is_file(), name
    saved = json.loads((run / "report.json").read_text())
    assert saved["psnr_sr"] == pytest.approx(report.psnr_sr)
    assert set(saved["studies_train"]).isdisjoint(saved["studies_val"])
    assert load_config(SRTrainConfig, run / "config.yaml").steps == 400
    assert (run / "examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_sr(run)
    assert model.kwargs["channels"] == 16 and not model.training


def test_train_sr_refuses_unusable_caches(tmp_path):
    seq = StudyCache(tmp_path / "seq", "sequence", {"format": 1})
    seq.save(1, {"x": np.zeros(1)}, {})
    with pytest.raises(ValueError, match="not a 'multitask' cache"):
        train_sr(tmp_path / "seq", tmp_path / "run")
    cache = write_toy_multitask_cache(tmp_path / "one", n_studies=3, absent_only=2)
    with pytest.raises(ValueError, match=r"one: 1 studies with present crops"):
        train_sr(cache, tmp_path / "run")
    # A corrupt study file is reported and skipped, not the end of the run.
    cache = write_toy_multitask_cache(tmp_path / "bad", n_studies=2, size=32)
    (cache / "1001.npz").write_bytes(b"not an npz")
    with (
        pytest.warns(UserWarning, match=r"1001\.npz: skipped"),
        pytest.raises(ValueError, match="1 studies"),
    ):
        train_sr(cache, tmp_path / "run")


def test_cli_train_sr(tmp_path):
    cache = write_toy_multitask_cache(tmp_path / "cache", n_studies=3, size=32)
    run = tmp_path / "run"
    res = CliRunner().invoke(
        app, ["train", "sr", str(cache), "--out", str(run), "--steps", "10", *FAST, "patch=16"]
    )
    assert res.exit_code == 0, res.output
    assert "PSNR SR" in res.output and "bicubic" in res.output
    assert f"run folder {run}" in res.output
    assert json.loads((run / "report.json").read_text())["images_train"] == 12
    assert load_config(SRTrainConfig, run / "config.yaml").steps == 10
