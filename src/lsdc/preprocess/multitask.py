"""Multitask preprocessing (DESIGN §4, multitask step 2): 3-slice crops per task, with keypoints.

For every series type and slice-relevance task (a condition on sagittal series, a level on the
axial series) one *crop*: the selected slice and its two neighbours (clamped at the stack ends, in
position order), cropped to the region of interest (sagittal: `sagittal_roi` of the series
itself; axial: the `AxialRoi` fitted on training coordinates), resized to `crop_size`, with every
known coordinate of the task mapped into the crop and masked when missing or outside.

The selected slice is, per task: the labelled slice (only with `selection.prefer_labelled`),
else the slice predicted by a slice-relevance run, else (only when configured) the middle slice.
On the train split, a study that the relevance run cross-validated gets the run's *out-of-fold*
slice (source "oof", `selection.oof`), so training, out-of-fold and test crops all come from a
relevance model that never saw the study, with the same errors. Where the selected slice differs
from the slice a point was labelled on, the point keeps its in-plane position (same series) or is
projected through patient space (another series of the type); the offset in slices is kept
(`keypoint_slice_offset`).

Cache file of a study (`StudyCache`, pipeline "multitask"): for each crop key
`<series slug>__<task>`, arrays `<key>__<field>`:
  image (3, size, size) float16 in [0, 1]   slice_indices (3,) int64   instance_numbers (3,) int64
  hires (3, h, w) float16: the same window at native resolution, downscaled only when its longer
    side exceeds `hires_max` (the second pass crops from it when it is finer than `image`)
  keypoints (K, 2) float32 crop x/y, NaN when missing    keypoint_mask (K,) bool (known and inside)
  keypoint_native (K, 2) float32 x/y on the series grid   keypoint_slice_offset (K,) int64
  window (4,) int64 y0 y1 x0 x1 on the series grid        volume_shape (3,) int64
  flips (2,) bool: rows / columns of image, hires and keypoints mirrored into the canonical
    axial frame (patient left on the right, posterior at the bottom; `crops.canonical_flips`),
    so axial crops look alike whichever way the scanner stored them; sagittal crops: False
  positions (3, 3), orientations (3, 6), pixel_spacing (2,) float64: geometry of the 3 slices
  present () bool: False when the study lacks the series type (all arrays then zero / masked)
plus `labels` (25,) int8 severity codes of the study (-1 = unlabelled; all -1 on the test split),
and in the meta, per crop: key, series type, task, keypoint names, series id, selection source;
per study, `dropped_labels`: each coordinate that could not be placed (an instance number with
no readable file or carried by several files, a series that is not there), masked rather than
guessed, and also printed.
`load_multitask_study` reads it back as `TaskCrop` objects.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lsdc.config import config_to_dict, load_config
from lsdc.constants import AXIAL_T2, CONDITION_SERIES, LEVELS, SERIES_TYPES, TARGETS
from lsdc.io.study import input_fingerprint
from lsdc.parallel import LOCAL, Executor
from lsdc.preprocess.cache import UNLABELLED, CacheRunReport, StudyCache
from lsdc.preprocess.crops import (
    AxialRoi,
    SagittalRoiConfig,
    canonical_axial_fraction,
    canonical_flips,
    crop_and_resize,
    fit_axial_roi,
    map_points_to_crop,
    sagittal_roi,
)
from lsdc.preprocess.slice_relevance import (
    dataset_descriptions,
    middle_slice,
    normalise_volume,
    series_slug,
    task_of,
    tasks_for,
)

PIPELINE = "multitask"
# Layout version of the cache files; part of the configuration hash, so a cache written with
# another layout is refused instead of mixed. Bump on any change of arrays or meta.
# 3: the axial window is mirrored onto series stored right-to-left or posterior-to-anterior
# (AxialRoi fractions are canonical) and their crops are mirrored into the canonical frame
# (`flips`), so crops of such series changed.
CACHE_FORMAT = 3
SOURCES = ("labelled", "oof", "predicted", "middle")


@dataclass
class SelectionConfig:
    """Which slice each crop is centred on."""

    # The labelled slice where the study has coordinates. Off by default: crops on labelled
    # slices are better than any crop a test study gets, so the OOF score would flatter.
    prefer_labelled: bool = False
    # Train split: use the relevance run's out-of-fold slice for studies it cross-validated.
    oof: bool = True
    # A task with neither a label nor a prediction: "error" (the study fails, reported),
    # "middle" (the middle slice; recorded as source "middle" in the cache) or "absent" (the
    # crop is stored as missing, like a missing series type: present=False, all masked).
    without_prediction: str = "error"
    neighbours: int = 1  # slices on each side of the selected one (1 -> 3 slices)


@dataclass
class MultitaskConfig:
    """`lsdc preprocess --pipeline multitask` configuration (dotted overrides, e.g.
    `crop_size=96 selection.without_prediction=middle`)."""

    crop_size: int = 128
    # Longest side of the native-resolution copy of each window (`hires`); 0 = do not keep one.
    hires_max: int = 256
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    sagittal_roi: SagittalRoiConfig = field(default_factory=SagittalRoiConfig)
    # Used only when neither a relevance run nor training coordinates provide the statistics.
    default_axial_roi: AxialRoi = field(default_factory=AxialRoi)


def keypoint_names(series_type: str, task: str) -> tuple[tuple[str, str], ...]:
    """(condition, level) of every keypoint of a task: five levels of a sagittal condition; the
    left and right subarticular points of an axial level."""
    if series_type == AXIAL_T2:
        return tuple((c, task) for c, t in CONDITION_SERIES.items() if t == AXIAL_T2)
    return tuple((task, level) for level in LEVELS)


def crop_key(series_type: str, task: str) -> str:
    return f"{series_slug(series_type)}__{task}"


# --------------------------------------------------------------------------- read back


@dataclass
class TaskCrop:
    """One cached crop: 3 slices of one task, its keypoints and the geometry to map back."""

    key: str
    series_type: str
    task: str
    present: bool
    source: str | None  # labelled | predicted | middle | None (series type absent)
    series_id: int | None
    image: np.ndarray  # (3, size, size) float32 in [0, 1]
    hires: np.ndarray  # (3, h, w) float32 in [0, 1], the window at native resolution (or empty)
    slice_indices: np.ndarray  # (3,)
    instance_numbers: np.ndarray  # (3,)
    keypoint_names: list[str]  # "<condition>_<level>", the target names
    keypoints: np.ndarray  # (K, 2) crop x/y, NaN when missing
    keypoint_mask: np.ndarray  # (K,) bool
    keypoint_native: np.ndarray  # (K, 2) x/y on the series grid
    keypoint_slice_offset: np.ndarray  # (K,)
    window: tuple[int, int, int, int]
    volume_shape: tuple[int, int, int]
    flips: tuple[bool, bool]  # crop rows / columns mirrored relative to the series grid
    positions: np.ndarray  # (3, 3) ImagePositionPatient of each slice
    orientations: np.ndarray  # (3, 6) ImageOrientationPatient of each slice
    pixel_spacing: np.ndarray  # (2,)

    def to_native(self, points_xy: np.ndarray) -> np.ndarray:
        """Crop x/y points (N, 2) -> x/y on the series grid (the native image unless the
        reader resampled the slice)."""
        from lsdc.preprocess.crops import map_points_from_crop

        h, w = self.image.shape[-2:]
        pts = np.array(points_xy, dtype=np.float64).reshape(-1, 2)
        if self.flips[1]:
            pts[:, 0] = w - 1 - pts[:, 0]
        if self.flips[0]:
            pts[:, 1] = h - 1 - pts[:, 1]
        return map_points_from_crop(pts, self.window, (h, w))


def load_multitask_study(cache: StudyCache | str | Path, study_id: int) -> list[TaskCrop]:
    """All crops of one study from a multitask cache, in series-type then task order."""
    if not isinstance(cache, StudyCache):
        cache = StudyCache.open(cache)
    return study_crops(*cache.load(study_id))


def study_crops(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> list[TaskCrop]:
    """The crops of one loaded study file (`StudyCache.load`), for readers that also want its
    other arrays without reading the file twice."""
    out = []
    for m in meta["crops"]:
        k = m["key"]

        def a(name: str, k: str = k) -> np.ndarray:
            return arrays[f"{k}__{name}"]

        out.append(
            TaskCrop(
                key=k,
                series_type=m["series_type"],
                task=m["task"],
                present=bool(a("present")),
                source=m["source"],
                series_id=m["series_id"],
                image=a("image").astype(np.float32),
                hires=a("hires").astype(np.float32),
                slice_indices=a("slice_indices"),
                instance_numbers=a("instance_numbers"),
                keypoint_names=list(m["keypoint_names"]),
                keypoints=a("keypoints"),
                keypoint_mask=a("keypoint_mask"),
                keypoint_native=a("keypoint_native"),
                keypoint_slice_offset=a("keypoint_slice_offset"),
                window=tuple(int(v) for v in a("window")),  # type: ignore[arg-type]
                volume_shape=tuple(int(v) for v in a("volume_shape")),  # type: ignore[arg-type]
                flips=(bool(a("flips")[0]), bool(a("flips")[1])),
                positions=a("positions"),
                orientations=a("orientations"),
                pixel_spacing=a("pixel_spacing"),
            )
        )
    return out


# --------------------------------------------------------------------------- one study


@dataclass(frozen=True)
class _Label:
    series_id: int
    instance_number: int
    condition: str
    level: str
    x: float
    y: float


def _select(
    study: Any,
    series_type: str,
    task: str,
    labels: Sequence[_Label],
    predictions: Mapping[int, Mapping[str, Any]],
    cfg: MultitaskConfig,
    oof_series: frozenset[int] = frozenset(),
) -> tuple[Any, int, str, float | None] | None:
    """(series, centre slice index, source, probability) of one task, or None when the study
    has no series of the type (or no slice for the task, with `without_prediction="absent"`).
    Raises when no slice can be chosen and that is configured."""
    candidates = study.of_type(series_type)
    if not candidates:
        return None
    by_id = {int(s.series_id): s for s in candidates}
    if cfg.selection.prefer_labelled:
        idx_by_series: dict[int, list[int]] = {}
        for lab in labels:
            if task_of(series_type, lab.condition, lab.level) != task:
                continue
            s = by_id.get(lab.series_id)
            if s is None:
                continue
            try:
                index = s.slice_index(lab.instance_number)
            except KeyError:
                continue  # named by `_keypoints`, which drops the label
            idx_by_series.setdefault(lab.series_id, []).append(index)
        if idx_by_series:
            # The series with most labels of the task; the median of its labelled slices
            # (the five spinal levels normally share one mid-sagittal slice).
            sid = max(idx_by_series, key=lambda k: (len(idx_by_series[k]), -k))
            centre = int(np.round(np.median(idx_by_series[sid])))
            return by_id[sid], centre, "labelled", None
    best = None
    for sid, s in by_id.items():
        p = predictions.get(sid, {}).get(task)
        if p is not None and (best is None or p.probability > best[1].probability):
            best = (s, p)
    if best is not None:
        source = "oof" if int(best[0].series_id) in oof_series else "predicted"
        return best[0], int(best[1].slice_index), source, float(best[1].probability)
    if cfg.selection.without_prediction == "middle":
        s = candidates[0]
        return s, middle_slice(s.num_slices), "middle", None
    if cfg.selection.without_prediction == "absent":
        return None
    raise ValueError(
        f"study {study.study_id}: no labelled or predicted slice for {series_type} / {task} "
        "(pass a slice-relevance run, or set selection.without_prediction=middle|absent)"
    )


def _keypoints(
    study: Any,
    series: Any,
    centre: int,
    names: Sequence[tuple[str, str]],
    labels: Sequence[_Label],
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Keypoints (K, 2) on the grid of `series` (NaN when unknown), their slice offsets, and why
    each coordinate that could not be placed was dropped (the point is masked, never guessed)."""
    from lsdc.geometry import project_point
    from lsdc.io.dicom import AmbiguousInstanceError

    by_id = {int(s.series_id): s for s in study.series}
    lookup = {(lab.condition, lab.level): lab for lab in labels}
    pts = np.full((len(names), 2), np.nan)
    offsets = np.zeros(len(names), dtype=np.int64)
    dropped = []
    for k, name in enumerate(names):
        lab = lookup.get(name)
        if lab is None:
            continue
        src = by_id.get(lab.series_id)
        where = f"{lab.condition} {lab.level}: series {lab.series_id}"
        if src is None:
            dropped.append(f"{where} is not among the study's readable series")
            continue
        try:
            li = src.slice_index(lab.instance_number)
        except AmbiguousInstanceError:
            dropped.append(f"{where}: instance {lab.instance_number} is ambiguous (duplicated)")
            continue
        except KeyError:
            dropped.append(f"{where} has no readable instance {lab.instance_number}")
            continue
        shape = src.native_shapes[li] if src.native_shapes is not None else src.volume.shape[1:]
        rows, cols = int(shape[0]), int(shape[1])
        # Pixel centres are integers, so the image spans -0.5 .. n - 0.5.
        if not (-0.5 <= lab.x <= cols - 0.5 and -0.5 <= lab.y <= rows - 0.5):
            dropped.append(
                f"{where}: point ({lab.x:g}, {lab.y:g}) lies outside the {rows}x{cols} image of "
                f"instance {lab.instance_number}"
            )
            continue
        col, row = src.native_to_volume(li, lab.x, lab.y)
        if src is series:
            pts[k] = (col, row)
            offsets[k] = li - centre
        else:
            hit = project_point(src, li, col, row, series)
            pts[k] = (hit.col, hit.row)
            offsets[k] = hit.slice_index - centre
    return pts, offsets, dropped


def _empty_crop(size: int, k: int, slices: int) -> dict[str, np.ndarray]:
    """The arrays of a missing crop: same shapes as a present one, zero and masked."""
    return {
        "image": np.zeros((slices, size, size), np.float16),
        "hires": np.zeros((slices, 0, 0), np.float16),
        "slice_indices": np.full(slices, -1, np.int64),
        "instance_numbers": np.full(slices, -1, np.int64),
        "keypoints": np.full((k, 2), np.nan, np.float32),
        "keypoint_mask": np.zeros(k, bool),
        "keypoint_native": np.full((k, 2), np.nan, np.float32),
        "keypoint_slice_offset": np.zeros(k, np.int64),
        "window": np.zeros(4, np.int64),
        "volume_shape": np.zeros(3, np.int64),
        "flips": np.zeros(2, bool),
        "positions": np.zeros((slices, 3)),
        "orientations": np.zeros((slices, 6)),
        "pixel_spacing": np.zeros(2),
        "present": np.array(False),
    }


def _hires(stack: np.ndarray, window: tuple[int, int, int, int], max_side: int) -> np.ndarray:
    """The window of a (S, H, W) stack at native resolution, shrunk to `max_side` on its longer
    side only when larger; (S, 0, 0) when `max_side` is 0."""
    if max_side <= 0:
        return np.zeros((len(stack), 0, 0), np.float32)
    y0, y1, x0, x1 = window
    scale = min(1.0, max_side / max(y1 - y0, x1 - x0))
    shape = (max(1, round((y1 - y0) * scale)), max(1, round((x1 - x0) * scale)))
    return crop_and_resize(stack, window, shape)


def _mirror(
    image: np.ndarray,
    hires: np.ndarray,
    pts: np.ndarray,
    flips: tuple[bool, bool],
    size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stacks (S, h, w) and crop points (K, 2) mirrored by `flips` (rows, columns); pixel i of
    an n-pixel side goes to n - 1 - i, so points stay on their pixels."""
    pts = pts.copy()
    if flips[0]:
        image, hires = image[:, ::-1], hires[:, ::-1]
        pts[:, 1] = size - 1 - pts[:, 1]
    if flips[1]:
        image, hires = image[:, :, ::-1], hires[:, :, ::-1]
        pts[:, 0] = size - 1 - pts[:, 0]
    return np.ascontiguousarray(image), np.ascontiguousarray(hires), pts


def build_study(
    study_id: int,
    *,
    data_dir: Path,
    split: str,
    axial_roi: AxialRoi,
    relevance_run: Path | None,
    cfg: MultitaskConfig,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Cache builder of one study (see the module docstring for the arrays). Coordinates are
    used on the train split only, so test studies never see labels."""
    from lsdc.io.study import load_study

    descriptions = dataset_descriptions(str(data_dir), split).get(study_id)
    study = load_study(data_dir, study_id, split=split, descriptions=descriptions)
    if not study.series:  # nothing to crop: a failed study (listed), not an empty one
        raise ValueError(f"study {study_id}: no readable series ({'; '.join(study.errors)})")
    labels = dataset_labels(str(data_dir)) if split == "train" else {}
    severity = dataset_severity(str(data_dir)).get(int(study_id)) if split == "train" else None
    predictions: dict[int, Mapping[str, Any]] = {}
    oof_series: frozenset[int] = frozenset()
    # normalise_volume per series id, shared by the slice-relevance features and the crops.
    norm_cache: dict[int, np.ndarray] = {}
    if relevance_run is not None:
        from lsdc.preprocess.slice_relevance import load_oof_slices, predict_slices

        predictions = dict(predict_slices(relevance_run, study, norm_cache))
        if split == "train" and cfg.selection.oof:
            # Series the run cross-validated: its out-of-fold slices replace the final models'
            # (which were fitted on this study). Other series of the study keep the final models.
            oof = load_oof_slices(relevance_run).get(int(study_id), {})
            oof = {sid: p for sid, p in oof.items() if sid in predictions}
            predictions.update(oof)
            oof_series = frozenset(oof)
    study_labels = labels.get(study_id, ())
    size = cfg.crop_size
    n = cfg.selection.neighbours
    arrays: dict[str, np.ndarray] = {}
    crops_meta = []
    dropped_labels: list[str] = []
    window_cache: dict[int, tuple[int, int, int, int]] = {}
    for st in SERIES_TYPES:
        for task in tasks_for(st):
            key = crop_key(st, task)
            names = keypoint_names(st, task)
            chosen = _select(study, st, task, study_labels, predictions, cfg, oof_series)
            item = _empty_crop(size, len(names), 2 * n + 1)
            meta = {
                "key": key,
                "series_type": st,
                "task": task,
                "keypoint_names": [f"{c}_{lv}" for c, lv in names],
                "series_id": None,
                "source": None,
                "probability": None,
            }
            if chosen is not None:
                series, centre, source, prob = chosen
                sid = int(series.series_id)
                if sid not in norm_cache:
                    norm_cache[sid] = normalise_volume(series.volume)
                if sid not in window_cache:
                    window_cache[sid] = (
                        axial_roi.window(series.volume.shape[1:], orientation=series.orientation)
                        if st == AXIAL_T2
                        else sagittal_roi(series.volume, cfg.sagittal_roi)
                    )
                window = window_cache[sid]
                idx = np.clip(np.arange(centre - n, centre + n + 1), 0, series.num_slices - 1)
                image = crop_and_resize(norm_cache[sid][idx], window, size)
                hires = _hires(norm_cache[sid][idx], window, cfg.hires_max)
                native, offsets, lost = _keypoints(study, series, centre, names, study_labels)
                dropped_labels.extend(lost)
                for reason in lost:
                    print(f"study {study_id}: coordinate dropped, {reason}", file=sys.stderr)
                pts, inside = map_points_to_crop(native, window, size)
                flips = (
                    canonical_flips(series.orientation, AXIAL_T2)
                    if st == AXIAL_T2
                    else (False, False)
                )
                image, hires, pts = _mirror(image, hires, pts, flips, size)
                item.update(
                    image=np.clip(image, 0.0, 1.0).astype(np.float16),
                    hires=np.clip(hires, 0.0, 1.0).astype(np.float16),
                    slice_indices=idx.astype(np.int64),
                    instance_numbers=series.instance_numbers[idx].astype(np.int64),
                    keypoints=pts.astype(np.float32),
                    keypoint_mask=inside,
                    keypoint_native=native.astype(np.float32),
                    keypoint_slice_offset=offsets,
                    window=np.asarray(window, np.int64),
                    volume_shape=np.asarray(series.volume.shape, np.int64),
                    flips=np.asarray(flips, bool),
                    positions=series.positions[idx].astype(np.float64),
                    orientations=np.stack([series.slice_orientation(int(i)) for i in idx]),
                    pixel_spacing=np.asarray(series.pixel_spacing, np.float64),
                    present=np.array(True),
                )
                meta.update(series_id=sid, source=source, probability=prob)
            for name, value in item.items():
                arrays[f"{key}__{name}"] = value
            crops_meta.append(meta)
    arrays["labels"] = (
        np.asarray(severity, np.int8)
        if severity is not None
        else np.full(len(TARGETS), -1, np.int8)
    )
    from lsdc.io.study import study_warnings

    warnings = study_warnings(study, descriptions)
    if split == "train" and severity is None:
        warnings.append(UNLABELLED)
    warnings += [f"coordinate dropped: {reason}" for reason in dropped_labels]
    return arrays, {
        "study_id": int(study_id),
        "split": split,
        "crops": crops_meta,
        "series_errors": list(study.errors),
        "dropped_labels": dropped_labels,
        "warnings": warnings,
    }


# --------------------------------------------------------------------------- the dataset


def _study_ids(data_dir: Path, split: str, descriptions: Mapping[int, Any]) -> list[int]:
    folder = data_dir / f"{split}_images"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such image folder")
    on_disk = {int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()}
    # Studies listed without images fail visibly (reported per study) rather than vanish.
    return sorted(on_disk | set(descriptions))


@functools.lru_cache(maxsize=4)
def dataset_severity(data_dir: str | Path) -> dict[int, np.ndarray]:
    """Severity codes (25,) per study of `train.csv` (empty when there is none); cached per
    process so pool workers read the table once."""
    from lsdc.io.tables import read_train_labels
    from lsdc.metrics import labels_array

    path = Path(data_dir) / "train.csv"
    if not path.exists():
        return {}
    ids, codes = labels_array(read_train_labels(path))
    return {int(s): c for s, c in zip(ids, codes, strict=True)}


@functools.lru_cache(maxsize=4)
def dataset_labels(data_dir: str | Path) -> dict[int, list[_Label]]:
    """Coordinate rows per study (empty when the dataset has no coordinate table); cached per
    process so pool workers read the table once."""
    from lsdc.io.tables import read_coordinates

    path = Path(data_dir) / "train_label_coordinates.csv"
    if not path.exists():
        return {}
    coords = read_coordinates(path)
    out: dict[int, list[_Label]] = {}
    for r in coords.itertuples(index=False):
        out.setdefault(int(r.study_id), []).append(
            _Label(
                int(r.series_id),
                int(r.instance_number),
                str(r.condition),
                str(r.level),
                float(r.x),
                float(r.y),
            )
        )
    return out


def axial_roi_from_coordinates(
    data_dir: str | Path,
    labels: Mapping[int, Sequence[_Label]] | None = None,
    split: str = "train",
) -> AxialRoi:
    """Fit the `AxialRoi` to the axial label points of a dataset (default: its
    `train_label_coordinates.csv`), reading each labelled image's size and orientation from its
    DICOM header (one header per labelled file); points are taken in the canonical frame."""
    from lsdc.io.dicom import read_header

    data_dir = Path(data_dir)
    if labels is None:
        labels = dataset_labels(str(data_dir))
    axial = {c for c, t in CONDITION_SERIES.items() if t == AXIAL_T2}
    headers: dict[Path, Any] = {}
    pts = []
    for sid, labs in labels.items():
        for lab in labs:
            if lab.condition not in axial:
                continue
            path = data_dir / f"{split}_images" / str(sid) / str(lab.series_id)
            path = path / f"{lab.instance_number}.dcm"
            if path not in headers:
                try:
                    headers[path] = read_header(path)
                except Exception:  # noqa: BLE001 - a missing file only loses one statistic
                    continue
            h = headers[path]
            if not (-0.5 <= lab.x <= h.cols - 0.5 and -0.5 <= lab.y <= h.rows - 0.5):
                continue  # a point off its image would drag the window (named in preprocessing)
            pts.append(canonical_axial_fraction(lab.x, lab.y, (h.rows, h.cols), h.orientation))
    if not pts:
        raise ValueError(f"{data_dir}: no readable axial coordinates to fit the axial ROI")
    return fit_axial_roi(np.asarray(pts))


def _run_fingerprint(run: Path) -> str:
    """A hash of the files of a slice-relevance run that decide its predictions."""
    h = hashlib.sha256()
    files = [run / "config.yaml", run / "axial_roi.json", *sorted(run.glob("models/*/*"))]
    for f in files:
        if f.is_file():
            h.update(f.relative_to(run).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def preprocess_dataset(
    data_dir: str | Path,
    cache_dir: str | Path,
    *,
    split: str = "train",
    workers: int = 1,
    overrides: Sequence[str] = (),
    relevance_run: str | Path | None = None,
    progress: bool = True,
    study_ids: Sequence[int] | None = None,
    executor: Executor = LOCAL,
) -> CacheRunReport:
    """Preprocess `data_dir/<split>_images` into a multitask cache at `cache_dir`, with
    `workers` processes of `executor` (a local pool or Dask).

    The axial ROI comes from `relevance_run` (its `axial_roi.json`), else from the training
    coordinates of `data_dir`, else from `default_axial_roi`; it is saved as
    `cache_dir/axial_roi.json` and is part of the configuration hash, as is the relevance run.
    Reruns skip finished studies; a run killed midway resumes. `study_ids` restricts the run.
    """
    # Absolute: a Dask worker may run elsewhere, in another working directory.
    data_dir = Path(data_dir).resolve()
    cfg = load_config(MultitaskConfig, None, overrides)
    if cfg.selection.without_prediction not in ("error", "middle", "absent"):
        raise ValueError(
            "selection.without_prediction must be 'error', 'middle' or 'absent', "
            f"not {cfg.selection.without_prediction!r}"
        )
    descriptions = dataset_descriptions(str(data_dir), split)
    ids = list(study_ids) if study_ids is not None else _study_ids(data_dir, split, descriptions)
    labels = dataset_labels(str(data_dir)) if split == "train" else {}

    run = Path(relevance_run).resolve() if relevance_run is not None else None
    if run is not None:
        from lsdc.preprocess.slice_relevance import load_axial_roi

        axial_roi, roi_source = load_axial_roi(run), "relevance_run"
    elif labels:
        axial_roi, roi_source = axial_roi_from_coordinates(data_dir, labels), "coordinates"
    else:
        axial_roi, roi_source = cfg.default_axial_roi, "default"
    if run is None and cfg.selection.without_prediction == "error":
        unlabelled = [s for s in ids if s not in labels or not cfg.selection.prefer_labelled]
        if unlabelled:
            raise ValueError(
                f"{len(unlabelled)} of {len(ids)} studies in {data_dir / f'{split}_images'} have "
                "no labelled slices (e.g. study "
                f"{unlabelled[0]}); pass --relevance-run RUN_DIR or "
                "selection.without_prediction=middle|absent"
            )

    config = {
        **config_to_dict(cfg),
        "format": CACHE_FORMAT,
        "split": split,
        "axial_roi": axial_roi.to_dict(),
        "axial_roi_source": roi_source,
        "relevance_run": _run_fingerprint(run) if run is not None else None,
    }
    cache = StudyCache(cache_dir, PIPELINE, config)
    axial_roi.save(Path(cache_dir) / "axial_roi.json")
    build = functools.partial(
        build_study,
        data_dir=data_dir,
        split=split,
        axial_roi=axial_roi,
        relevance_run=run,
        cfg=cfg,
    )
    initializer = None
    if run is not None and (workers > 1 or executor.kind == "dask"):
        from lsdc.preprocess.slice_relevance import run_models_initializer

        # The relevance models, loaded once here and handed to every worker as it starts,
        # instead of each worker loading them from the run's files before its first study.
        initializer = run_models_initializer(run)
    report = cache.run(
        ids,
        build,
        workers=workers,
        desc=f"multitask {split}",
        progress=progress,
        executor=executor,
        initializer=initializer,
        inputs=functools.partial(input_fingerprint, data_dir, split=split),
        source=data_dir,
    )
    if study_ids is None and split == "train":
        # Studies on disk are all tried; a labelled study without images or listing is not.
        tried = set(ids)
        report.left_out = {
            sid: "labelled in train.csv but has no images and is not in "
            "train_series_descriptions.csv"
            for sid in sorted(map(int, dataset_severity(str(data_dir))))
            if sid not in tried
        }
    return report


def coordinate_table(cache: StudyCache | str | Path) -> pd.DataFrame:
    """One row per cached keypoint (study, crop key, name, crop x/y, mask): for checks/plots."""
    if not isinstance(cache, StudyCache):
        cache = StudyCache.open(cache)
    rows = []
    for sid in cache.study_ids():
        for c in load_multitask_study(cache, sid):
            for name, (x, y), ok in zip(
                c.keypoint_names, c.keypoints, c.keypoint_mask, strict=True
            ):
                rows.append(
                    {"study_id": sid, "key": c.key, "name": name, "x": x, "y": y, "valid": ok}
                )
    return pd.DataFrame(rows)
