"""Per-slice features of a series and their per-study cache."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lsdc.config import config_to_dict
from lsdc.constants import AXIAL_T2, SERIES_TYPES
from lsdc.io.study import input_fingerprint
from lsdc.preprocess.crops import (
    AxialRoi,
    SagittalRoiConfig,
    Window,
    crop_and_resize,
    sagittal_roi,
)

FEATURE_PIPELINE = "slice-relevance-features"
# Part of the feature cache's configuration hash: 2 added each series' orientation (the axial
# ROI is fitted in the canonical frame), so caches without it are refused, not misread.
FEATURE_CACHE_FORMAT = 2


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


def _percentile_positions(n: int, q: Sequence[float]) -> np.ndarray:
    """numpy's virtual index of each percentile `q` (method "linear") among `n` sorted values."""
    return (n - 1) * np.true_divide(np.asarray(q, dtype=np.float64), 100)


def _numpy_lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray) -> np.ndarray:
    """numpy's `_lerp` between neighbouring order statistics, expression for expression."""
    diff = b - a
    return np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


def _signed_or_nan(values: np.ndarray) -> bool:
    """Whether a float32 array holds a negative value, -0.0 or NaN (bit patterns above +inf's):
    only without them do values order as their bit patterns and equal values have equal bits."""
    return bool(values.view(np.uint32).max() > 0x7F800000)


def volume_percentiles(values: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """`np.percentile(values, q)` (method "linear") of a float32 array, with the same bits.

    numpy partitions a copy of the whole array, most of normalising a volume. Non-negative
    float32 values order as their bit patterns, so here each needed order statistic is found
    in the bucket of its top 16 bits (one histogram, then a partition of one small bucket), and
    interpolated with numpy's own expressions. Small arrays, negative or NaN values and end
    percentiles go to numpy itself.
    """
    flat = np.ascontiguousarray(values, dtype=np.float32).ravel()
    n = flat.size
    virtual = _percentile_positions(n, q)
    if n < 2**16 or _signed_or_nan(flat) or (virtual < 0).any() or (virtual >= n - 1).any():
        return np.percentile(flat, q)
    keys = flat.view(np.uint32)
    below = np.floor(virtual).astype(np.intp)
    ranks = np.unique(np.concatenate([below, below + 1]))
    top = keys >> 16
    counts = np.bincount(top)
    ends = np.cumsum(counts)
    found: dict[int, np.uint32] = {}
    for bucket in np.unique(np.searchsorted(ends, ranks, side="right")):
        start = int(ends[bucket] - counts[bucket])
        local = [int(r) - start for r in ranks if start <= r < ends[bucket]]
        part = np.partition(keys[top == bucket], local)
        found.update({start + k: part[k] for k in local})
    a = np.array([found[int(i)] for i in below], np.uint32).view(np.float32)
    b = np.array([found[int(i) + 1] for i in below], np.uint32).view(np.float32)
    return _numpy_lerp(a, b, virtual - below)


def row_percentiles(rows: np.ndarray, q: Sequence[float]) -> np.ndarray:
    """`np.percentile(rows, q, axis=1)` `(len(q), R)` of a float32 array `(R, N)`, with the
    same bits: one (vectorised) sort of every row instead of a partition per row; numpy itself
    for negative or NaN values and end percentiles."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    n = rows.shape[1]
    virtual = _percentile_positions(n, q)
    if _signed_or_nan(rows) or (virtual < 0).any() or (virtual >= n - 1).any():
        return np.percentile(rows, q, axis=1)
    ordered = np.sort(rows, axis=1)
    below = np.floor(virtual).astype(np.intp)
    t = (virtual - below)[:, None]
    return _numpy_lerp(ordered[:, below].T, ordered[:, below + 1].T, t)


def normalise_volume(volume: np.ndarray) -> np.ndarray:
    """Series-wise intensity normalisation to [0, 1] (1st..99.5th percentile), float32."""
    vol = np.asarray(volume, dtype=np.float32)
    lo, hi = volume_percentiles(vol, [1.0, 99.5])
    if not hi > lo:
        return np.zeros_like(vol)
    # Computed in float64 (the percentiles are), rounded once to float32: every consumer (crops,
    # the sagittal ROI) reads float32, and rounding commutes with clipping to [0, 1].
    out = ((vol - lo) / (hi - lo)).astype(np.float32)
    return np.clip(out, 0.0, 1.0, out=out)


def feature_window(series_type: str, volume: np.ndarray, cfg: FeatureConfig) -> Window:
    """The window features are computed on (see module docstring)."""
    _, h, w = volume.shape
    if series_type == AXIAL_T2:
        half = cfg.axial_box / 2
        return AxialRoi(0.5, 0.5, half, half).window((h, w), square=False)
    return sagittal_roi(volume, cfg.sagittal_roi)


def lbp_uniform(stack: np.ndarray, points: int, radius: float) -> np.ndarray:
    """`skimage.feature.local_binary_pattern(img, points, radius, "uniform")` of every image of
    a uint8 stack `(S, H, W)` at once, with the same values (int64 codes 0..points + 1).

    scikit-image's loop visits one pixel at a time; here each of the `points` circle samples is
    one shifted, bilinearly weighted copy of the zero-padded stack, computed with the very
    same float64 expressions (offsets rounded to 5 decimals, weights `r - floor(r)`, zero
    outside the image), so every comparison, and so every code, comes out the same.
    """
    img = np.asarray(stack, dtype=np.float64)
    s, h, w = img.shape
    pad = int(np.ceil(radius)) + 1
    padded = np.zeros((s, h + 2 * pad, w + 2 * pad))
    padded[:, pad : pad + h, pad : pad + w] = img
    angles = 2 * np.pi * np.arange(points) / points
    rp = np.round(-radius * np.sin(angles), 5)
    cp = np.round(radius * np.cos(angles), 5)
    rows = np.arange(h, dtype=np.float64)
    cols = np.arange(w, dtype=np.float64)

    def shifted(dr: int, dc: int) -> np.ndarray:
        return padded[:, pad + dr : pad + dr + h, pad + dc : pad + dc + w]

    # Counts up to `points` (small ints are cheaper to add than int64).
    ones = np.zeros((s, h, w), dtype=np.int16)
    changes = np.zeros((s, h, w), dtype=np.int16)
    value, lower = np.empty((s, h, w)), np.empty((s, h, w))  # reused: no fresh pages per point
    # `(1 - dc) * a + dc * b` along every padded row, per column offset: samples that differ
    # only in their row offset (mirror images about the horizontal) share it.
    along_rows: dict[float, np.ndarray] = {}
    prev = None
    for i in range(points):
        r, c = rows + rp[i], cols + cp[i]
        r0, c0 = int(np.floor(rp[i])), int(np.floor(cp[i]))
        r1, c1 = int(np.ceil(rp[i])), int(np.ceil(cp[i]))
        # Per row / column, as scikit-image computes them: (row + offset) - floor(row + offset).
        dr = (r - np.floor(r))[:, None]
        dc = (c - np.floor(c))[None, :]
        # `value - img >= 0` is `value >= img` for finite floats (a difference rounds to 0 only
        # when the two are equal), so the comparisons below are scikit-image's.
        if not dr.any() and not dc.any():
            # On the pixel grid (e.g. the four axis-aligned samples): the bilinear sample is
            # (1 - 0) * pixel + 0 * neighbour, the pixel itself, bit for bit.
            bit = shifted(r0, c0) >= img
        else:
            # (1 - dr) * ((1 - dc) * a + dc * b) + dr * ((1 - dc) * c + dc * d): the same
            # products and sums in the same order (products commute exactly).
            if cp[i] not in along_rows:
                left = padded[:, :, pad + c0 : pad + c0 + w]
                right = padded[:, :, pad + c1 : pad + c1 + w]
                along_rows[cp[i]] = left * (1 - dc) + right * dc
            interp = along_rows[cp[i]]
            np.multiply(interp[:, pad + r0 : pad + r0 + h], 1 - dr, out=value)
            np.multiply(interp[:, pad + r1 : pad + r1 + h], dr, out=lower)
            value += lower
            bit = value >= img
        ones += bit
        if prev is not None:  # 0/1 transitions along the circle, not wrapping (as skimage)
            changes += bit != prev
        prev = bit
    return np.where(changes <= 2, ones, points + 1).astype(np.int64)


def _lbp_histograms(stack_u8: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """(S, len(lbp_radii) * (lbp_points + 2)) LBP code frequencies of every image."""
    s = len(stack_u8)
    bins = cfg.lbp_points + 2
    out = []
    for r in cfg.lbp_radii:
        codes = lbp_uniform(stack_u8, cfg.lbp_points, r).reshape(s, -1)
        offset = codes + bins * np.arange(s)[:, None]
        hist = np.bincount(offset.ravel(), minlength=bins * s).reshape(s, bins)
        out.append(hist / codes.shape[1])
    return np.concatenate(out, axis=1)


def _glcm_properties(crops: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """(S, len(_GLCM_PROPS) * len(glcm_distances)) GLCM properties of every [0, 1] image,
    averaged over four angles.

    One co-occurrence matrix per image, but each property computed once for the whole stack:
    the matrices sit side by side on the angle axis, which `graycoprops` treats independently,
    so the values are those of one call per image (tests compare them) at a sixth of the cost.
    """
    from skimage.feature import graycomatrix, graycoprops

    s = len(crops)
    angles = [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]
    q = np.minimum((crops * cfg.glcm_levels).astype(np.uint8), cfg.glcm_levels - 1)
    glcms = [
        graycomatrix(
            img,
            distances=list(cfg.glcm_distances),
            angles=angles,
            levels=cfg.glcm_levels,
            symmetric=True,
            normed=True,
        )
        for img in q
    ]  # each (L, L, D, A)
    stacked = np.concatenate(glcms, axis=3)  # (L, L, D, S * A), image-major
    d = len(cfg.glcm_distances)
    props = [
        graycoprops(stacked, p).reshape(d, s, len(angles)).mean(axis=2).T  # (S, D)
        for p in _GLCM_PROPS
    ]
    return np.concatenate(props, axis=1)


def _texture_features(crops: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """(S, C) compact descriptors of every [0, 1] image of a stack `(S, n, n)`: intensity stats,
    LBP, GLCM. Each statistic is one reduction over the stack with the same per-image values
    as one call per image (same reduction order per image; tests compare the bits).
    """
    s, n = len(crops), crops.shape[1]
    c0, c1 = n // 3, n - n // 3
    flat = crops.reshape(s, -1)

    def mean(a: np.ndarray) -> np.ndarray:
        return a.mean(axis=tuple(range(1, a.ndim)))

    stats = [
        flat.mean(axis=1),
        flat.std(axis=1),
        *row_percentiles(flat, [5, 25, 50, 75, 95]),
        (flat > 0.6).mean(axis=1),
        mean(crops[:, c0:c1, c0:c1]),
        crops[:, c0:c1, c0:c1].std(axis=(1, 2)),
        mean(crops[:, : n // 2]) - mean(crops[:, n // 2 :]),
        mean(crops[:, :, : n // 2]) - mean(crops[:, :, n // 2 :]),
        mean(np.abs(np.diff(crops, axis=1))),
        mean(np.abs(np.diff(crops, axis=2))),
    ]
    lbp = _lbp_histograms(np.round(crops * 255).astype(np.uint8), cfg)  # (S, L)
    glcm = _glcm_properties(crops, cfg)  # (S, G)
    # Each statistic keeps its own precision (percentiles come in float64), as per image.
    out = np.concatenate([np.stack(stats, axis=1).astype(np.float64), lbp, glcm], axis=1)
    # Correlation is undefined on a constant image; 0 keeps features finite and deterministic.
    return np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def hog_stack(stack: np.ndarray, orientations: int, cell: int, block: int) -> np.ndarray:
    """`skimage.feature.hog(img, orientations, (cell, cell), (block, block))` (L2-Hys,
    feature vector) of every image of a stack `(S, H, W)` at once, with the same bits `(S, F)`.

    scikit-image runs one image at a time (a Cython loop per cell and orientation, a Python loop
    per block); here every step runs on the whole stack with the same arithmetic: gradients in
    the image's float type, magnitude and orientation in float64, each cell's sum accumulated
    in float32 pixel by pixel in the cell's row-major order (as scikit-image's `float total`),
    each block normalised with the same reductions over the same contiguous block values.
    """
    img = np.asarray(stack)
    img = img.astype(np.float32 if img.dtype == np.float32 else np.float64, copy=False)
    s, h, w = img.shape
    nr, nc = h // cell, w // cell
    nbr, nbc = nr - block + 1, nc - block + 1
    if nbr <= 0 or nbc <= 0:
        raise ValueError(f"images of {h}x{w} are too small for HOG blocks of {block * cell} px")
    g_row = np.zeros_like(img)
    g_col = np.zeros_like(img)
    g_row[:, 1:-1] = img[:, 2:] - img[:, :-2]
    g_col[:, :, 1:-1] = img[:, :, 2:] - img[:, :, :-2]
    g_row, g_col = g_row.astype(np.float64), g_col.astype(np.float64)
    magnitude = np.hypot(g_col, g_row)
    degrees = np.rad2deg(np.arctan2(g_row, g_col))  # in [-180, 180]
    # skimage takes `degrees % 180`; on [-180, 180] that is `degrees + 180` below 0 (which
    # rounds to 180 for a tiny negative angle), 0 at exactly 180 and `degrees` elsewhere,
    # without the cost of a float remainder.
    angle = np.where(degrees < 0, degrees + 180.0, degrees)
    angle[degrees == 180.0] = 0.0
    # A pixel counts in bin i when end_i <= angle < start_i, the bounds float32 as in skimage;
    # an angle of 180 is in none (the spare slot). Counting bounds beats a search.
    per_bin = np.float32(180.0 / orientations)
    bounds = (per_bin * np.arange(orientations + 1, dtype=np.float32)).astype(np.float64)
    bins = np.zeros(angle.shape, np.uint8)
    for bound in bounds[1:]:
        bins += angle >= bound
    n = s * nr * nc

    def pixel_major(a: np.ndarray) -> np.ndarray:  # (cell * cell, S * nr * nc)
        a = a[:, : nr * cell, : nc * cell].reshape(s, nr, cell, nc, cell)
        return a.transpose(2, 4, 0, 1, 3).reshape(cell * cell, n)

    magnitude, bins = pixel_major(magnitude), pixel_major(bins)
    slots = bins + (orientations + 1) * np.arange(n)
    total = np.zeros(n * (orientations + 1), np.float32)
    for k in range(cell * cell):  # float64 sum rounded to float32 at every step, as skimage
        i = slots[k]
        total[i] = total[i] + magnitude[k]
    hist = total.reshape(s, nr, nc, orientations + 1)[..., :orientations]
    hist = (hist / np.float32(cell * cell)).astype(np.float64)
    eps2 = 1e-5**2
    out = np.empty((s, nbr, nbc, block, block, orientations), img.dtype)
    for r in range(nbr):
        for c in range(nbc):
            b = hist[:, r : r + block, c : c + block, :]
            b = b / np.sqrt((b**2).reshape(s, -1).sum(axis=1) + eps2)[:, None, None, None]
            b = np.minimum(b, 0.2)
            out[:, r, c] = (
                b / np.sqrt((b**2).reshape(s, -1).sum(axis=1) + eps2)[:, None, None, None]
            )
    return out.reshape(s, -1)


def _image_features(crops: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    """(S, I): HOG plus a mean-pooled thumbnail of every [0, 1] image of a stack."""
    parts = [
        hog_stack(crops, cfg.hog_orientations, cfg.hog_pixels_per_cell, cfg.hog_cells_per_block)
    ]
    if cfg.thumbnail:
        s, n = len(crops), crops.shape[1]
        k, t = n // cfg.thumbnail, cfg.thumbnail
        thumb = crops[:, : k * t, : k * t].reshape(s, t, k, t, k).mean(axis=(2, 4))
        parts.append(thumb.reshape(s, -1))
    return np.concatenate(parts, axis=1).astype(np.float64)


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
    *,
    normalised: np.ndarray | None = None,
) -> np.ndarray:
    """Per-slice features `(S, F)` float32 of one series volume `(S, H, W)` (position-sorted).

    `normalised` is `normalise_volume(volume)` when the caller has it already (the multitask
    crops use it too), so it is not computed twice. Deterministic: the same volume and config
    give the same bytes.
    """
    vol = normalise_volume(volume) if normalised is None else normalised
    window = feature_window(series_type, vol, cfg)
    crops = crop_and_resize(vol, window, cfg.image_size)  # (S, n, n)
    # C order: the per-stack reductions below then visit each image as a per-image call would.
    crops = np.ascontiguousarray(np.clip(crops, 0.0, 1.0))
    compact = _texture_features(crops, cfg)  # (S, C)
    image = _image_features(crops, cfg)  # (S, I)
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


def series_features(
    series: Any, cfg: FeatureConfig, *, normalised: np.ndarray | None = None
) -> SeriesFeatures:
    """`SeriesFeatures` of one `lsdc.io.dicom.Series` (its `series_type` must be set);
    `normalised`: `normalise_volume(series.volume)` when the caller has it."""
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
            series.volume,
            series.positions,
            series.orientation,
            series.series_type,
            cfg,
            normalised=normalised,
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
    return cache.run(
        study_ids,
        build,
        workers=workers,
        desc="slice features",
        progress=progress,
        inputs=functools.partial(input_fingerprint, data_dir, split=split),
        source=data_dir,
    )
