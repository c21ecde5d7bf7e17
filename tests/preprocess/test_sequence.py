"""Sequence preprocessing: slice ordering, even spacing, axial merging, canonical frame, masks."""

from __future__ import annotations

import numpy as np
import pytest

from lsdc.config import load_config
from lsdc.constants import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, SERIES_TYPES
from lsdc.io.dicom import Series
from lsdc.io.study import Study
from lsdc.preprocess.crops import SagittalRoiConfig
from lsdc.preprocess.sequence import (
    SequencePreprocessConfig,
    build_study_arrays,
    canonical_flips,
    even_indices,
    process_type,
    sample_stack,
)

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # columns -> posterior, rows -> feet
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # columns -> patient left, rows -> posterior


def make_series(
    series_id: int,
    coords: list[float],
    *,
    series_type: str,
    orientation=None,
    size: int = 32,
) -> Series:
    """A series whose slice k is filled with the value coords[k] (so samples are traceable);
    slice positions lie at coords along x (sagittal) or z (axial), in the given (any) order."""
    sagittal = series_type != AXIAL_T2
    orientation = orientation or (SAGITTAL if sagittal else AXIAL)
    coords = np.asarray(coords, np.float64)
    pos = np.zeros((len(coords), 3))
    pos[:, 0 if sagittal else 2] = coords
    vol = np.broadcast_to(coords[:, None, None], (len(coords), size, size)).astype(np.float32)
    return Series(
        study_id=1,
        series_id=series_id,
        volume=vol.copy(),
        instance_numbers=np.arange(1, len(coords) + 1),
        positions=pos,
        orientation=np.asarray(orientation, np.float64),
        pixel_spacing=(1.0, 1.0),
        slice_thickness=3.0,
        spacing_between_slices=3.0,
        orientation_label="sagittal" if sagittal else "axial",
        series_type=series_type,
    )


@pytest.mark.parametrize("n", [1, 3, 7, 10, 11, 17, 40])
def test_even_indices_span_the_stack_evenly(n):
    idx = even_indices(n, 10)
    assert idx.shape == (10,)
    assert idx[0] == 0 and idx[-1] == n - 1
    np.testing.assert_allclose(np.diff(idx), (n - 1) / 9)


@pytest.mark.parametrize("n", [1, 4, 9, 10, 23])
def test_nearest_sampling_repeats_short_stacks_in_order(n):
    stack = np.arange(n, dtype=np.float32)[:, None, None] * np.ones((1, 4, 4), np.float32)
    out, idx, pos = sample_stack(stack, np.arange(n, dtype=np.float64) * 2, 10, interpolate=False)
    assert out.shape == (10, 4, 4)
    values = out[:, 0, 0]
    assert np.all(np.diff(values) >= 0), "slices stay in position order"
    assert values[0] == 0 and values[-1] == n - 1
    assert set(values.astype(int)) == set(range(n)) if n <= 10 else len(set(values)) == 10
    np.testing.assert_array_equal(pos, idx * 2)


def test_interpolated_sampling_blends_neighbours():
    stack = np.array([0.0, 10.0, 20.0], np.float32)[:, None, None] * np.ones((1, 2, 2), np.float32)
    out, idx, pos = sample_stack(stack, np.array([0.0, 5.0, 10.0]), 5, interpolate=True)
    np.testing.assert_allclose(out[:, 0, 0], [0, 5, 10, 15, 20], atol=1e-5)
    np.testing.assert_allclose(pos, [0, 2.5, 5, 7.5, 10])


def test_slices_are_ordered_by_position_not_by_instance():
    # positions shuffled relative to storage order, right->left means ascending x
    coords = [12.0, -6.0, 0.0, 30.0, -18.0, 6.0]
    cfg = SequencePreprocessConfig(num_slices=6, size=16)
    out = process_type([make_series(5, coords, series_type=SAGITTAL_T2)], SAGITTAL_T2, cfg)
    np.testing.assert_allclose(out.positions, sorted(coords))
    # per-series intensity normalisation keeps the order of the fill values
    centre = out.slices[:, 8, 8]
    assert np.all(np.diff(centre) > 0)


def test_sagittal_order_is_patient_right_to_left_whatever_the_normal():
    # a flipped orientation (columns -> anterior) has its normal along -x; the stack must still
    # run along +x and the image must be mirrored back into the canonical frame
    flipped = (0.0, -1.0, 0.0, 0.0, 0.0, -1.0)
    coords = [0.0, 4.0, 8.0, 12.0]
    cfg = SequencePreprocessConfig(num_slices=4, size=16)
    out = process_type(
        [make_series(5, coords, series_type=SAGITTAL_T1, orientation=flipped)], SAGITTAL_T1, cfg
    )
    np.testing.assert_allclose(out.positions, coords)
    assert canonical_flips(flipped, SAGITTAL_T1) == (False, True)
    assert canonical_flips(SAGITTAL, SAGITTAL_T1) == (False, False)
    assert canonical_flips((1.0, 0.0, 0.0, 0.0, -1.0, 0.0), AXIAL_T2) == (True, False)
    assert canonical_flips((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), AXIAL_T2) == (False, True)


def test_canonical_flip_mirrors_axial_columns():
    ser = make_series(7, [0.0, -4.0], series_type=AXIAL_T2)
    ser.volume[:] = np.linspace(0, 1, 32)[None, None, :]  # brighter towards +x (patient left)
    mirrored = make_series(8, [0.0, -4.0], series_type=AXIAL_T2, orientation=(-1, 0, 0, 0, 1, 0))
    mirrored.volume[:] = np.linspace(1, 0, 32)[None, None, :]  # same anatomy, columns reversed
    cfg = SequencePreprocessConfig(num_slices=2, size=16)
    a = process_type([ser], AXIAL_T2, cfg).slices
    b = process_type([mirrored], AXIAL_T2, cfg).slices
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert a[0, 8, -2] > a[0, 8, 1]


def test_axial_series_are_merged_by_position_head_to_feet():
    upper = make_series(11, [40.0, 36.0, 32.0, 28.0], series_type=AXIAL_T2)
    lower = make_series(12, [-10.0, -6.0, -2.0, 2.0, -14.0], series_type=AXIAL_T2)
    cfg = SequencePreprocessConfig(num_slices=10, size=16)
    out = process_type([lower, upper], AXIAL_T2, cfg)
    assert out.num_source_slices == 9
    assert sorted(out.series_ids) == [11, 12]
    # ordering axis for axial is -z: superior first; coordinates are along -z
    z = -out.positions
    assert z[0] == 40.0 and z[-1] == -14.0
    assert np.all(np.diff(z) <= 0)
    merged = [40, 36, 32, 28, 2, -2, -6, -10, -14]
    np.testing.assert_allclose(z, [merged[int(i)] for i in out.source_indices])


def test_largest_sagittal_series_is_used():
    small = make_series(3, [0.0, 3.0, 6.0], series_type=SAGITTAL_T1)
    big = make_series(4, [0.0, 2.0, 4.0, 6.0, 8.0], series_type=SAGITTAL_T1)
    out = process_type([small, big], SAGITTAL_T1, SequencePreprocessConfig(size=16))
    assert out.series_ids == [4]


def test_missing_series_type_is_masked_and_zero():
    study = Study(
        1,
        [
            make_series(1, list(np.arange(15.0)), series_type=SAGITTAL_T1),
            make_series(2, list(np.arange(0.0, 6.0)), series_type=AXIAL_T2),
        ],
    )
    labels = [0] * 20 + [2, -1, 1, 0, 0]
    arrays, meta = build_study_arrays(study, SequencePreprocessConfig(size=24), labels)
    assert arrays["images"].shape == (3, 10, 24, 24) and arrays["images"].dtype == np.uint8
    t2 = SERIES_TYPES.index(SAGITTAL_T2)
    np.testing.assert_array_equal(arrays["series_mask"], [i != t2 for i in range(3)])
    assert arrays["images"][t2].max() == 0
    assert np.isnan(arrays["slice_positions"][t2]).all()
    assert arrays["labels"].tolist() == labels
    assert set(meta["series"]) == {SAGITTAL_T1, AXIAL_T2}
    assert arrays["images"][0].max() == 255  # percentile normalisation uses the full range


def test_tall_sagittal_window_keeps_body_and_canal(toy_sagittal):
    """`sagittal_roi.aspect=0.6` (measured in the demo preset): the spine fills the field of
    view top to bottom, and the tall crop still keeps the vertebral bodies and the canal behind
    them while sampling them more finely across (AP) than a square window does."""
    from lsdc.preprocess.crops import sagittal_roi

    vol, _ = toy_sagittal(size=128)
    cfg = load_config(SequencePreprocessConfig, None, ["sagittal_roi.aspect=0.6"])
    y0, y1, x0, x1 = sagittal_roi(vol, cfg.sagittal_roi)
    assert x1 - x0 < 0.75 * (y1 - y0)
    # toy anatomy: bodies from 0.36 w, canal up to 0.65 w
    assert x0 <= int(0.36 * 128) and x1 >= int(0.65 * 128)
    sy0, sy1, sx0, sx1 = sagittal_roi(vol, SagittalRoiConfig(aspect=1.0))
    assert (sx1 - sx0) > 1.3 * (x1 - x0)


# --------------------------------------------------------------------------- from DICOM files


def _write_dataset(root, size=40):
    """Two studies as DICOM: study 1 has all types and two axial series, study 2 lacks
    Sagittal T2/STIR; instance numbers are shuffled against position."""
    import pandas as pd

    from lsdc.constants import SEVERITIES, TARGETS
    from lsdc.io.dicomwrite import write_slice

    rng = np.random.default_rng(0)
    series_rows, label_rows = [], []
    plan = {
        1: [(10, SAGITTAL_T1, 7), (11, SAGITTAL_T2, 5), (12, AXIAL_T2, 4), (13, AXIAL_T2, 3)],
        2: [(20, SAGITTAL_T1, 12), (22, AXIAL_T2, 6)],
    }
    for study_id, series in plan.items():
        for series_id, kind, n in series:
            axial = kind == AXIAL_T2
            orient = AXIAL if axial else SAGITTAL
            base = 100.0 * (series_id % 10)  # separate axial series in z
            order = rng.permutation(n)
            for k in range(n):
                coord = base - 4.0 * k if axial else -15.0 + 5.0 * k
                pos = [0.0, -20.0, coord] if axial else [coord, -20.0, 20.0]
                # pixel value encodes the position so order can be checked after crop/normalise
                px = np.full((size, size), 100 + 10 * k, np.uint16)
                px[: size // 2] += 5  # some structure so percentiles are not degenerate
                write_slice(
                    root / "train_images" / str(study_id) / str(series_id) / f"{order[k] + 1}.dcm",
                    px,
                    study_id=study_id,
                    series_id=series_id,
                    instance_number=int(order[k] + 1),
                    position=pos,
                    orientation=orient,
                    pixel_spacing=(1.0, 1.0),
                    slice_thickness=4.0,
                    series_description=kind,
                )
            series_rows.append((study_id, series_id, kind))
        labels = rng.choice(SEVERITIES, size=len(TARGETS)).tolist()
        labels[3] = ""
        label_rows.append([study_id, *labels])
    pd.DataFrame(series_rows, columns=["study_id", "series_id", "series_description"]).to_csv(
        root / "train_series_descriptions.csv", index=False
    )
    pd.DataFrame(label_rows, columns=["study_id", *TARGETS]).to_csv(root / "train.csv", index=False)
    return root


def test_preprocess_dataset_from_dicom_and_resume(tmp_path):
    from lsdc.constants import SEVERITY_INDEX
    from lsdc.io.tables import read_train_labels
    from lsdc.preprocess.cache import StudyCache
    from lsdc.preprocess.sequence import preprocess_dataset

    data = _write_dataset(tmp_path / "data")
    cache_dir = tmp_path / "cache"
    report = preprocess_dataset(
        data, cache_dir, overrides=["size=24", "interpolate=false"], progress=False
    )
    assert report.written == [1, 2] and not report.failed
    cache = StudyCache.open(cache_dir)
    arrays, meta = cache.load(1)
    assert arrays["images"].shape == (3, 10, 24, 24)
    assert arrays["series_mask"].tolist() == [True, True, True]
    wide = read_train_labels(data / "train.csv").set_index("study_id")
    expected = [SEVERITY_INDEX[v] if isinstance(v, str) else -1 for v in wide.loc[1]]
    assert arrays["labels"].tolist() == expected and expected[3] == -1
    # axial: both series merged (4 + 3 slices), head to feet
    ax = meta["series"][AXIAL_T2]
    assert sorted(ax["series_ids"]) == [12, 13] and ax["num_source_slices"] == 7
    z = -arrays["slice_positions"][2]
    assert np.all(np.diff(z) <= 0) and z[0] == 300.0 and z[-1] == 188.0
    # sagittal: ordered right -> left (x ascending) regardless of instance numbers
    x = arrays["slice_positions"][0]
    assert x[0] == -15.0 and x[-1] == 15.0 and np.all(np.diff(x) >= 0)
    t1 = arrays["images"][0].astype(float).mean(axis=(1, 2))
    assert np.all(np.diff(t1) >= 0), "brightness grows with position, so with slice order"

    arrays2, _ = cache.load(2)
    assert arrays2["series_mask"].tolist() == [True, False, True]
    assert arrays2["images"][1].max() == 0

    again = preprocess_dataset(data, cache_dir, overrides=["size=24"], progress=False)
    assert again.skipped == [1, 2] and not again.written


def test_cli_preprocess_sequence(tmp_path):
    from typer.testing import CliRunner

    from lsdc.cli import app

    data = _write_dataset(tmp_path / "data", size=32)
    cache_dir = tmp_path / "cache"
    result = CliRunner().invoke(
        app,
        ["preprocess", str(data), "--pipeline", "sequence", "--cache", str(cache_dir), "size=16"],
    )
    assert result.exit_code == 0, result.output
    assert "2 written" in result.output


def test_viz_sequence_writes_png(tmp_path):
    from typer.testing import CliRunner

    from lsdc.cli import app
    from lsdc.preprocess.sequence import preprocess_dataset

    data = _write_dataset(tmp_path / "data", size=32)
    preprocess_dataset(data, tmp_path / "cache", overrides=["size=16"], progress=False)
    png = tmp_path / "study.png"
    result = CliRunner().invoke(
        app, ["viz", "sequence", str(tmp_path / "cache"), "2", "--out", str(png)]
    )
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError, match="not in the cache"):
        from lsdc.preprocess.sequence import plot_sequence_study

        plot_sequence_study(tmp_path / "cache", 99, png)
