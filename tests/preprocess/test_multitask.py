"""Multitask preprocessing: 3-slice crops, keypoints, cache behaviour."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from lsdc.preprocess.cache import StudyCache
from lsdc.preprocess.multitask import (
    coordinate_table,
    keypoint_names,
    load_multitask_study,
    preprocess_dataset,
)

MIDDLE = ["crop_size=48", "selection.without_prediction=middle", "selection.prefer_labelled=true"]


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.npz"))}


@pytest.fixture(scope="module")
def cache_dir(tiny_dataset, tmp_path_factory):
    root, _ = tiny_dataset
    out = tmp_path_factory.mktemp("mt_cache")
    report = preprocess_dataset(root, out, overrides=MIDDLE, progress=False)
    assert report.failed == {}
    return out


def test_every_study_is_cached_with_all_tasks(cache_dir):
    assert StudyCache.open(cache_dir).study_ids() == [1000, 1001, 1002, 1003, 1004, 1005]
    crops = load_multitask_study(cache_dir, 1000)
    assert [c.key for c in crops] == [
        "sagittal_t1__left_neural_foraminal_narrowing",
        "sagittal_t1__right_neural_foraminal_narrowing",
        "sagittal_t2_stir__spinal_canal_stenosis",
        "axial_t2__l1_l2",
        "axial_t2__l2_l3",
        "axial_t2__l3_l4",
        "axial_t2__l4_l5",
        "axial_t2__l5_s1",
    ]
    for c in crops:
        assert c.image.shape == (3, 48, 48) and c.present and c.source == "labelled"
        assert c.image.min() >= 0.0 and c.image.max() <= 1.0
        assert len(c.keypoint_names) == len(keypoint_names(c.series_type, c.task))


def test_neighbours_are_position_ordered_and_clamped(cache_dir):
    for c in load_multitask_study(cache_dir, 1002):
        i = c.slice_indices
        assert i[0] <= i[1] <= i[2] and i[2] - i[0] <= 2
        assert i[0] == max(i[1] - 1, 0)


def test_crops_contain_all_labelled_points_and_map_back(cache_dir):
    table = coordinate_table(cache_dir)
    labelled = table[table.study_id != 1005]
    assert len(labelled) == 5 * (5 + 5 + 5 + 5 * 2) and labelled.valid.all()
    assert not table[table.study_id == 1005].valid.any()  # no coordinates: all masked
    for c in load_multitask_study(cache_dir, 1003):
        back = c.to_native(c.keypoints)
        assert np.abs(back - c.keypoint_native).max() < 0.5
        assert (c.keypoint_slice_offset == 0).all()  # crops centred on the labelled slice


def test_unlabelled_study_uses_the_configured_middle_slice(cache_dir):
    for c in load_multitask_study(cache_dir, 1005):
        assert c.source == "middle" and not c.keypoint_mask.any()


def test_missing_relevance_run_is_an_error_unless_configured(tiny_dataset, tmp_path):
    root, _ = tiny_dataset
    with pytest.raises(ValueError, match="relevance-run"):
        preprocess_dataset(root, tmp_path / "c", overrides=["crop_size=48"], progress=False)


def test_rerun_skips_and_resumed_run_is_identical(tiny_dataset, cache_dir, tmp_path):
    root, _ = tiny_dataset
    again = preprocess_dataset(root, cache_dir, overrides=MIDDLE, progress=False)
    assert again.written == [] and len(again.skipped) == 6
    # A run stopped after two studies, then resumed, equals the uninterrupted run byte for byte.
    part = tmp_path / "part"
    first = preprocess_dataset(root, part, overrides=MIDDLE, progress=False, study_ids=[1001, 1004])
    assert first.written == [1001, 1004]
    (part / "1004.npz").unlink()  # as if killed before this file was renamed into place
    rest = preprocess_dataset(root, part, overrides=MIDDLE, progress=False)
    assert rest.skipped == [1001] and len(rest.written) == 5
    assert _files(part) == _files(cache_dir)


def test_changed_config_in_the_same_folder_is_refused(tiny_dataset, cache_dir):
    from lsdc.preprocess.cache import CacheMismatchError

    root, _ = tiny_dataset
    with pytest.raises(CacheMismatchError):
        preprocess_dataset(root, cache_dir, overrides=[*MIDDLE, "crop_size=32"], progress=False)


@pytest.mark.slow
def test_killed_process_resumes_to_identical_files(tiny_dataset, cache_dir, tmp_path):
    root, _ = tiny_dataset
    out = tmp_path / "killed"
    code = (
        "from lsdc.preprocess.multitask import preprocess_dataset\n"
        f"preprocess_dataset({str(root)!r}, {str(out)!r}, overrides={MIDDLE!r}, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("*.npz")) and proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail("no study written within 120 s")
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    done = len(list(out.glob("*.npz")))
    report = preprocess_dataset(root, out, overrides=MIDDLE, progress=False)
    assert len(report.skipped) == done and not report.failed
    assert not list(out.glob(".*.tmp"))  # no half-written file left under a final name
    assert _files(out) == _files(cache_dir)


def test_a_coordinate_on_a_missing_instance_drops_only_that_label(tiny_dataset, tmp_path, capsys):
    import shutil

    import pandas as pd

    root, _ = tiny_dataset
    data = tmp_path / "data"
    shutil.copytree(root, data)
    coords = pd.read_csv(data / "train_label_coordinates.csv")
    l1 = (coords.study_id == 1000) & (coords.level == "L1/L2")
    row = l1 & (coords.condition == "Spinal Canal Stenosis")
    # Every label of the axial L1/L2 crop too: no labelled slice is left to centre it on.
    axial = l1 & coords.condition.str.contains("Subarticular")
    assert row.sum() == 1 and axial.sum() == 2
    coords.loc[row | axial, "instance_number"] = 9999
    coords.to_csv(data / "train_label_coordinates.csv", index=False)

    cache = tmp_path / "cache"
    report = preprocess_dataset(data, cache, overrides=MIDDLE, progress=False, workers=1)
    assert report.failed == {} and 1000 in report.written
    table = coordinate_table(cache)
    study = table[table.study_id == 1000].set_index("name")
    assert not study.loc["spinal_canal_stenosis_l1_l2", "valid"]
    assert study.valid.sum() == 22  # every other label of the study is kept
    _, meta = StudyCache.open(cache).load(1000)
    assert len(meta["dropped_labels"]) == 3
    assert (
        f"spinal_canal_stenosis l1_l2: series {coords.loc[row, 'series_id'].item()} "
        "has no readable instance 9999"
    ) in meta["dropped_labels"]
    axial_crop = next(c for c in load_multitask_study(cache, 1000) if c.key == "axial_t2__l1_l2")
    assert axial_crop.present and axial_crop.source == "middle"
    assert "coordinate dropped" in capsys.readouterr().err


def test_pool_workers_given_the_relevance_models_write_the_same_files(tiny_dataset, tmp_path):
    """With a relevance run and a pool, the models loaded once in this process are handed to
    the workers (`run_models_initializer`); the files are those of one in-process worker."""
    import warnings

    from lsdc.preprocess.slice_relevance import train_slice_relevance

    root, _ = tiny_dataset
    run = tmp_path / "run"
    fast = ["folds=2", "models.rf_trees=20", "models.xgb_trees=20", "models.mlp_max_iter=100"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train_slice_relevance(root, run, overrides=fast, progress=False)
    caches = {}
    for workers in (1, 2):
        caches[workers] = tmp_path / f"w{workers}"
        report = preprocess_dataset(
            root, caches[workers], overrides=["crop_size=48"], relevance_run=run,
            workers=workers, progress=False,
        )  # fmt: skip
        assert report.failed == {} and len(report.written) == 6
    assert _files(caches[1]) == _files(caches[2])
