"""Axial series stored the other way round (row direction toward patient right, column direction
toward anterior) must give the same crops and keypoints as the standard orientation, up to the
known mirror: the axial ROI is fitted and applied in the canonical frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lsdc.constants import AXIAL_T2, SERIES_TYPES
from lsdc.preprocess.crops import canonical_flips, flip_window
from lsdc.synth import generate_dataset

FLIPS = ("none", "rows", "cols")


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("axial_flip")
    return {
        f: generate_dataset(
            root / f,
            train_studies=2,
            test_studies=0,
            size=64,
            seed=11,
            coords_fraction=1.0,
            progress=False,
            axial_flip=f,
        )
        for f in FLIPS
    }


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_phantom_option_changes_only_the_axial_storage(phantoms: dict[str, Path]) -> None:
    from lsdc.geometry import orientation_label
    from lsdc.io.dicom import read_header

    for flip, expected in (
        ("none", (False, False)),
        ("rows", (False, True)),
        ("cols", (True, False)),
    ):
        files = sorted((phantoms[flip] / "train_images").rglob("*.dcm"))
        headers = [read_header(p) for p in files]
        axial = [h for h in headers if orientation_label(h.orientation) == "axial"]
        assert axial and all(canonical_flips(h.orientation, AXIAL_T2) == expected for h in axial)
    # Same tables (coordinates aside): the labels and series are those of the default phantom.
    for name in ("train.csv", "train_series_descriptions.csv"):
        assert (phantoms["rows"] / name).read_text() == (phantoms["none"] / name).read_text()


def test_axial_roi_is_fitted_in_the_canonical_frame(phantoms: dict[str, Path]) -> None:
    from lsdc.preprocess.multitask import axial_roi_from_coordinates, dataset_labels

    rois = {f: axial_roi_from_coordinates(p, dataset_labels(str(p))) for f, p in phantoms.items()}
    ref = rois["none"]
    assert ref.center_y > 0.5 + 0.05  # the canal sits posterior: a mirrored fit would show
    for f in ("rows", "cols"):
        got = rois[f]
        assert got.num_points == ref.num_points
        for k in ("center_x", "center_y", "half_width", "half_height"):
            assert getattr(got, k) == pytest.approx(getattr(ref, k), abs=1e-6), (f, k)


def test_multitask_crops_and_keypoints_match_the_standard(
    phantoms: dict[str, Path], tmp_path: Path
) -> None:
    from lsdc.preprocess.multitask import load_multitask_study, preprocess_dataset

    overrides = ["crop_size=48", "hires_max=64", "selection.prefer_labelled=true"]
    crops = {}
    for f, data in phantoms.items():
        preprocess_dataset(data, tmp_path / f, overrides=overrides, progress=False)
        crops[f] = {
            (sid, c.key): c
            for sid in sorted(int(p.name) for p in (data / "train_images").iterdir())
            for c in load_multitask_study(tmp_path / f, sid)
            if c.series_type == AXIAL_T2 and c.present
        }
    assert crops["none"]
    for f in ("rows", "cols"):
        assert crops[f].keys() == crops["none"].keys()
        for key, std in crops["none"].items():
            got = crops[f][key]
            assert std.flips == (False, False)
            flips = canonical_flips(got.orientations[1], AXIAL_T2)
            assert got.flips == flips and any(flips)
            # The window covers the same anatomy: the standard one, mirrored on the native grid.
            shape = tuple(std.volume_shape[1:])
            assert got.window == flip_window(std.window, shape, flips), (f, key)
            # Crops are canonical: keypoints and images as for the standard orientation.
            np.testing.assert_array_equal(got.keypoint_mask, std.keypoint_mask)
            np.testing.assert_allclose(got.keypoints, std.keypoints, atol=1e-3)
            assert _corr(got.image[1], std.image[1]) > 0.9, (f, key)
            assert _corr(got.hires[1], std.hires[1]) > 0.9, (f, key)
            # And they map back onto each series' own native pixels.
            known = std.keypoint_mask
            native = got.to_native(got.keypoints[known])
            np.testing.assert_allclose(native, got.keypoint_native[known], atol=1e-3)
            # (noise is drawn per stored pixel, so images correlate rather than match)


def test_sequence_axial_stack_matches_the_standard(
    phantoms: dict[str, Path], tmp_path: Path
) -> None:
    from lsdc.fileio import load_npz
    from lsdc.preprocess.multitask import axial_roi_from_coordinates, dataset_labels
    from lsdc.preprocess.sequence import preprocess_dataset

    images = {}
    for f, data in phantoms.items():
        roi = axial_roi_from_coordinates(data, dataset_labels(str(data)))
        roi_path = roi.save(tmp_path / f"{f}_roi.json")
        cache = tmp_path / f"seq_{f}"
        overrides = ["size=48", "num_slices=4", f"axial_roi_path={roi_path}"]
        preprocess_dataset(data, cache, overrides=overrides, progress=False)
        images[f] = {p.stem: load_npz(p)[0]["images"] for p in sorted(cache.glob("*.npz"))}
    ti = SERIES_TYPES.index(AXIAL_T2)
    for f in ("rows", "cols"):
        for sid, std in images["none"].items():
            assert _corr(images[f][sid][ti].astype(float), std[ti].astype(float)) > 0.9, (f, sid)
