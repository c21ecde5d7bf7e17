"""Slice-relevance inference at scale (issue 10): features computed per stack and members
predicted per series select the same slices, with the same bits, as the per-slice reference."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from lsdc.constants import AXIAL_T2, SAGITTAL_T1
from lsdc.preprocess.slice_relevance import (
    ENSEMBLE,
    FeatureConfig,
    dataset_descriptions,
    load_models,
    predict_slices,
    series_features,
    series_slug,
    slice_features,
    soft_vote,
    train_slice_relevance,
)
from lsdc.preprocess.slice_relevance.features import (
    hog_stack,
    lbp_uniform,
    row_percentiles,
    volume_percentiles,
)

FAST = ["folds=2", "models.rf_trees=40", "models.xgb_trees=30", "models.mlp_max_iter=200"]
SAG_ORIENT = np.array([0.0, 1.0, 0.0, 0.0, 0.0, -1.0])


# --------------------------------------------------------------------------- features


def test_stacked_lbp_equals_scikit_image():
    from skimage.feature import local_binary_pattern

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(3, 24, 20)).astype(np.uint8)
    stacks = [noise, (noise // 64 * 64).astype(np.uint8), np.full((2, 9, 9), 7, np.uint8)]
    for stack in stacks:
        for radius in (1, 2, 3):
            ref = np.stack([local_binary_pattern(im, 8, radius, method="uniform") for im in stack])
            np.testing.assert_array_equal(lbp_uniform(stack, 8, radius), ref)


def test_volume_and_row_percentiles_equal_numpy():
    rng = np.random.default_rng(0)
    shape = (5, 130, 110)
    volumes = [
        rng.integers(0, 4000, shape).astype(np.float32),  # MR-like: integers, many ties
        rng.integers(0, 3, shape).astype(np.float32),  # almost all ties
        (rng.random(shape) * 1000).astype(np.float32),
        np.abs(rng.normal(0, 1, shape)).astype(np.float32) ** 3,  # many octaves
        rng.normal(0, 1, shape).astype(np.float32),  # negative values: numpy's own path
        np.where(rng.random(shape) < 0.01, np.nan, 1.0).astype(np.float32),  # NaN: numpy's
        rng.random((3, 20, 20)).astype(np.float32),  # small: numpy's
    ]
    for vol in volumes:
        for q in ([1.0, 99.5], [5, 25, 50, 75, 95], [0, 100], np.linspace(0.3, 99.7, 41)):
            ref = np.percentile(vol, q)
            got = volume_percentiles(vol, q)
            assert got.dtype == ref.dtype and got.tobytes() == ref.tobytes(), q
            rows = vol.reshape(len(vol), -1)[:, :4096]  # the feature crops' percentiles
            ref = np.percentile(rows, q, axis=1)
            got = row_percentiles(rows, q)
            assert got.dtype == ref.dtype and got.tobytes() == ref.tobytes(), q


def test_stacked_hog_equals_scikit_image():
    from skimage.feature import hog

    rng = np.random.default_rng(0)
    noise = rng.random((4, 64, 64)).astype(np.float32)
    # Tiny negative row gradients against unit column gradients: angles a hair below 0, which
    # % 180 rounds to 180, in no bin.
    tiny = np.zeros((1, 64, 64), np.float32)
    tiny[0, :, 2::3] = 1.0
    tiny[0, :, 1::3] = -np.arange(64, dtype=np.float32)[:, None] * np.float32(1e-30)
    tiny[0, :, 0::3] = np.arange(64, dtype=np.float32)[:, None] / 4  # other bins beside them
    stacks = [
        tiny,
        noise,
        np.round(noise * 4) / 4,  # many equal neighbours: gradients 0 and angles on bin edges
        np.zeros((2, 64, 64), np.float32),
        rng.random((3, 70, 50)).astype(np.float32),  # cells do not tile the image
        rng.random((2, 48, 48)),  # float64 in, float64 out
        np.flip(noise, axis=1),  # horizontal edges of both signs: angles of exactly 180
    ]
    for stack in stacks:
        for orientations, cell, block in ((9, 16, 2), (8, 8, 3)):
            ref = np.stack([hog(im, orientations, (cell,) * 2, (block,) * 2) for im in stack])
            got = hog_stack(stack, orientations, cell, block)
            assert got.dtype == ref.dtype
            assert got.tobytes() == ref.tobytes()


def _reference_texture(img, cfg):
    """The per-slice texture features as computed before issue 10 (scikit-image's LBP, one
    percentile call per slice)."""
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

    from lsdc.preprocess.slice_relevance.features import _GLCM_PROPS

    n = img.shape[0]
    c0, c1 = n // 3, n - n // 3
    pct = np.percentile(img, [5, 25, 50, 75, 95])
    stats = [img.mean(), img.std(), *pct, (img > 0.6).mean(), img[c0:c1, c0:c1].mean()]
    stats += [img[c0:c1, c0:c1].std(), img[: n // 2].mean() - img[n // 2 :].mean()]
    stats += [img[:, : n // 2].mean() - img[:, n // 2 :].mean()]
    stats += [np.abs(np.diff(img, axis=0)).mean(), np.abs(np.diff(img, axis=1)).mean()]
    img_u8 = np.round(img * 255).astype(np.uint8)
    lbp = []
    for r in cfg.lbp_radii:
        codes = local_binary_pattern(img_u8, cfg.lbp_points, r, method="uniform")
        hist = np.bincount(codes.astype(np.int64).ravel(), minlength=cfg.lbp_points + 2)
        lbp.extend(hist[: cfg.lbp_points + 2] / codes.size)
    q = np.minimum((img * cfg.glcm_levels).astype(np.uint8), cfg.glcm_levels - 1)
    angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    glcm = graycomatrix(q, list(cfg.glcm_distances), angles, cfg.glcm_levels, True, True)
    props = [graycoprops(glcm, p).mean(axis=1) for p in _GLCM_PROPS]
    out = np.concatenate([np.asarray(stats), np.asarray(lbp), np.concatenate(props)])
    return np.nan_to_num(out.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _reference_image(img, cfg):
    """HOG and thumbnail of one image as computed before issue 10 (scikit-image per slice)."""
    from skimage.feature import hog

    cells, block = (cfg.hog_pixels_per_cell,) * 2, (cfg.hog_cells_per_block,) * 2
    parts = [hog(img, orientations=cfg.hog_orientations, pixels_per_cell=cells,
                 cells_per_block=block, feature_vector=True)]  # fmt: skip
    k = img.shape[0] // cfg.thumbnail
    t = img[: k * cfg.thumbnail, : k * cfg.thumbnail]
    parts.append(t.reshape(cfg.thumbnail, k, cfg.thumbnail, k).mean(axis=(1, 3)).ravel())
    return np.concatenate(parts).astype(np.float64)


def _reference_features(vol, pos, orientation, series_type, cfg, crop):
    """`slice_features` one slice at a time, as before issue 10 (`crop`: the per-image scipy
    `crop_and_resize` reference)."""
    from lsdc.preprocess.slice_relevance.features import (
        _position_features,
        feature_window,
        normalise_volume,
    )

    norm = normalise_volume(vol)
    window = feature_window(series_type, norm, cfg)
    crops = [np.clip(crop(im, window, cfg.image_size), 0, 1) for im in norm]
    compact = np.stack([_reference_texture(c, cfg) for c in crops])
    image = np.stack([_reference_image(c, cfg) for c in crops])
    zscore = (compact - compact.mean(axis=0)) / (compact.std(axis=0) + 1e-6)
    prev = np.vstack([compact[:1], compact[:-1]])
    nxt = np.vstack([compact[1:], compact[-1:]])
    ctx = [zscore, compact - prev, compact - nxt, _position_features(pos, orientation)]
    return np.concatenate([image, compact, *ctx], axis=1).astype(np.float32)


@pytest.mark.parametrize(
    ("size", "width", "slices", "series_type"),
    [(64, None, 6, SAGITTAL_T1), (128, 100, 9, SAGITTAL_T1), (96, None, 5, AXIAL_T2),
     (50, 70, 2, SAGITTAL_T1)],
)  # fmt: skip
def test_stack_features_have_the_bits_of_the_per_slice_reference(
    toy_sagittal, scipy_crop, size, width, slices, series_type
):
    vol, _ = toy_sagittal(size=size, slices=slices, width=width, seed=size)
    pos = np.c_[np.arange(slices) * 3.0, np.zeros(slices), np.zeros(slices)]
    cfg = FeatureConfig()
    feats = slice_features(vol, pos, SAG_ORIENT, series_type, cfg)
    ref = _reference_features(vol, pos, SAG_ORIENT, series_type, cfg, scipy_crop)
    assert feats.shape == ref.shape
    assert feats.tobytes() == ref.tobytes()


def test_features_of_phantom_series_have_the_bits_of_the_per_slice_reference(
    tiny_dataset, scipy_crop
):
    """Every series of the tiny phantom (all three types, real DICOM geometry)."""
    from lsdc.io.study import load_study

    root, _ = tiny_dataset
    cfg = FeatureConfig()
    for study_id, series_types in dataset_descriptions(str(root), "train").items():
        for s in load_study(root, study_id, descriptions=series_types).series:
            args = (s.volume, s.positions, s.orientation, s.series_type, cfg)
            ref = _reference_features(*args, scipy_crop)
            assert slice_features(*args).tobytes() == ref.tobytes(), (study_id, s.series_id)


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
    root, _ = tiny_dataset
    out = tmp_path_factory.mktemp("relevance_scale_run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train_slice_relevance(root, out, overrides=FAST, progress=False)
    return root, out


def test_predicted_slices_match_the_per_member_reference(run):
    """Inference (stacked features, forest without joblib, weight-0 members skipped) picks the
    same slices, with the same scores, as every member's own `predict_proba` and the vote."""
    from lsdc.io.study import load_study

    root, out = run
    for study_id in (1000, 1005):
        study = load_study(
            root, study_id, descriptions=dataset_descriptions(str(root), "train")[study_id]
        )
        pred = predict_slices(out, study)
        assert set(pred) == {s.series_id for s in study.series}
        for s in study.series:
            m = load_models(out / "models" / series_slug(s.series_type))
            f = series_features(s, FeatureConfig()).features
            k = 1 + len(m.tasks)
            members = {}
            for n, model in m.models.items():
                p = np.zeros((len(f), k))
                p[:, m.classes] = model.predict_proba(f)
                members[n] = p
            ref = soft_vote(members, m.weights)
            assert ref.tobytes() == m.predict_proba(f)[ENSEMBLE].tobytes()
            for j, task in enumerate(m.tasks, start=1):
                assert pred[s.series_id][task].slice_index == int(np.argmax(ref[:, j]))
                assert pred[s.series_id][task].scores.tobytes() == ref[:, j].tobytes()


def test_voting_only_load_skips_weight_0_members_with_the_same_bits(run, tmp_path):
    """Inference loads only the members that vote (the forest, usually weight 0, is most of a
    run's load time): a member of weight 0 is not even read, and the ensemble keeps its bits."""
    import json
    import shutil

    root, out = run
    folder = tmp_path / "axial_t2"
    shutil.copytree(out / "models" / "axial_t2", folder)
    index = json.loads((folder / "models.json").read_text())
    index["weights"] = {n: (0.0 if n == "random_forest" else 1.0 + k) for k, n in
                        enumerate(index["weights"])}  # fmt: skip
    (folder / "models.json").write_text(json.dumps(index))
    full = load_models(folder)
    (folder / index["files"]["random_forest"]).unlink()  # never opened by a voting-only load
    voting = load_models(folder, voting_only=True)
    assert "random_forest" not in voting.models and voting.weights == full.weights
    x = np.random.default_rng(0).normal(size=(7, full.models["mlp"].n_features_in_))
    ref = full.predict_proba(x)[ENSEMBLE]
    assert voting.ensemble_proba(x).tobytes() == ref.tobytes()
    assert voting.ensemble_proba(x).tobytes() == full.ensemble_proba(x).tobytes()


_LOAD_IN_FRESH_PROCESS = """
import importlib.util, json, sys
from lsdc.preprocess.slice_relevance import load_models
load_models(sys.argv[1], voting_only=True)
from skops.io._trusted_types import SKLEARN_ESTIMATOR_TYPE_NAMES
print(json.dumps({
    "imported": sorted(m for m in ("torch", "dask") if m in sys.modules),
    "importable": [importlib.util.find_spec(m) is not None for m in ("torch", "dask")],
    "trusted": sorted(SKLEARN_ESTIMATOR_TYPE_NAMES),
}))
"""
_PLAIN_SKOPS = """
import json
from skops.io._trusted_types import SKLEARN_ESTIMATOR_TYPE_NAMES
print(json.dumps(sorted(SKLEARN_ESTIMATOR_TYPE_NAMES)))
"""


def test_loading_models_imports_neither_torch_nor_dask(run):
    """A preprocessing worker that loads a run does not pay for torch and dask (which skops'
    estimator listing would import), trusts the same scikit-learn types as a plain skops
    import, and leaves both packages importable afterwards."""
    import json
    import subprocess
    import sys

    _, out = run

    def python(code: str, *args: str) -> object:
        done = subprocess.run(
            [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True
        )
        return json.loads(done.stdout.strip().splitlines()[-1])

    import importlib.util

    got = python(_LOAD_IN_FRESH_PROCESS, str(out / "models" / "axial_t2"))
    assert got["imported"] == []
    assert got["importable"] == [importlib.util.find_spec(m) is not None for m in ("torch", "dask")]
    assert got["trusted"] == python(_PLAIN_SKOPS)
