"""Slice relevance: which slice of a series shows a condition best (DESIGN §4, multitask step 1).

Input: studies (`Study`) and, for training, the coordinate table, whose instance numbers mark the
slice a radiologist labelled. Output: for every series and *task* (a condition on sagittal series;
a level on axial series, shared by left and right subarticular stenosis) the sorted slice index
with the highest relevance.

- Features per slice (`slice_features`): HOG, LBP histograms, GLCM properties of a quantised
  image, intensity statistics, a coarse thumbnail, the slice's position in the stack (patient
  axis, mm and rank), and series context (z-scores within the series and differences to both
  neighbours). Computed on the region of interest: `sagittal_roi` on sagittal series, a centred
  box on axial ones (the fitted axial ROI is an *output* of training, so it cannot be an input).
- One multi-class model per series type: class 0 = "not a labelled slice", class k = task k. The
  slice predicted for task k is the argmax over the series' slices of P(class k).
- Base models RandomForest, SVM (probabilities), MLP, XGBoost; the ensemble is their soft vote.
- Study-wise cross-validation gives exact and +-1-slice accuracy per series type for each base
  model, the ensemble and the middle-slice baseline.

Persistence and trust boundary: scikit-learn models are saved with skops and loaded with an
explicit list of trusted types (skops' default-trusted scikit-learn/numpy types plus
`TRUSTED_SKOPS_TYPES`); a file asking for any other type is refused before anything is
constructed. XGBoost models are saved as XGBoost JSON. Nothing in a run folder is unpickled, so
loading one runs no code of its author; what remains to trust is the skops and XGBoost parsers
and the listed scikit-learn classes.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lsdc.config import config_to_dict, load_config, save_config
from lsdc.constants import AXIAL_T2, CONDITION_SERIES, LEVELS, SERIES_TYPES
from lsdc.fileio import atomic_write_json, atomic_write_text
from lsdc.parallel import parallel_map
from lsdc.preprocess.crops import (
    AxialRoi,
    SagittalRoiConfig,
    Window,
    canonical_axial_fraction,
    crop_and_resize,
    fit_axial_roi,
    sagittal_roi,
)

MODEL_NAMES: tuple[str, ...] = ("random_forest", "svm", "mlp", "xgboost")
ENSEMBLE = "ensemble"
BASELINE = "middle_slice"
FEATURE_PIPELINE = "slice-relevance-features"
# Part of the feature cache's configuration hash: 2 added each series' orientation (the axial
# ROI is fitted in the canonical frame), so caches without it are refused, not misread.
FEATURE_CACHE_FORMAT = 2
# The ensemble's out-of-fold slice per (study, series, task) of the CV: what a model that never
# saw the study predicts, so training crops are selected the way test crops are.
OOF_SLICES_FILE = "oof_slices.csv"
OOF_SLICE_COLUMNS = (
    "study_id", "series_id", "series_type", "task", "fold", "slice_index", "num_slices",
    "probability",
)  # fmt: skip

# XGBoost's OpenMP runtime is not fork-safe: once a process has run XGBoost, a forked child
# (lsdc.parallel uses fork on Linux) that runs XGBoost again can hang for ever. Pools whose
# workers run XGBoost therefore check this flag (`fork_safe_workers`).
_XGBOOST_RAN_HERE = False


def _xgboost_runs_here() -> None:
    global _XGBOOST_RAN_HERE
    _XGBOOST_RAN_HERE = True


def fork_safe_workers(workers: int, what: str) -> int:
    """`workers`, or 1 (with a warning) when this process has already run XGBoost, so that a
    pool of forked workers running XGBoost cannot deadlock. Results are the same either way."""
    if workers > 1 and _XGBOOST_RAN_HERE:
        import warnings

        warnings.warn(
            f"{what}: this process already ran XGBoost, whose OpenMP runtime hangs in forked "
            "workers; running in 1 process (start a fresh process to use more)",
            RuntimeWarning,
            stacklevel=3,
        )
        return 1
    return workers


# Types beyond skops' default-trusted set (scikit-learn estimators, numpy and builtins) that the
# model files of this package contain. A file asking for any other type is refused at load time.
TRUSTED_SKOPS_TYPES: tuple[str, ...] = (
    "sklearn.tree._tree.Tree",
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
)


# --------------------------------------------------------------------------- tasks


def series_slug(series_type: str) -> str:
    """A file- and key-safe name for a series type: `Sagittal T2/STIR` -> `sagittal_t2_stir`."""
    return re.sub(r"[^a-z0-9]+", "_", series_type.lower()).strip("_")


def tasks_for(series_type: str) -> tuple[str, ...]:
    """The slice-relevance tasks of a series type: the conditions labelled on a sagittal type,
    the levels on the axial type (left and right subarticular share the slice of a level)."""
    if series_type == AXIAL_T2:
        return LEVELS
    if series_type not in SERIES_TYPES:
        raise ValueError(f"unknown series type {series_type!r}")
    return tuple(c for c, t in CONDITION_SERIES.items() if t == series_type)


def task_of(series_type: str, condition: str, level: str) -> str:
    """The task a coordinate row (condition, level) on `series_type` belongs to."""
    return level if series_type == AXIAL_T2 else condition


def middle_slice(num_slices: int) -> int:
    return int(num_slices) // 2


# --------------------------------------------------------------------------- features


@dataclass
class FeatureConfig:
    """Per-slice feature extraction (changing it invalidates the feature cache)."""

    image_size: int = 64  # ROI resized to this square before features
    hog_orientations: int = 9
    hog_pixels_per_cell: int = 16
    hog_cells_per_block: int = 2
    lbp_points: int = 8
    lbp_radii: list[int] = field(default_factory=lambda: [1, 2])
    glcm_levels: int = 16
    glcm_distances: list[int] = field(default_factory=lambda: [1, 3])
    thumbnail: int = 8  # coarse thumbnail side (mean-pooled), 0 = none
    axial_box: float = 0.6  # axial features: centred box, fraction of the image side
    sagittal_roi: SagittalRoiConfig = field(default_factory=SagittalRoiConfig)


_GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "energy", "correlation", "ASM")


def normalise_volume(volume: np.ndarray) -> np.ndarray:
    """Series-wise intensity normalisation to [0, 1] (1st..99.5th percentile), float32."""
    vol = np.asarray(volume, dtype=np.float32)
    lo, hi = np.percentile(vol, [1.0, 99.5])
    if not hi > lo:
        return np.zeros_like(vol)
    return np.clip((vol - lo) / (hi - lo), 0.0, 1.0)


def feature_window(series_type: str, volume: np.ndarray, cfg: FeatureConfig) -> Window:
    """The window features are computed on (see module docstring)."""
    _, h, w = volume.shape
    if series_type == AXIAL_T2:
        half = cfg.axial_box / 2
        return AxialRoi(0.5, 0.5, half, half).window((h, w), square=False)
    return sagittal_roi(volume, cfg.sagittal_roi)


def _texture_features(img: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """Compact per-slice descriptors of one [0, 1] image: intensity stats, LBP, GLCM."""
    from skimage.feature import graycomatrix, graycoprops, local_binary_pattern

    n = img.shape[0]
    c0, c1 = n // 3, n - n // 3
    pct = np.percentile(img, [5, 25, 50, 75, 95])
    stats = [
        img.mean(),
        img.std(),
        *pct,
        (img > 0.6).mean(),
        img[c0:c1, c0:c1].mean(),
        img[c0:c1, c0:c1].std(),
        img[: n // 2].mean() - img[n // 2 :].mean(),
        img[:, : n // 2].mean() - img[:, n // 2 :].mean(),
        np.abs(np.diff(img, axis=0)).mean(),
        np.abs(np.diff(img, axis=1)).mean(),
    ]
    img_u8 = np.round(img * 255).astype(np.uint8)
    lbp = []
    for r in cfg.lbp_radii:
        codes = local_binary_pattern(img_u8, cfg.lbp_points, r, method="uniform")
        hist = np.bincount(codes.astype(np.int64).ravel(), minlength=cfg.lbp_points + 2)
        lbp.extend(hist[: cfg.lbp_points + 2] / codes.size)
    q = np.minimum((img * cfg.glcm_levels).astype(np.uint8), cfg.glcm_levels - 1)
    glcm = graycomatrix(
        q,
        distances=list(cfg.glcm_distances),
        angles=[0, np.pi / 4, np.pi / 2, 3 * np.pi / 4],
        levels=cfg.glcm_levels,
        symmetric=True,
        normed=True,
    )
    props = [graycoprops(glcm, p).mean(axis=1) for p in _GLCM_PROPS]  # each (distances,)
    out = np.concatenate([np.asarray(stats), np.asarray(lbp), np.concatenate(props)])
    # Correlation is undefined on a constant image; 0 keeps features finite and deterministic.
    return np.nan_to_num(out.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _image_features(img: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """HOG plus a mean-pooled thumbnail of one [0, 1] image."""
    from skimage.feature import hog

    parts = [
        hog(
            img,
            orientations=cfg.hog_orientations,
            pixels_per_cell=(cfg.hog_pixels_per_cell,) * 2,
            cells_per_block=(cfg.hog_cells_per_block,) * 2,
            feature_vector=True,
        )
    ]
    if cfg.thumbnail:
        k = img.shape[0] // cfg.thumbnail
        t = img[: k * cfg.thumbnail, : k * cfg.thumbnail]
        parts.append(t.reshape(cfg.thumbnail, k, cfg.thumbnail, k).mean(axis=(1, 3)).ravel())
    return np.concatenate(parts).astype(np.float64)


def _position_features(positions: np.ndarray, orientation: np.ndarray) -> np.ndarray:
    """(S, 3): offset (mm) from the stack centre along the patient axis nearest the slice normal
    (LPS sign, so +x is the patient's left whatever the slice order), that offset over the
    stack's half extent, and the slice's rank along that axis in [0, 1]."""
    from lsdc.geometry import slice_normal

    axis = int(np.argmax(np.abs(slice_normal(orientation))))
    coord = np.asarray(positions, dtype=np.float64)[:, axis]
    offset = coord - 0.5 * (coord.min() + coord.max())
    half = max(0.5 * (coord.max() - coord.min()), 1e-6)
    s = len(coord)
    rank = np.argsort(np.argsort(coord, kind="stable"), kind="stable") / max(s - 1, 1)
    return np.stack([offset, offset / half, rank], axis=1)


def slice_features(
    volume: np.ndarray,
    positions: np.ndarray,
    orientation: np.ndarray,
    series_type: str,
    cfg: FeatureConfig,
) -> np.ndarray:
    """Per-slice features `(S, F)` float32 of one series volume `(S, H, W)` (position-sorted).

    Deterministic: the same volume and config give the same bytes.
    """
    vol = normalise_volume(volume)
    window = feature_window(series_type, vol, cfg)
    crops = crop_and_resize(vol, window, cfg.image_size)  # (S, n, n)
    crops = np.clip(crops, 0.0, 1.0)
    compact = np.stack([_texture_features(c, cfg) for c in crops])  # (S, C)
    image = np.stack([_image_features(c, cfg) for c in crops])  # (S, I)
    # Series context: how a slice differs from its series and from its neighbours.
    mu, sd = compact.mean(axis=0), compact.std(axis=0) + 1e-6
    zscore = (compact - mu) / sd
    prev = np.vstack([compact[:1], compact[:-1]])
    nxt = np.vstack([compact[1:], compact[-1:]])
    pos = _position_features(positions, orientation)
    feats = np.concatenate([image, compact, zscore, compact - prev, compact - nxt, pos], axis=1)
    return feats.astype(np.float32)


def feature_names(cfg: FeatureConfig) -> list[str]:
    """Names of the `slice_features` columns, in order."""
    cells = cfg.image_size // cfg.hog_pixels_per_cell
    blocks = max(cells - cfg.hog_cells_per_block + 1, 0)
    n_hog = blocks * blocks * cfg.hog_cells_per_block**2 * cfg.hog_orientations
    image = [f"hog_{i}" for i in range(n_hog)]
    image += [f"thumb_{i}" for i in range(cfg.thumbnail**2)] if cfg.thumbnail else []
    stats = ["mean", "std", "p5", "p25", "p50", "p75", "p95", "bright", "centre_mean"]
    stats += ["centre_std", "top_minus_bottom", "left_minus_right", "grad_y", "grad_x"]
    lbp = [f"lbp_r{r}_{b}" for r in cfg.lbp_radii for b in range(cfg.lbp_points + 2)]
    glcm = [f"glcm_{p}_d{d}" for p in _GLCM_PROPS for d in cfg.glcm_distances]
    compact = stats + lbp + glcm
    ctx = [f"z_{n}" for n in compact] + [f"dprev_{n}" for n in compact]
    ctx += [f"dnext_{n}" for n in compact]
    return image + compact + ctx + ["offset_mm", "offset_rel", "rank"]


@dataclass
class SeriesFeatures:
    """Features of one series, in sorted-slice order."""

    series_id: int
    series_type: str
    features: np.ndarray  # (S, F) float32
    instance_numbers: np.ndarray  # (S,) int64
    native_shapes: np.ndarray  # (S, 2) rows, cols of each slice's own file image
    orientation: np.ndarray  # (6,) the series' ImageOrientationPatient (canonical ROI frame)


def series_features(series: Any, cfg: FeatureConfig) -> SeriesFeatures:
    """`SeriesFeatures` of one `lsdc.io.dicom.Series` (its `series_type` must be set)."""
    if series.series_type not in SERIES_TYPES:
        raise ValueError(
            f"series {series.study_id}/{series.series_id}: unknown series type "
            f"{series.series_type!r}"
        )
    shapes = series.native_shapes
    if shapes is None:
        shapes = np.tile(np.asarray(series.volume.shape[1:]), (series.num_slices, 1))
    return SeriesFeatures(
        series_id=int(series.series_id),
        series_type=series.series_type,
        features=slice_features(
            series.volume, series.positions, series.orientation, series.series_type, cfg
        ),
        instance_numbers=np.asarray(series.instance_numbers, dtype=np.int64),
        native_shapes=np.asarray(shapes, dtype=np.int64),
        orientation=np.asarray(series.orientation, dtype=np.float64),
    )


@functools.lru_cache(maxsize=8)
def dataset_descriptions(data_dir: str | Path, split: str) -> dict[int, dict[int, str]]:
    """`{study_id: {series_id: series type}}` of `<split>_series_descriptions.csv` (empty when
    the file is absent). Cached per process, so pool workers read the table once, not per study.
    """
    from lsdc.io.tables import read_series_descriptions

    path = Path(data_dir) / f"{split}_series_descriptions.csv"
    if not path.exists():
        return {}
    df = read_series_descriptions(path)
    out: dict[int, dict[int, str]] = {}
    for st, se, d in df[["study_id", "series_id", "series_description"]].itertuples(index=False):
        out.setdefault(int(st), {})[int(se)] = str(d)
    return out


def _build_study_features(
    study_id: int,
    *,
    data_dir: Path,
    split: str,
    cfg: FeatureConfig,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Cache builder: every typed series of one study -> arrays keyed `<series_id>__<field>`."""
    from lsdc.io.study import load_study

    descriptions = dataset_descriptions(str(data_dir), split).get(study_id)
    study = load_study(data_dir, study_id, split=split, descriptions=descriptions)
    arrays: dict[str, np.ndarray] = {}
    series_meta = []
    for s in study.series:
        if s.series_type not in SERIES_TYPES:
            continue
        f = series_features(s, cfg)
        arrays[f"{f.series_id}__features"] = f.features
        arrays[f"{f.series_id}__instance_numbers"] = f.instance_numbers
        arrays[f"{f.series_id}__native_shapes"] = f.native_shapes
        arrays[f"{f.series_id}__orientation"] = f.orientation
        series_meta.append({"series_id": f.series_id, "series_type": f.series_type})
    return arrays, {"study_id": int(study_id), "series": series_meta, "errors": study.errors}


def load_cached_features(cache: Any, study_id: int) -> list[SeriesFeatures]:
    """The `SeriesFeatures` a feature cache holds for one study."""
    arrays, meta = cache.load(study_id)
    return [
        SeriesFeatures(
            series_id=int(m["series_id"]),
            series_type=str(m["series_type"]),
            features=arrays[f"{m['series_id']}__features"],
            instance_numbers=arrays[f"{m['series_id']}__instance_numbers"],
            native_shapes=arrays[f"{m['series_id']}__native_shapes"],
            orientation=arrays[f"{m['series_id']}__orientation"],
        )
        for m in meta["series"]
    ]


def compute_features(
    data_dir: str | Path,
    cache_dir: str | Path,
    study_ids: Iterable[int],
    cfg: FeatureConfig,
    *,
    split: str = "train",
    workers: int = 1,
    progress: bool = True,
) -> Any:
    """Compute (or reuse) the per-slice features of `study_ids` into a `StudyCache` at
    `cache_dir`, in parallel; returns the cache's `CacheRunReport`."""
    from lsdc.preprocess.cache import StudyCache

    data_dir = Path(data_dir)
    config = {"split": split, "format": FEATURE_CACHE_FORMAT, **config_to_dict(cfg)}
    cache = StudyCache(cache_dir, FEATURE_PIPELINE, config)
    build = functools.partial(_build_study_features, data_dir=data_dir, split=split, cfg=cfg)
    return cache.run(study_ids, build, workers=workers, desc="slice features", progress=progress)


# --------------------------------------------------------------------------- models


@dataclass
class ModelConfig:
    """Base-model hyper-parameters (small, CPU-friendly defaults)."""

    rf_trees: int = 300
    rf_min_samples_leaf: int = 2
    svm_c: float = 3.0
    mlp_hidden: list[int] = field(default_factory=lambda: [128])
    mlp_alpha: float = 1e-3
    mlp_max_iter: int = 300
    xgb_trees: int = 200
    xgb_depth: int = 4
    xgb_learning_rate: float = 0.1
    n_jobs: int = 1  # threads per model (RandomForest, XGBoost)


@dataclass
class SliceRelevanceConfig:
    """`lsdc train slice-relevance` configuration."""

    features: FeatureConfig = field(default_factory=FeatureConfig)
    models: ModelConfig = field(default_factory=ModelConfig)
    folds: int = 5
    seed: int = 0
    max_studies: int = 0  # 0 = every study with coordinates; else the first N (sorted ids)


def _make_model(name: str, cfg: ModelConfig, seed: int) -> Any:
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if name == "random_forest":
        return RandomForestClassifier(
            n_estimators=cfg.rf_trees,
            min_samples_leaf=cfg.rf_min_samples_leaf,
            class_weight="balanced_subsample",
            n_jobs=cfg.n_jobs,
            random_state=seed,
        )
    if name == "svm":
        # Platt-scaled probabilities (SVC(probability=True) is deprecated in scikit-learn 1.9).
        svc = CalibratedClassifierCV(
            SVC(C=cfg.svm_c, class_weight="balanced", random_state=seed),
            method="sigmoid",
            cv=3,
            ensemble=False,
        )
        return Pipeline([("scale", StandardScaler()), ("svc", svc)])
    if name == "mlp":
        mlp = MLPClassifier(
            hidden_layer_sizes=tuple(cfg.mlp_hidden),
            alpha=cfg.mlp_alpha,
            max_iter=cfg.mlp_max_iter,
            early_stopping=False,
            random_state=seed,
        )
        return Pipeline([("scale", StandardScaler()), ("mlp", mlp)])
    if name == "xgboost":
        from xgboost import XGBClassifier

        return XGBClassifier(
            n_estimators=cfg.xgb_trees,
            max_depth=cfg.xgb_depth,
            learning_rate=cfg.xgb_learning_rate,
            tree_method="hist",
            n_jobs=cfg.n_jobs,
            random_state=seed,
        )
    raise ValueError(f"unknown model {name!r}; expected one of {MODEL_NAMES}")


def _balanced_weights(y: np.ndarray) -> np.ndarray:
    counts = np.bincount(y)
    return (len(y) / (len(counts) * counts[y])).astype(np.float64)


def _fit(name: str, cfg: ModelConfig, seed: int, x: np.ndarray, y: np.ndarray) -> Any:
    """Fit one base model on labels `y` already encoded as 0..k-1 (every code present)."""
    model = _make_model(name, cfg, seed)
    if name == "svm":
        # Platt scaling is cross-validated inside the training set: every class needs a sample
        # in each of its folds (matters only on tiny training sets).
        fewest = int(np.bincount(y).min())
        if fewest < 2:
            raise ValueError(
                f"svm: a slice class has {fewest} training sample(s); need at least 2 labelled "
                "series per task (more studies with coordinates, or fewer folds)"
            )
        model.set_params(svc__cv=min(3, fewest))
    if name == "xgboost":
        _xgboost_runs_here()
        model.fit(x, y, sample_weight=_balanced_weights(y))
    else:
        model.fit(x, y)
    return model


def _proba(model: Any, x: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """(N, num_classes) probabilities; classes the model never saw get probability 0."""
    p = np.asarray(model.predict_proba(x), dtype=np.float64)
    out = np.zeros((len(x), num_classes))
    out[:, classes] = p
    return out


@dataclass
class SeriesTypeModels:
    """The fitted models of one series type: `classes` are the task codes seen in training
    (0 = background, k = tasks[k - 1])."""

    series_type: str
    tasks: tuple[str, ...]
    classes: np.ndarray
    models: dict[str, Any]
    weights: dict[str, float]

    def predict_proba(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Per model and for the ensemble: (N, 1 + num tasks) probabilities."""
        k = 1 + len(self.tasks)
        if "xgboost" in self.models:
            _xgboost_runs_here()
        out = {n: _proba(m, x, self.classes, k) for n, m in self.models.items()}
        total = sum(self.weights[n] for n in out)
        out[ENSEMBLE] = sum(self.weights[n] * p for n, p in out.items()) / total
        return out


def fit_series_type(
    series_type: str,
    x: np.ndarray,
    y: np.ndarray,
    cfg: ModelConfig,
    seed: int,
    names: Sequence[str] = MODEL_NAMES,
) -> SeriesTypeModels:
    classes = np.unique(y)
    codes = np.searchsorted(classes, y)
    models = {n: _fit(n, cfg, seed, x, codes) for n in names}
    return SeriesTypeModels(
        series_type=series_type,
        tasks=tasks_for(series_type),
        classes=classes,
        models=models,
        weights={n: 1.0 for n in names},
    )


def save_models(m: SeriesTypeModels, folder: str | Path) -> Path:
    """Write one series type's models: skops for scikit-learn, JSON for XGBoost, plus index."""
    import skops.io as sio

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, model in m.models.items():
        if name == "xgboost":
            # The extension picks XGBoost's format: keep ".json" on the temporary file too.
            tmp = folder / f".{name}.tmp.json"
            model.save_model(tmp)
            tmp.replace(folder / f"{name}.json")
            files[name] = f"{name}.json"
        else:
            from lsdc.fileio import atomic_write_bytes

            atomic_write_bytes(folder / f"{name}.skops", sio.dumps(model))
            files[name] = f"{name}.skops"
    atomic_write_json(
        folder / "models.json",
        {
            "series_type": m.series_type,
            "tasks": list(m.tasks),
            "classes": m.classes.tolist(),
            "files": files,
            "weights": m.weights,
        },
    )
    return folder


def load_skops(path: str | Path) -> Any:
    """Load a skops file whose types are all in `TRUSTED_SKOPS_TYPES`; refuse anything else."""
    import skops.io as sio

    data = Path(path).read_bytes()
    untrusted = sio.get_untrusted_types(data=data)
    unknown = sorted(set(untrusted) - set(TRUSTED_SKOPS_TYPES))
    if unknown:
        raise ValueError(f"{path}: refuses to load untrusted types {unknown}")
    return sio.loads(data, trusted=[t for t in untrusted if t in TRUSTED_SKOPS_TYPES])


def load_models(folder: str | Path) -> SeriesTypeModels:
    """Inverse of `save_models`."""
    folder = Path(folder)
    index = json.loads((folder / "models.json").read_text())
    models = {}
    for name, file in index["files"].items():
        if name == "xgboost":
            from xgboost import XGBClassifier

            _xgboost_runs_here()
            model = XGBClassifier()
            model.load_model(folder / file)
        else:
            model = load_skops(folder / file)
        models[name] = model
    return SeriesTypeModels(
        series_type=index["series_type"],
        tasks=tuple(index["tasks"]),
        classes=np.asarray(index["classes"], dtype=np.int64),
        models=models,
        weights={k: float(v) for k, v in index["weights"].items()},
    )


# --------------------------------------------------------------------------- training data


@dataclass
class LabelledSeries:
    """One labelled series: its features and, per task, the labelled sorted slice indices."""

    study_id: int
    series_id: int
    series_type: str
    features: np.ndarray  # (S, F)
    targets: dict[str, list[int]]  # task -> labelled sorted slice indices (one per label row)

    def slice_classes(self) -> np.ndarray:
        """(S,) class per slice: 0 background, k for tasks[k - 1]; the first task wins a tie."""
        y = np.zeros(len(self.features), dtype=np.int64)
        for k, task in reversed(list(enumerate(tasks_for(self.series_type), start=1))):
            for i in self.targets.get(task, []):
                y[i] = k
        return y


def labelled_series(
    features: Sequence[SeriesFeatures],
    coords: pd.DataFrame,
    study_id: int,
    skipped: list[str] | None = None,
) -> tuple[list[LabelledSeries], list[dict[str, float]]]:
    """Join one study's features with its coordinate rows.

    Returns the labelled series and, for the axial ROI statistics, the axial points as
    fractions of their slice's native image size, in the canonical axial frame. Rows whose
    instance is not in the series (the reader may have dropped a bad file) or is carried by
    several slices (ambiguous) are skipped, and named in `skipped` when a list is given; points
    outside their image still label their slice but stay out of the ROI statistics.
    """
    by_series = {f.series_id: f for f in features}
    out: dict[int, LabelledSeries] = {}
    axial_points: list[dict[str, float]] = []
    for row in coords.itertuples(index=False):
        where = (
            f"study {study_id} series {row.series_id} instance {row.instance_number} "
            f"{row.condition} {row.level}"
        )
        f = by_series.get(int(row.series_id))
        if f is None or f.series_type != row.series_type:
            if skipped is not None:
                skipped.append(f"{where}: no readable {row.series_type} series with this id")
            continue
        hits = np.flatnonzero(f.instance_numbers == int(row.instance_number))
        if hits.size != 1:
            if skipped is not None:
                what = "no readable file" if hits.size == 0 else "several files (duplicated)"
                skipped.append(f"{where}: {what} with this instance number")
            continue
        idx = int(hits[0])
        ls = out.setdefault(
            f.series_id,
            LabelledSeries(int(study_id), f.series_id, f.series_type, f.features, {}),
        )
        ls.targets.setdefault(task_of(f.series_type, row.condition, row.level), []).append(idx)
        if f.series_type == AXIAL_T2:
            rows, cols = (int(v) for v in f.native_shapes[idx])
            if -0.5 <= row.x <= cols - 0.5 and -0.5 <= row.y <= rows - 0.5:
                x, y = canonical_axial_fraction(
                    float(row.x), float(row.y), (rows, cols), f.orientation
                )
                axial_points.append({"x": x, "y": y})
            elif skipped is not None:
                skipped.append(f"{where}: point outside the {rows}x{cols} image (ROI statistics)")
    return list(out.values()), axial_points


# --------------------------------------------------------------------------- evaluation


def _predicted_slices(proba: np.ndarray, tasks: Sequence[str]) -> dict[str, int]:
    """Task -> argmax over the series' slices of that task's probability."""
    return {t: int(np.argmax(proba[:, k])) for k, t in enumerate(tasks, start=1)}


def _accuracy_rows(
    series: Sequence[LabelledSeries], predictions: Mapping[str, Sequence[dict[str, int]]]
) -> list[dict[str, Any]]:
    """One row per (label row, method): predicted vs labelled slice."""
    rows = []
    for i, ls in enumerate(series):
        s = len(ls.features)
        methods = {BASELINE: {t: middle_slice(s) for t in tasks_for(ls.series_type)}}
        methods.update({m: predictions[m][i] for m in predictions})
        for task, truths in ls.targets.items():
            for truth in truths:
                for method, pred in methods.items():
                    rows.append(
                        {
                            "study_id": ls.study_id,
                            "series_id": ls.series_id,
                            "series_type": ls.series_type,
                            "task": task,
                            "method": method,
                            "truth": truth,
                            "pred": pred[task],
                            "num_slices": s,
                        }
                    )
    return rows


def accuracy_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Exact and +-1-slice accuracy per series type (and overall) and method."""
    df = rows.assign(
        exact=(rows["pred"] == rows["truth"]).astype(float),
        within1=((rows["pred"] - rows["truth"]).abs() <= 1).astype(float),
    )
    per_type = df.groupby(["series_type", "method"])[["exact", "within1"]].mean()
    per_type["n"] = df.groupby(["series_type", "method"]).size()
    overall = df.groupby("method")[["exact", "within1"]].mean()
    overall["n"] = df.groupby("method").size()
    overall.index = pd.MultiIndex.from_product([["all"], overall.index])
    out = pd.concat([per_type, overall]).reset_index()
    out.columns = ["series_type", "method", "exact", "within1", "n"]
    order = {m: i for i, m in enumerate((*MODEL_NAMES, ENSEMBLE, BASELINE))}
    types = {t: i for i, t in enumerate((*SERIES_TYPES, "all"))}
    out["_o"] = out["series_type"].map(types) * 100 + out["method"].map(order)
    return out.sort_values("_o").drop(columns="_o").reset_index(drop=True)


def format_table(table: pd.DataFrame) -> str:
    """A readable Markdown table of `accuracy_table`."""
    lines = ["| series type | method | exact | ±1 slice | n |", "|---|---|---:|---:|---:|"]
    for r in table.itertuples(index=False):
        lines.append(
            f"| {r.series_type} | {r.method} | {r.exact:.3f} | {r.within1:.3f} | {int(r.n)} |"
        )
    return "\n".join(lines) + "\n"


@dataclass
class _FitJob:
    """One model fit (a CV fold, or the final fit when `test` is empty): picklable, so the
    folds of all series types run in parallel processes."""

    series_type: str
    fold: int  # -1 = final fit on every labelled series
    x: np.ndarray
    y: np.ndarray
    test: list[np.ndarray] = field(default_factory=list)  # features of held-out series


def _run_fit_job(
    job: _FitJob, cfg: ModelConfig, seed: int, names: Sequence[str]
) -> list[tuple[dict[str, dict[str, int]], dict[str, float]]] | SeriesTypeModels:
    """Fit; for a fold return, per held-out series, (method -> task -> predicted slice, task ->
    ensemble probability of the ensemble's slice)."""
    models = fit_series_type(job.series_type, job.x, job.y, cfg, seed, names)
    if job.fold < 0:
        return models
    tasks = tasks_for(job.series_type)
    out = []
    for f in job.test:
        proba = models.predict_proba(f)
        slices = {m: _predicted_slices(p, tasks) for m, p in proba.items()}
        ens = proba[ENSEMBLE]
        probs = {t: float(ens[slices[ENSEMBLE][t], k]) for k, t in enumerate(tasks, start=1)}
        out.append((slices, probs))
    return out


def _run_jobs(
    jobs: list[_FitJob],
    cfg: SliceRelevanceConfig,
    names: Sequence[str],
    workers: int,
    desc: str,
    progress: bool = True,
) -> dict[tuple[str, int], Any]:
    fn = functools.partial(_run_fit_job, cfg=cfg.models, seed=cfg.seed, names=tuple(names))
    workers = fork_safe_workers(workers, desc)
    results: dict[tuple[str, int], Any] = {}
    for out in parallel_map(fn, jobs, workers=workers, desc=desc, progress=progress):
        if not out.ok:
            # A fold that cannot be fitted makes the whole evaluation meaningless: stop.
            raise RuntimeError(
                f"slice relevance: fitting {out.item.series_type} fold {out.item.fold} "
                f"failed: {out.error}"
            )
        results[(out.item.series_type, out.item.fold)] = out.result
    return results


def cross_validate(
    series: Sequence[LabelledSeries],
    cfg: SliceRelevanceConfig,
    names: Sequence[str] = MODEL_NAMES,
    *,
    workers: int = 1,
    progress: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Study-wise k-fold CV of every base model and the ensemble. Returns the per-label-row
    table (`_accuracy_rows`) of out-of-fold predictions, and the ensemble's out-of-fold slice
    of every task of every held-out series (`OOF_SLICE_COLUMNS`), which multitask
    preprocessing uses for the training studies. Folds run in `workers` processes."""
    from sklearn.model_selection import GroupKFold

    jobs: list[_FitJob] = []
    held_out: dict[tuple[str, int], np.ndarray] = {}
    groups_by_type: dict[str, list[LabelledSeries]] = {}
    for st in SERIES_TYPES:
        group = [ls for ls in series if ls.series_type == st]
        studies = {ls.study_id for ls in group}
        folds = min(cfg.folds, len(studies))
        if folds < 2:
            continue
        groups_by_type[st] = group
        ids = np.array([ls.study_id for ls in group])
        splitter = GroupKFold(n_splits=folds)
        for k, (train_i, test_i) in enumerate(splitter.split(np.zeros(len(group)), groups=ids)):
            x = np.concatenate([group[i].features for i in train_i])
            y = np.concatenate([group[i].slice_classes() for i in train_i])
            jobs.append(_FitJob(st, k, x, y, [group[i].features for i in test_i]))
            held_out[(st, k)] = test_i
    results = _run_jobs(jobs, cfg, names, workers, "slice relevance CV", progress)
    rows: list[dict[str, Any]] = []
    slice_rows: list[dict[str, Any]] = []
    for st, group in groups_by_type.items():
        preds: dict[str, list[dict[str, int]]] = {m: [{}] * len(group) for m in (*names, ENSEMBLE)}
        for (t, k), test_i in held_out.items():
            if t != st:
                continue
            for i, (per_method, probs) in zip(test_i, results[(t, k)], strict=True):
                for m, slices in per_method.items():
                    preds[m][i] = slices
                ls = group[i]
                for task, p in probs.items():
                    slice_rows.append(
                        {
                            "study_id": ls.study_id,
                            "series_id": ls.series_id,
                            "series_type": st,
                            "task": task,
                            "fold": k,
                            "slice_index": per_method[ENSEMBLE][task],
                            "num_slices": len(ls.features),
                            "probability": p,
                        }
                    )
        rows.extend(_accuracy_rows(group, preds))
    return pd.DataFrame(rows), pd.DataFrame(slice_rows, columns=list(OOF_SLICE_COLUMNS))


def fit_all(
    series: Sequence[LabelledSeries],
    cfg: SliceRelevanceConfig,
    names: Sequence[str] = MODEL_NAMES,
    *,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, SeriesTypeModels]:
    """The final models of every series type that has labelled series, fitted in parallel."""
    jobs = []
    for st in SERIES_TYPES:
        group = [ls for ls in series if ls.series_type == st]
        if group:
            x = np.concatenate([ls.features for ls in group])
            y = np.concatenate([ls.slice_classes() for ls in group])
            jobs.append(_FitJob(st, -1, x, y))
    results = _run_jobs(jobs, cfg, names, workers, "slice relevance fit", progress)
    return {st: results[(st, -1)] for st in SERIES_TYPES if (st, -1) in results}


# --------------------------------------------------------------------------- the run


def fit_axial_roi_from_points(points: Sequence[Mapping[str, float]]) -> AxialRoi:
    """`AxialRoi` from axial label points given as x/y fractions of their image size."""
    if not points:
        return AxialRoi()
    return fit_axial_roi(np.array([[p["x"], p["y"]] for p in points], dtype=np.float64))


@dataclass
class SliceRelevanceReport:
    """What `train_slice_relevance` produced."""

    run_dir: Path
    table: pd.DataFrame
    studies: int
    failed: dict[int, str]


def train_slice_relevance(
    data_dir: str | Path,
    out: str | Path,
    *,
    workers: int = 1,
    overrides: Sequence[str] = (),
    feature_cache: str | Path | None = None,
    progress: bool = True,
) -> SliceRelevanceReport:
    """Train and evaluate the slice-relevance ensemble; write a run folder `out`:

    config.yaml, models/<series type>/ (skops + XGBoost JSON + models.json), axial_roi.json,
    oof.csv (out-of-fold predictions per label row), oof_slices.csv (the ensemble's
    out-of-fold slice per series and task), report.json, report.md.
    Features are cached (default `out/features`) and reused by later runs with the same feature
    configuration. `workers` processes compute features and fit the CV folds.
    """
    from lsdc.io.tables import read_coordinates
    from lsdc.preprocess.cache import StudyCache

    data_dir, out = Path(data_dir), Path(out)
    cfg = load_config(SliceRelevanceConfig, None, overrides)
    coords_path = data_dir / "train_label_coordinates.csv"
    coords = read_coordinates(coords_path)
    study_ids = sorted(int(s) for s in coords["study_id"].unique())
    if cfg.max_studies:
        study_ids = study_ids[: cfg.max_studies]
    if len(study_ids) < 2:
        raise ValueError(f"{coords_path}: need coordinates of at least 2 studies to train")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    cache_dir = Path(feature_cache) if feature_cache is not None else out / "features"
    report = compute_features(
        data_dir, cache_dir, study_ids, cfg.features, workers=workers, progress=progress
    )
    cache = StudyCache.open(cache_dir)

    series: list[LabelledSeries] = []
    axial_points: list[dict[str, float]] = []
    skipped_coordinates: list[str] = []
    by_study = dict(iter(coords.groupby("study_id")))
    for sid in study_ids:
        if sid in report.failed:
            continue
        ls, pts = labelled_series(
            load_cached_features(cache, sid), by_study[sid], sid, skipped_coordinates
        )
        series.extend(ls)
        axial_points.extend(pts)
    if not series:
        raise ValueError(f"{data_dir}: no labelled series could be read")
    if skipped_coordinates:
        print(
            f"slice relevance: {len(skipped_coordinates)} coordinate rows skipped (listed in "
            f"{out / 'report.json'}), e.g. {skipped_coordinates[0]}",
            file=sys.stderr,
        )

    rows, oof_slices = cross_validate(series, cfg, workers=workers, progress=progress)
    table = accuracy_table(rows)
    atomic_write_text(out / "oof.csv", rows.to_csv(index=False))
    atomic_write_text(out / OOF_SLICES_FILE, oof_slices.to_csv(index=False))
    for st, models in fit_all(series, cfg, workers=workers, progress=progress).items():
        save_models(models, out / "models" / series_slug(st))

    fit_axial_roi_from_points(axial_points).save(out / "axial_roi.json")
    studies = len({ls.study_id for ls in series})
    atomic_write_json(
        out / "report.json",
        {
            "studies": studies,
            "labelled_series": len(series),
            "folds": cfg.folds,
            "feature_count": int(series[0].features.shape[1]),
            "failed_studies": {str(k): v for k, v in report.failed.items()},
            # Coordinate rows that could not label a slice (or, outside the image, the ROI).
            "skipped_coordinates": skipped_coordinates,
            "accuracy": table.to_dict(orient="records"),
        },
    )
    atomic_write_text(
        out / "report.md",
        f"# Slice relevance: study-wise {cfg.folds}-fold cross-validation\n\n"
        f"{studies} studies, {len(series)} labelled series; accuracy over label rows.\n\n"
        + format_table(table),
    )
    return SliceRelevanceReport(out, table, studies, dict(report.failed))


# --------------------------------------------------------------------------- inference


@dataclass
class SlicePrediction:
    """The predicted slice of one task in one series."""

    series_id: int
    series_type: str
    task: str
    slice_index: int  # sorted index into Series.volume
    instance_number: int
    probability: float  # ensemble probability of that slice for the task
    scores: np.ndarray  # (S,) ensemble probability of every slice for the task


@functools.lru_cache(maxsize=4)
def _run_models(run_dir: str) -> tuple[FeatureConfig, dict[str, SeriesTypeModels]]:
    cfg = load_config(SliceRelevanceConfig, Path(run_dir) / "config.yaml")
    models = {}
    for st in SERIES_TYPES:
        folder = Path(run_dir) / "models" / series_slug(st)
        if (folder / "models.json").exists():
            models[st] = load_models(folder)
    return cfg.features, models


def predict_slices(run_dir: str | Path, study: Any) -> dict[int, dict[str, SlicePrediction]]:
    """For every typed series of `study` with a trained model: task -> `SlicePrediction`.

    Returns `{series_id: {task: SlicePrediction}}`; series of a type the run has no model for
    are left out.
    """
    feats_cfg, models = _run_models(str(Path(run_dir).resolve()))
    out: dict[int, dict[str, SlicePrediction]] = {}
    for s in study.series:
        m = models.get(s.series_type)
        if m is None:
            continue
        f = series_features(s, feats_cfg)
        proba = m.predict_proba(f.features)[ENSEMBLE]
        preds = {}
        for k, task in enumerate(m.tasks, start=1):
            i = int(np.argmax(proba[:, k]))
            preds[task] = SlicePrediction(
                series_id=f.series_id,
                series_type=f.series_type,
                task=task,
                slice_index=i,
                instance_number=int(f.instance_numbers[i]),
                probability=float(proba[i, k]),
                scores=proba[:, k].copy(),
            )
        out[f.series_id] = preds
    return out


@functools.lru_cache(maxsize=4)
def load_oof_slices(run_dir: str | Path) -> dict[int, dict[int, dict[str, SlicePrediction]]]:
    """The run's out-of-fold slices (`oof_slices.csv`) as `{study: {series: {task:
    SlicePrediction}}}` (with empty `scores` and instance number -1: the table keeps neither).
    Empty when the run predates the file or had too few studies to cross-validate."""
    path = Path(run_dir) / OOF_SLICES_FILE
    if not path.exists():
        return {}
    table = pd.read_csv(path)
    missing = set(OOF_SLICE_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    out: dict[int, dict[int, dict[str, SlicePrediction]]] = {}
    for r in table.itertuples(index=False):
        out.setdefault(int(r.study_id), {}).setdefault(int(r.series_id), {})[str(r.task)] = (
            SlicePrediction(
                series_id=int(r.series_id),
                series_type=str(r.series_type),
                task=str(r.task),
                slice_index=int(r.slice_index),
                instance_number=-1,
                probability=float(r.probability),
                scores=np.empty(0),
            )
        )
    return out


def load_axial_roi(run_dir: str | Path) -> AxialRoi:
    """The axial ROI statistics a slice-relevance run saved."""
    return AxialRoi.load(Path(run_dir) / "axial_roi.json")
