"""Tiny synthetic images shared by the preprocessing tests."""

from __future__ import annotations

import numpy as np
import pytest


def make_toy_sagittal(
    size: int = 128,
    slices: int = 9,
    shift: tuple[int, int] = (0, 0),
    seed: int = 0,
    width: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A cartoon sagittal stack (S, H, W): body, six vertebral bodies separated by dark discs, a
    bright canal behind them; returns (volume, disc points (5, 2) x/y of the five disc centres).

    `shift` = (dy, dx) moves the anatomy inside the field of view.
    """
    rng = np.random.default_rng(seed)
    h, w = size, width or size
    dy, dx = shift
    img = np.zeros((h, w), np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    body = ((xx - (0.5 * w + dx)) / (0.42 * w)) ** 2 + ((yy - (0.5 * h + dy)) / (0.6 * h)) ** 2 < 1
    img[body] = 300
    x_body0, x_body1 = int(0.36 * w) + dx, int(0.56 * w) + dx
    x_canal0, x_canal1 = x_body1 + int(0.03 * w), x_body1 + int(0.09 * w)
    top = int(0.18 * h) + dy
    vb, disc = int(0.1 * h), int(0.035 * h)
    points = []
    y = top
    for k in range(6):
        img[y : y + vb, x_body0:x_body1] = 800
        y += vb
        if k < 5:
            img[y : y + disc, x_body0:x_body1] = 150
            points.append(((x_body0 + x_body1) / 2, y + disc / 2))
            y += disc
    img[top : y + 2, x_canal0:x_canal1] = 1000
    vol = np.stack([img * (1 - 0.02 * abs(i - slices // 2)) for i in range(slices)])
    vol = vol + rng.normal(0, 20, vol.shape).astype(np.float32)
    return vol.astype(np.float32), np.asarray(points, np.float64)


def scipy_crop_and_resize(img, window, size, order=1):
    """The reference: `crop_and_resize` of one image as it was before issue 10 (one Gaussian
    prefilter and one `scipy.ndimage.affine_transform` call per image)."""
    from scipy import ndimage

    img = np.asarray(img, dtype=np.float32)
    y0, y1, x0, x1 = window
    h, w = (size, size) if isinstance(size, int) else size
    fy, fx = (y1 - y0) / h, (x1 - x0) / w
    sigma = (max(0.0, (fy - 1) / 2), max(0.0, (fx - 1) / 2))
    if sigma[0] > 0 or sigma[1] > 0:
        pad = int(np.ceil(4 * max(sigma))) + 2
        ry0, ry1 = max(0, y0 - pad), min(img.shape[0], y1 + pad)
        rx0, rx1 = max(0, x0 - pad), min(img.shape[1], x1 + pad)
        if ry1 <= ry0 or rx1 <= rx0:
            return np.zeros((h, w), np.float32)
        img = ndimage.gaussian_filter(img[ry0:ry1, rx0:rx1], sigma, mode="nearest")
        y0, y1, x0, x1 = y0 - ry0, y1 - ry0, x0 - rx0, x1 - rx0
    offset = (y0 - 0.5 + 0.5 * fy, x0 - 0.5 + 0.5 * fx)
    return ndimage.affine_transform(
        img, (fy, fx), offset=offset, output_shape=(h, w), order=order, mode="constant"
    ).astype(np.float32, copy=False)


@pytest.fixture
def scipy_crop():
    """The `scipy_crop_and_resize` reference."""
    return scipy_crop_and_resize


@pytest.fixture
def toy_sagittal():
    """The `make_toy_sagittal` factory."""
    return make_toy_sagittal


# --------------------------------------------------------------------------- a tiny RSNA dataset

_SAG_ORIENT = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows run anterior->posterior, columns downwards
_AX_ORIENT = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _sagittal_slice(base: np.ndarray, x_mm: float, kind: str, discs: np.ndarray) -> np.ndarray:
    """One sagittal slice at patient x (mm, +x = left): the canal is bright only near the
    midline (T2), the foramina show a bright spot only near x = +-12 mm (T1)."""
    img = base * (1.0 - 0.01 * abs(x_mm))
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    for px, py in discs:
        if kind == "t2" and abs(x_mm) < 3:
            img = img + 900 * (((xx - px - 9) ** 2 + (yy - py) ** 2) < 9)
        if kind == "t1" and abs(abs(x_mm) - 12) < 3:
            img = img + 900 * (((xx - px - 6) ** 2 + (yy - py) ** 2) < 6)
    return img


def write_tiny_dataset(
    root, n_studies: int = 6, size: int = 64, seed: int = 0, unlabelled: int = 1
) -> dict:
    """A small RSNA-format dataset (train_images + CSVs) of cartoon studies whose labelled
    slices are visibly special; the last `unlabelled` studies have no coordinates. Instance
    numbers run against spatial order so readers must sort by position. Returns the truth."""
    from pathlib import Path

    import pandas as pd

    from lsdc.constants import (
        AXIAL_T2,
        LEVELS,
        SAGITTAL_T1,
        SAGITTAL_T2,
        condition_to_title,
        level_to_title,
    )
    from lsdc.io.dicomwrite import write_slice

    root = Path(root)
    rng = np.random.default_rng(seed)
    rows, descs, coords = [], [], []
    truth: dict = {}
    spacing = 3.0
    for k in range(n_studies):
        study_id = 1000 + k
        shift = (int(rng.integers(-6, 7)), int(rng.integers(-8, 9)))
        base, discs = make_toy_sagittal(size=size, slices=1, shift=shift, seed=k)
        base = base[0]
        n_sag = 9 + int(rng.integers(0, 3))
        xs = (np.arange(n_sag) - (n_sag - 1) / 2) * spacing  # spatial order along -x normal
        labelled = k < n_studies - unlabelled
        for series_id, (stype, kind) in enumerate(
            [(SAGITTAL_T1, "t1"), (SAGITTAL_T2, "t2")], start=k * 10 + 1
        ):
            descs.append((study_id, series_id, stype))
            for i, x_mm in enumerate(xs[::-1]):  # normal is -x: sorted order is descending x
                inst = n_sag - i  # against spatial order
                img = _sagittal_slice(base, x_mm, kind, discs)
                noisy = img + rng.normal(0, 15, img.shape)
                write_slice(
                    root / "train_images" / str(study_id) / str(series_id) / f"{inst}.dcm",
                    np.clip(noisy, 0, 4000).astype(np.uint16),
                    study_id=study_id,
                    series_id=series_id,
                    instance_number=inst,
                    position=(x_mm, -60.0, 60.0),
                    orientation=_SAG_ORIENT,
                    pixel_spacing=(1.5, 1.5),
                    slice_thickness=spacing,
                )
            if not labelled:
                continue
            x_by_inst = {n_sag - i: x for i, x in enumerate(xs[::-1])}
            if kind == "t2":
                inst = min(x_by_inst, key=lambda n: abs(x_by_inst[n]))
                for lv, (px, py) in zip(LEVELS, discs, strict=True):
                    coords.append(
                        (study_id, series_id, inst, "spinal_canal_stenosis", lv, px + 9, py)
                    )
            else:
                for side, target in (("left", 12.0), ("right", -12.0)):
                    inst = min(x_by_inst, key=lambda n: abs(x_by_inst[n] - target))
                    cond = f"{side}_neural_foraminal_narrowing"
                    for lv, (px, py) in zip(LEVELS, discs, strict=True):
                        coords.append((study_id, series_id, inst, cond, lv, px + 6, py))
        # Axial: 3 slices per level, the middle one through the disc (a bright ring).
        series_id = k * 10 + 3
        descs.append((study_id, series_id, AXIAL_T2))
        n_ax = 15
        yy, xx = np.mgrid[0:size, 0:size]
        cx, cy = size / 2 + shift[1] / 4, size / 2 + 4
        for i in range(n_ax):
            z = 60.0 - i * 4.0
            level, phase = divmod(i, 3)
            r2 = (xx - cx) ** 2 + (yy - cy) ** 2
            img = 200 + 400 * (r2 < (size / 5) ** 2)
            if phase == 1:
                img = img + 500 * ((r2 < (size / 4) ** 2) & (r2 > (size / 6) ** 2))
            img = img + 60 * level + rng.normal(0, 15, (size, size))
            inst = i + 1
            write_slice(
                root / "train_images" / str(study_id) / str(series_id) / f"{inst}.dcm",
                np.clip(img, 0, 4000).astype(np.uint16),
                study_id=study_id,
                series_id=series_id,
                instance_number=inst,
                position=(-size * 0.75 / 2, -size * 0.75 / 2, z),
                orientation=_AX_ORIENT,
                pixel_spacing=(0.75, 0.75),
                slice_thickness=4.0,
            )
            if labelled and phase == 1:
                lv = LEVELS[level]
                for side, dx in (("left", 6), ("right", -6)):
                    coords.append(
                        (
                            study_id,
                            series_id,
                            inst,
                            f"{side}_subarticular_stenosis",
                            lv,
                            cx + dx,
                            cy,
                        )
                    )
        rows.append(study_id)
        truth[study_id] = {"shift": shift, "labelled": labelled}
    pd.DataFrame({"study_id": rows}).assign(**{c: "Normal/Mild" for c in _targets()}).to_csv(
        root / "train.csv", index=False
    )
    pd.DataFrame(descs, columns=["study_id", "series_id", "series_description"]).to_csv(
        root / "train_series_descriptions.csv", index=False
    )
    df = pd.DataFrame(
        coords, columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    )
    df["condition"] = df["condition"].map(condition_to_title)
    df["level"] = df["level"].map(level_to_title)
    df.to_csv(root / "train_label_coordinates.csv", index=False)
    return truth


def _targets():
    from lsdc.constants import TARGETS

    return TARGETS


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """(root, truth) of a 6-study tiny dataset (5 with coordinates), written once per session."""
    root = tmp_path_factory.mktemp("tiny_rsna")
    return root, write_tiny_dataset(root)
