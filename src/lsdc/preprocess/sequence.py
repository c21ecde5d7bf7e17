"""Sequence-pipeline preprocessing: one study -> 3 series types x N ordered, cropped slices.

Per study and series type (order of `constants.SERIES_TYPES`):
1. canonical orientation: every image is flipped in-plane (never rotated) so that sagittal
   columns run anterior->posterior and rows superior->inferior, axial columns run patient
   right->left (+x, LPS) and rows anterior->posterior;
2. slices ordered by position along a fixed patient axis: sagittal by +x (patient right ->
   left), axial by -z (head -> feet). Several Axial T2 series are merged into one stack by their
   position along the first one's normal;
3. crop to the spine region (`lsdc.preprocess.crops`: `sagittal_roi` from the image, the
   statistical `AxialRoi` window for axial) and resize to `size` x `size`;
4. percentile intensity normalisation per series (before merging: series differ in scale);
5. `num_slices` indices evenly spaced over the ordered stack (`linspace(0, S-1, N)`): nearest
   slice (repeating when the stack is shorter) or linear interpolation between neighbours.

The fixed canonical frame is what makes the left/right flip augmentation exact: mirroring the
patient (x -> -x) reverses the sagittal slice order and flips axial columns, nothing else.

Cache arrays per study: `images` (3, N, size, size) uint8, `series_mask` (3,) bool,
`slice_positions` (3, N) float32 (mm along the ordering axis, NaN for a missing series) and, for
split=train, `labels` (25,) int8 (0/1/2, -1 = unlabelled).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lsdc.config import config_to_dict, load_config
from lsdc.constants import AXIAL_T2, SERIES_TYPES, TARGETS
from lsdc.io.study import input_fingerprint
from lsdc.parallel import LOCAL, Executor
from lsdc.preprocess.cache import UNLABELLED, CacheRunReport, StudyArrays, StudyCache
from lsdc.preprocess.crops import (
    AxialRoi,
    SagittalRoiConfig,
    canonical_flips,
    crop_and_resize,
    sagittal_roi,
)

PIPELINE = "sequence"


@dataclass
class AxialWindowConfig:
    """Axial crop window in fractions of the image (see `crops.AxialRoi`)."""

    center_x: float = 0.5
    center_y: float = 0.5
    half_width: float = 0.3
    half_height: float = 0.3


@dataclass
class SequencePreprocessConfig:
    num_slices: int = 10
    size: int = 128
    # Linear interpolation between the two neighbouring slices of a fractional index; False
    # takes the nearest slice (so a stack shorter than num_slices repeats slices).
    interpolate: bool = False
    percentile_low: float = 0.5
    percentile_high: float = 99.5
    sagittal_roi: SagittalRoiConfig = field(default_factory=SagittalRoiConfig)
    axial_roi: AxialWindowConfig = field(default_factory=AxialWindowConfig)
    # An `AxialRoi` JSON (e.g. fitted on training coordinates by the multitask pipeline); its
    # values replace `axial_roi` and are recorded in the cache manifest.
    axial_roi_path: str | None = None


# --------------------------------------------------------------------------- pure pieces


def even_indices(num_source: int, num_out: int) -> np.ndarray:
    """`num_out` fractional indices evenly spaced over `[0, num_source - 1]` (both ends kept)."""
    if num_source < 1 or num_out < 1:
        raise ValueError(f"need at least one slice in and out, got {num_source} -> {num_out}")
    return np.linspace(0.0, num_source - 1.0, num_out)


def sample_stack(
    stack: np.ndarray, positions: np.ndarray, num_out: int, *, interpolate: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pick `num_out` evenly spaced slices of an ordered stack (S, H, W) with slice positions (S,).

    Returns (slices (num_out, H, W) float32, fractional source indices (num_out,), positions
    (num_out,) in mm, interpolated like the pixels).
    """
    idx = even_indices(stack.shape[0], num_out)
    if not interpolate:
        # round-half-up, not numpy's banker's rounding, so repeats are spread evenly
        near = np.floor(idx + 0.5).astype(np.int64)
        return stack[near].astype(np.float32), near.astype(np.float64), positions[near]
    lo = np.floor(idx).astype(np.int64)
    hi = np.minimum(lo + 1, stack.shape[0] - 1)
    t = (idx - lo).astype(np.float32)
    out = stack[lo] * (1 - t)[:, None, None] + stack[hi] * t[:, None, None]
    return out.astype(np.float32), idx, positions[lo] * (1 - t) + positions[hi] * t


def ordering_axis(series_type: str) -> np.ndarray:
    """Patient direction along which a type's slices are ordered (see module docstring)."""
    return np.array([0.0, 0.0, -1.0]) if series_type == AXIAL_T2 else np.array([1.0, 0.0, 0.0])


def slice_coordinates(
    positions: np.ndarray, orientation: Sequence[float], axis: np.ndarray
) -> np.ndarray:
    """Slice coordinate (S,) in mm along the slice normal, signed to agree with `axis`."""
    from lsdc.geometry import slice_normal

    n = slice_normal(orientation)
    if float(n @ axis) < 0:
        n = -n
    return np.asarray(positions, dtype=np.float64).reshape(-1, 3) @ n


def normalise_intensity(stack: np.ndarray, low: float, high: float) -> np.ndarray:
    """Percentile window of the whole stack -> [0, 1] float32 (a flat stack gives zeros)."""
    lo, hi = np.percentile(stack, [low, high])
    if not np.isfinite(hi - lo) or hi - lo < 1e-6:
        return np.zeros_like(stack, dtype=np.float32)
    return np.clip((stack - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


@dataclass
class ProcessedStack:
    """One series type of one study after ordering, cropping and sampling."""

    slices: np.ndarray  # (num_slices, size, size) float32 in [0, 1]
    source_indices: np.ndarray  # (num_slices,) fractional index into the merged ordered stack
    positions: np.ndarray  # (num_slices,) mm along the type's ordering axis
    series_ids: list[int]
    num_source_slices: int
    windows: dict[int, list[int]]  # series id -> crop window (y0, y1, x0, x1), native pixels


def _crop_window(
    volume: np.ndarray, series_type: str, cfg: SequencePreprocessConfig
) -> tuple[int, int, int, int]:
    if series_type == AXIAL_T2:
        a = cfg.axial_roi
        roi = AxialRoi(a.center_x, a.center_y, a.half_width, a.half_height)
        return roi.window(volume.shape[1:])
    return sagittal_roi(volume, cfg.sagittal_roi)


def process_type(
    series_list: Sequence[Any], series_type: str, cfg: SequencePreprocessConfig
) -> ProcessedStack:
    """Series of one type (already read, each position-sorted) -> one `ProcessedStack`.

    Axial series are all merged; of several sagittal series of one type the one with the most
    slices is used (then the lowest id), because sagittal series repeat the same anatomy.
    """
    if not series_list:
        raise ValueError(f"no {series_type} series")
    if series_type != AXIAL_T2:
        series_list = [min(series_list, key=lambda s: (-s.num_slices, s.series_id))]
    axis = ordering_axis(series_type)
    # The first series' normal orders everything, so merged axial series share one coordinate.
    from lsdc.geometry import slice_normal

    ref = slice_normal(series_list[0].orientation)
    if float(ref @ axis) < 0:
        ref = -ref
    stacks, coords, windows = [], [], {}
    for s in series_list:
        vol = np.asarray(s.volume, dtype=np.float32)
        flip_rows, flip_cols = canonical_flips(s.orientation, series_type)
        if flip_rows:
            vol = vol[:, ::-1]
        if flip_cols:
            vol = vol[:, :, ::-1]
        window = _crop_window(vol, series_type, cfg)
        windows[int(s.series_id)] = [int(v) for v in window]
        crop = crop_and_resize(np.ascontiguousarray(vol), window, cfg.size)
        stacks.append(normalise_intensity(crop, cfg.percentile_low, cfg.percentile_high))
        coords.append(np.asarray(s.positions, dtype=np.float64).reshape(-1, 3) @ ref)
    stack = np.concatenate(stacks)
    coord = np.concatenate(coords)
    order = np.argsort(coord, kind="stable")
    slices, idx, pos = sample_stack(
        stack[order], coord[order], cfg.num_slices, interpolate=cfg.interpolate
    )
    return ProcessedStack(
        slices=slices,
        source_indices=idx,
        positions=pos,
        series_ids=[int(s.series_id) for s in series_list],
        num_source_slices=int(stack.shape[0]),
        windows=windows,
    )


def build_study_arrays(
    study: Any,
    cfg: SequencePreprocessConfig,
    labels: Sequence[int] | None = None,
    descriptions: Mapping[int, str] | None = None,
) -> StudyArrays:
    """A `Study` (its series typed) -> cache arrays and meta (see module docstring); the meta's
    `warnings` say why the study is degraded (`lsdc.io.study.study_warnings`)."""
    from lsdc.io.study import study_warnings

    n, size = cfg.num_slices, cfg.size
    images = np.zeros((len(SERIES_TYPES), n, size, size), np.uint8)
    mask = np.zeros(len(SERIES_TYPES), bool)
    positions = np.full((len(SERIES_TYPES), n), np.nan, np.float32)
    meta: dict[str, Any] = {
        "study_id": int(study.study_id),
        "series": {},
        "errors": list(study.errors),
        "warnings": study_warnings(study, descriptions),
    }
    for ti, series_type in enumerate(SERIES_TYPES):
        found = study.of_type(series_type)
        if not found:
            continue
        stack = process_type(found, series_type, cfg)
        images[ti] = np.round(stack.slices * 255.0).astype(np.uint8)
        positions[ti] = stack.positions
        mask[ti] = True
        meta["series"][series_type] = {
            "series_ids": stack.series_ids,
            "source_indices": [round(float(v), 4) for v in stack.source_indices],
            "num_source_slices": stack.num_source_slices,
            "windows": {str(k): v for k, v in stack.windows.items()},
        }
    arrays = {"images": images, "series_mask": mask, "slice_positions": positions}
    if labels is not None:
        lab = np.asarray(labels, dtype=np.int8)
        if lab.shape != (len(TARGETS),):
            raise ValueError(f"study {study.study_id}: labels must have {len(TARGETS)} entries")
        arrays["labels"] = lab
    return arrays, meta


# --------------------------------------------------------------------------- dataset level


@dataclass
class _StudyBuilder:
    """Picklable per-study worker for `StudyCache.run`."""

    data_dir: Path
    split: str
    cfg: SequencePreprocessConfig
    descriptions: dict[int, dict[int, str]]
    labels: dict[int, list[int]] | None

    def __call__(self, study_id: int) -> StudyArrays:
        from lsdc.io.study import load_study

        study = load_study(
            self.data_dir,
            study_id,
            split=self.split,
            descriptions=self.descriptions.get(study_id, {}),
        )
        if not study.series:
            raise ValueError(f"study {study_id}: no readable series ({'; '.join(study.errors)})")
        labels = None
        if self.labels is not None:
            labels = self.labels.get(study_id, [-1] * len(TARGETS))
        arrays, meta = build_study_arrays(
            study, self.cfg, labels, self.descriptions.get(study_id, {})
        )
        if self.labels is not None and study_id not in self.labels:
            meta["warnings"].append(UNLABELLED)
        return arrays, meta


def resolve_config(
    config_path: str | Path | None = None, overrides: Sequence[str] = ()
) -> SequencePreprocessConfig:
    """Schema <- YAML <- overrides, with `axial_roi_path` read into `axial_roi` so the cache
    manifest records the window actually used."""
    cfg = load_config(SequencePreprocessConfig, config_path, overrides)
    if cfg.axial_roi_path:
        roi = AxialRoi.load(cfg.axial_roi_path)
        cfg.axial_roi = AxialWindowConfig(
            roi.center_x, roi.center_y, roi.half_width, roi.half_height
        )
    if cfg.num_slices < 1 or cfg.size < 8:
        raise ValueError(f"num_slices must be >= 1 and size >= 8, got {cfg.num_slices}, {cfg.size}")
    return cfg


def read_split_tables(
    data_dir: Path, split: str
) -> tuple[dict[int, dict[int, str]], dict[int, list[int]] | None]:
    """(study -> {series id -> type}, study -> 25 label codes or None for the test split)."""
    from lsdc.io.tables import read_series_descriptions

    desc = read_series_descriptions(data_dir / f"{split}_series_descriptions.csv")
    descriptions: dict[int, dict[int, str]] = {}
    for sid, ser, text in desc[["study_id", "series_id", "series_description"]].itertuples(
        index=False
    ):
        descriptions.setdefault(int(sid), {})[int(ser)] = str(text)
    if split != "train":
        return descriptions, None
    from lsdc.io.tables import read_train_labels
    from lsdc.metrics import labels_array

    ids, codes = labels_array(read_train_labels(data_dir / "train.csv"))
    return descriptions, {int(s): c.tolist() for s, c in zip(ids, codes, strict=True)}


def preprocess_dataset(
    data_dir: str | Path,
    cache_dir: str | Path,
    *,
    split: str = "train",
    workers: int = 1,
    overrides: Sequence[str] = (),
    config_path: str | Path | None = None,
    study_ids: Sequence[int] | None = None,
    progress: bool = True,
    executor: Executor = LOCAL,
) -> CacheRunReport:
    """Preprocess every study of `split` (those in its series-descriptions table, or
    `study_ids`) into a resumable `StudyCache` at `cache_dir`, with `workers` processes of
    `executor` (a local pool or Dask)."""
    # Absolute: a Dask worker may run elsewhere, in another working directory.
    data_dir = Path(data_dir).resolve()
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    cfg = resolve_config(config_path, overrides)
    descriptions, labels = read_split_tables(data_dir, split)
    config = {**config_to_dict(cfg), "split": split}
    cache = StudyCache(cache_dir, PIPELINE, config)
    ids = sorted(descriptions) if study_ids is None else [int(s) for s in study_ids]
    builder = _StudyBuilder(data_dir, split, cfg, descriptions, labels)
    report = cache.run(
        ids,
        builder,
        workers=workers,
        desc=f"sequence {split}",
        progress=progress,
        executor=executor,
        inputs=functools.partial(input_fingerprint, data_dir, split=split),
        source=data_dir,
    )
    if study_ids is None:
        report.left_out = left_out_studies(data_dir, split, set(ids), labels)
    return report


def left_out_studies(
    data_dir: Path, split: str, tried: set[int], labels: Mapping[int, Any] | None
) -> dict[int, str]:
    """Studies on disk or labelled that a run over `tried` never looks at, with why: the
    pipelines take their study list from `<split>_series_descriptions.csv`."""
    folder = data_dir / f"{split}_images"
    table = f"{split}_series_descriptions.csv"
    out: dict[int, str] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_dir() and p.name.isdigit() and int(p.name) not in tried:
                out[int(p.name)] = f"has images but is not in {table}"
    for sid in labels or {}:
        if int(sid) not in tried and int(sid) not in out:
            out[int(sid)] = f"labelled in train.csv but has no images and is not in {table}"
    return dict(sorted(out.items()))


def plot_sequence_study(cache_dir: str | Path, study_id: int, out: str | Path) -> Path:
    """PNG of one cached study: a row per series type (missing ones greyed), its N slices in
    order, with the slice position (mm along the type's ordering axis) above each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cache = StudyCache.open(cache_dir)
    if cache.pipeline != PIPELINE:
        raise ValueError(f"{cache_dir}: a {cache.pipeline!r} cache, not {PIPELINE!r}")
    if not cache.has(study_id):
        raise KeyError(f"{cache_dir}: study {study_id} is not in the cache")
    arrays, meta = cache.load(study_id)
    images, mask, pos = arrays["images"], arrays["series_mask"], arrays["slice_positions"]
    n_types, n = images.shape[:2]
    fig, axes = plt.subplots(n_types, n, figsize=(1.4 * n, 1.6 * n_types), squeeze=False)
    for ti in range(n_types):
        for k in range(n):
            ax = axes[ti, k]
            ax.imshow(images[ti, k], cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
            if mask[ti]:
                ax.set_title(f"{pos[ti, k]:.0f} mm", fontsize=7)
            if k == 0:
                label = SERIES_TYPES[ti] + ("" if mask[ti] else "\n(missing)")
                ax.set_ylabel(label, fontsize=8)
    sagittal_note = (
        "sagittal: patient right -> left; axial: head -> feet, patient left on the right"
    )
    fig.suptitle(f"study {study_id} — {sagittal_note}", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out)
    return out
