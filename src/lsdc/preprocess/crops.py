"""Regions of interest, crops and the coordinate mapping between native pixels and crops.

Conventions (binding for every caller):
- A *window* is `(y0, y1, x0, x1)`: integer, half-open pixel bounds `[y0, y1) x [x0, x1)` in the
  native image. It may reach outside the image; outside pixels read as 0.
- Pixel coordinates are continuous with pixel *centres* at integers (pixel `i` covers
  `[i - 0.5, i + 0.5)`), the convention of the RSNA coordinate table and of numpy indexing.
- A crop of `window` resized to `(h, w)` maps native `(x, y)` to crop
  `((x - x0 + 0.5) * w / (x1 - x0) - 0.5, (y - y0 + 0.5) * h / (y1 - y0) - 0.5)`;
  `crop_and_resize` samples exactly this mapping, so a point and the pixels under it stay together
  and `map_points_from_crop` inverts it exactly.

Sagittal windows are found from the image itself (`sagittal_roi`); axial windows come from
statistics of training coordinates (`AxialRoi`, saved as JSON with the run that fitted it).
`AxialRoi` fractions are in the *canonical* axial frame (columns toward patient left, rows toward
posterior, `canonical_flips`): real axial series may store rows or columns the other way, and
fractions of the native image would then put the window on the mirrored side.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from lsdc.fileio import atomic_write_json

Window = tuple[int, int, int, int]  # (y0, y1, x0, x1), half-open, native pixels


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def _check_window(window: Window) -> tuple[int, int, int, int]:
    y0, y1, x0, x1 = (int(v) for v in window)
    if y1 <= y0 or x1 <= x0:
        raise ValueError(f"empty crop window {window}")
    return y0, y1, x0, x1


def canonical_flips(orientation: Sequence[float], series_type: str) -> tuple[bool, bool]:
    """(flip rows, flip columns) that bring an image into the canonical frame of its type:
    axial columns -> +x (patient left), rows -> +y (posterior); sagittal columns -> +y
    (posterior), rows -> -z (feet). `series_type` is compared with `constants.AXIAL_T2`."""
    from lsdc.constants import AXIAL_T2

    o = np.asarray(orientation, dtype=np.float64).reshape(6)
    row_dir, col_dir = o[:3], o[3:]  # directions of growing column index / growing row index
    if series_type == AXIAL_T2:
        return bool(col_dir[1] < 0), bool(row_dir[0] < 0)
    return bool(col_dir[2] > 0), bool(row_dir[1] < 0)


def flip_window(window: Window, shape_hw: tuple[int, int], flips: tuple[bool, bool]) -> Window:
    """The same pixels' window after mirroring an image of `shape_hw` (rows, then columns); its
    own inverse."""
    y0, y1, x0, x1 = (int(v) for v in window)
    h, w = shape_hw
    if flips[0]:
        y0, y1 = h - y1, h - y0
    if flips[1]:
        x0, x1 = w - x1, w - x0
    return y0, y1, x0, x1


def canonical_axial_fraction(
    x: float, y: float, shape_hw: tuple[int, int], orientation: Sequence[float]
) -> tuple[float, float]:
    """A native axial pixel point -> x/y fractions of the image in the canonical frame (what
    `fit_axial_roi` takes)."""
    from lsdc.constants import AXIAL_T2

    rows, cols = shape_hw
    flip_rows, flip_cols = canonical_flips(orientation, AXIAL_T2)
    # Pixel i mirrors to n - 1 - i (centres at integers), matching `flip_window`.
    cx = (cols - 1 - x) if flip_cols else x
    cy = (rows - 1 - y) if flip_rows else y
    return float(cx) / cols, float(cy) / rows


# --------------------------------------------------------------------------- coordinate mapping


def map_points_to_crop(
    points_xy: np.ndarray, window: Window, size: int | tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Native `(N, 2)` x/y points -> crop pixel coordinates and a validity mask.

    Returns `(points (N, 2) float64, valid (N,) bool)`: `valid` is False for missing points (NaN)
    and for points that fall outside the crop; their coordinates are still mapped (NaN stays NaN)
    so a caller can see how far outside they lie.
    """
    y0, y1, x0, x1 = _check_window(window)
    h, w = _size_hw(size)
    pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    out = np.empty_like(pts)
    out[:, 0] = (pts[:, 0] - x0 + 0.5) * (w / (x1 - x0)) - 0.5
    out[:, 1] = (pts[:, 1] - y0 + 0.5) * (h / (y1 - y0)) - 0.5
    return out, points_inside(out, (h, w))


def map_points_from_crop(
    points_xy: np.ndarray, window: Window, size: int | tuple[int, int]
) -> np.ndarray:
    """Crop pixel `(N, 2)` x/y points -> native pixel coordinates (exact inverse)."""
    y0, y1, x0, x1 = _check_window(window)
    h, w = _size_hw(size)
    pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    out = np.empty_like(pts)
    out[:, 0] = (pts[:, 0] + 0.5) * ((x1 - x0) / w) + x0 - 0.5
    out[:, 1] = (pts[:, 1] + 0.5) * ((y1 - y0) / h) + y0 - 0.5
    return out


def points_inside(points_xy: np.ndarray, shape_hw: tuple[int, int]) -> np.ndarray:
    """Mask of points that are finite and lie on an image of `shape_hw` (pixel centres)."""
    pts = np.asarray(points_xy, dtype=np.float64).reshape(-1, 2)
    h, w = shape_hw
    with np.errstate(invalid="ignore"):
        return (
            np.isfinite(pts).all(axis=1)
            & (pts[:, 0] >= -0.5)
            & (pts[:, 0] < w - 0.5)
            & (pts[:, 1] >= -0.5)
            & (pts[:, 1] < h - 0.5)
        )


# --------------------------------------------------------------------------- crop + resize


def _linear_taps(
    n_out: int, n_in: int, zoom: float, offset: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Along one axis, for output index k sampling input coordinate `k * zoom + offset`: the two
    source indices, their weights and whether k lies on the input, computed as
    `scipy.ndimage.affine_transform` (order 1, mode "constant") does: coordinate
    `(k + offset / zoom) * zoom`; weights `1 - f` and `1 - (1 - f)`; outside `[0, n_in - 1]`
    the output is 0; at the last pixel the (zero-weight) neighbour is mirrored."""
    cc = (np.arange(n_out, dtype=np.float64) + offset / zoom) * zoom
    inside = (cc >= 0) & (cc <= n_in - 1)
    cc = np.where(inside, cc, 0.0)
    start = np.floor(cc)
    w0 = 1.0 - (cc - start)
    w1 = 1.0 - w0
    i0 = start.astype(np.intp)
    i1 = np.where(i0 + 1 < n_in, i0 + 1, max(n_in - 2, 0))
    return i0, i1, w0, w1, inside


def crop_and_resize(
    image: np.ndarray, window: Window, size: int | tuple[int, int], *, order: int = 1
) -> np.ndarray:
    """Crop `image` ((H, W) or a stack (S, H, W)) to `window` and resize to `size`, float32.

    Bilinear (`order=1`) sampling of exactly the mapping of `map_points_to_crop`; when shrinking,
    a Gaussian prefilter (sigma = (factor - 1) / 2, as scikit-image does) avoids aliasing.
    Pixels outside the native image are 0.

    A stack is resampled in one pass with the arithmetic of `scipy.ndimage.affine_transform`
    (order 1) on each image: per pixel `t = 0.0; t += (v * wy) * wx` over the four neighbours
    in float64, rounded to float32, so the values are those of one scipy call per image (tests
    compare the bits) without a call per slice; a window of the output's size (no resampling)
    is a copy. Other orders go through scipy one image at a time.
    """
    img = np.asarray(image, dtype=np.float32)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected (H, W) or (S, H, W), got shape {img.shape}")
    if img.ndim == 2:
        return crop_and_resize(img[None], window, size, order=order)[0]
    y0, y1, x0, x1 = _check_window(window)
    h, w = _size_hw(size)
    fy, fx = (y1 - y0) / h, (x1 - x0) / w
    sigma = (max(0.0, (fy - 1) / 2), max(0.0, (fx - 1) / 2))
    if sigma[0] > 0 or sigma[1] > 0:
        # Filter only the part that is sampled (plus the filter's reach) to keep big images cheap.
        pad = int(np.ceil(4 * max(sigma))) + 2
        ry0, ry1 = max(0, y0 - pad), min(img.shape[1], y1 + pad)
        rx0, rx1 = max(0, x0 - pad), min(img.shape[2], x1 + pad)
        if ry1 <= ry0 or rx1 <= rx0:
            return np.zeros((len(img), h, w), np.float32)
        # Sigma 0 along the stack: scipy skips that axis, each image is filtered on its own.
        img = ndimage.gaussian_filter(img[:, ry0:ry1, rx0:rx1], (0.0, *sigma), mode="nearest")
        y0, y1, x0, x1 = y0 - ry0, y1 - ry0, x0 - rx0, x1 - rx0
    # output[i, j] = input[fy * i + oy, fx * j + ox], the pixel-centre mapping above.
    offset = (y0 - 0.5 + 0.5 * fy, x0 - 0.5 + 0.5 * fx)
    if order != 1:
        return np.stack(
            [
                ndimage.affine_transform(
                    im, (fy, fx), offset=offset, output_shape=(h, w), order=order,
                    mode="constant", cval=0.0,
                ).astype(np.float32, copy=False)
                for im in img
            ]
        )  # fmt: skip
    with np.errstate(invalid="ignore"):  # inf * 0 is NaN in scipy too
        if fy == 1.0 and fx == 1.0 and np.isfinite(img).all():
            # Weights 1 and 0: each pixel is 0.0 + v (finite neighbours times 0 add nothing).
            out = np.zeros((len(img), h, w), np.float32)
            sy0, sy1 = max(y0, 0), min(y1, img.shape[1])
            sx0, sx1 = max(x0, 0), min(x1, img.shape[2])
            if sy1 > sy0 and sx1 > sx0:
                out[:, sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[:, sy0:sy1, sx0:sx1] + 0.0
            return out
        iy0, iy1, wy0, wy1, in_y = _linear_taps(h, img.shape[1], fy, offset[0])
        ix0, ix1, wx0, wx1, in_x = _linear_taps(w, img.shape[2], fx, offset[1])
        rows0, rows1 = img[:, iy0], img[:, iy1]
        wy0, wy1 = wy0[:, None], wy1[:, None]
        t = rows0[:, :, ix0] * wy0
        t *= wx0
        t += 0.0  # scipy starts from t = 0.0: a -0.0 first term becomes +0.0
        term = np.empty_like(t)
        taps = ((rows0, wy0, ix1, wx1), (rows1, wy1, ix0, wx0), (rows1, wy1, ix1, wx1))
        for rows, wy, ix, wx in taps:
            np.multiply(rows[:, :, ix], wy, out=term)
            term *= wx
            t += term
    t[:, ~in_y] = 0.0
    t[:, :, ~in_x] = 0.0
    # C order, as a stack of per-image results: reductions over it (features) depend on layout.
    return t.astype(np.float32, order="C")


# --------------------------------------------------------------------------- sagittal ROI


@dataclass
class SagittalRoiConfig:
    """How `sagittal_roi` turns the spine it finds into a window (fractions of the image size)."""

    margin: float = 0.08  # added around the detected spine on every side, fraction of H
    band: float = 0.15  # half width kept around the spine's centre line, fraction of W
    min_height: float = 0.55  # the window covers at least this fraction of the image height
    aspect: float = 1.0  # window width / height (1 = square crops, no distortion)
    smooth: float = 0.02  # Gaussian smoothing scale, fraction of the image size
    row_threshold: float = 0.3  # rows whose edge energy exceeds this share of the 90th
    # percentile row belong to the spine


def _normalise(img: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(img, [1.0, 99.5])
    if hi - lo < 1e-6:
        return np.zeros_like(img, dtype=np.float32)
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _fit_window(
    cy: float, cx: float, height: float, width: float, shape_hw: tuple[int, int]
) -> Window:
    """An integer window of about `height` x `width` centred at (cy, cx), shifted to lie inside
    the image where it fits (a shift, never a squash, so the aspect ratio is kept)."""
    h_img, w_img = shape_hw
    hh, ww = max(2, round(height)), max(2, round(width))
    y0, x0 = round(cy - hh / 2), round(cx - ww / 2)
    # Too big for the image: centre it (the padding reads as 0 on both sides).
    y0 = min(max(y0, 0), h_img - hh) if hh <= h_img else round((h_img - hh) / 2)
    x0 = min(max(x0, 0), w_img - ww) if ww <= w_img else round((w_img - ww) / 2)
    return int(y0), int(y0 + hh), int(x0), int(x0 + ww)


def _main_run(mask: np.ndarray, weight: np.ndarray, gap: int) -> tuple[float, float]:
    """First and last index of the run of `mask` (gaps up to `gap` closed) with most `weight`:
    the spine column rather than an isolated edge such as the top of the body outline."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return 0.0, float(len(mask) - 1)
    breaks = np.flatnonzero(np.diff(idx) > gap + 1)
    starts = np.r_[idx[0], idx[breaks + 1]]
    ends = np.r_[idx[breaks], idx[-1]]
    mass = [weight[a : b + 1].sum() for a, b in zip(starts, ends, strict=True)]
    k = int(np.argmax(mass))
    return float(starts[k]), float(ends[k])


def sagittal_roi(volume: np.ndarray, config: SagittalRoiConfig | None = None) -> Window:
    """The spine window `(y0, y1, x0, x1)` of a sagittal stack `(S, H, W)` (or one image (H, W)).

    Found from the image: vertebral bodies alternate with discs along the column, so the vertical
    intensity gradient (|d/dy|), integrated over a few vertebral heights, peaks in the vertebral
    column whatever the field of view. Per row, the position of that peak traces the (curved)
    spine's centre line; rows where the peak is strong give its vertical extent. The window is
    the centre line's horizontal range plus `band` on both sides, and the vertical extent, each
    grown by `margin`, given the configured aspect ratio, centred on the spine and never larger
    than the image (a spine that fills the image gives the whole image; a spine off-centre in
    the field of view stays inside the window). Averaged over the central half of the stack,
    where the midline structures are. A featureless image gives the centred full-height window.
    """
    cfg = config or SagittalRoiConfig()
    vol = np.asarray(volume, dtype=np.float32)
    if vol.ndim == 2:
        vol = vol[None]
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise ValueError(f"expected (S, H, W) sagittal volume, got shape {vol.shape}")
    s, h, w = vol.shape
    lo, hi = s // 4, s - s // 4
    mean = _normalise(vol[lo:hi].mean(axis=0) if hi > lo else vol.mean(axis=0))
    sig = max(1.0, cfg.smooth * max(h, w))
    smooth = ndimage.gaussian_filter(mean, sig / 2)
    gy = np.abs(ndimage.sobel(smooth, axis=0))
    # Long along y (integrates the body/disc alternation), short along x (keeps the column).
    energy = ndimage.gaussian_filter(gy, (4 * sig, 2 * sig))
    peak = energy.max(axis=1)  # (H,) strength of the column in each row
    centre = energy.argmax(axis=1)  # (H,) its x position
    ref = float(np.quantile(peak, 0.9))
    if not np.isfinite(ref) or ref <= 1e-6:
        return _fit_window(h / 2, w / 2, h, h * cfg.aspect, (h, w))
    y_top, y_bot = _main_run(peak >= cfg.row_threshold * ref, peak, gap=int(4 * sig))
    xs = centre[int(y_top) : int(y_bot) + 1]
    x_left, x_right = (float(v) for v in np.quantile(xs, [0.05, 0.95]))

    margin = cfg.margin * h
    height = max(y_bot - y_top + 2 * margin, cfg.min_height * h)
    width = x_right - x_left + 2 * cfg.band * w + 2 * margin
    height = max(height, width / cfg.aspect)
    # Never larger than the image: the margin must not turn into padding.
    height = min(height, h, w / cfg.aspect)
    return _fit_window(
        0.5 * (y_top + y_bot), 0.5 * (x_left + x_right), height, height * cfg.aspect, (h, w)
    )


# --------------------------------------------------------------------------- axial ROI


@dataclass
class AxialRoi:
    """Axial window from training-coordinate statistics, in fractions of the image size.

    Subarticular points sit left and right of the canal, near the image centre, at a place that
    depends on the field of view rather than on the anatomy seen in one slice, so their
    statistics over the training set give a stable window. Saved as JSON with the run that fitted
    it and applied unchanged at inference.
    """

    center_x: float = 0.5  # window centre, fraction of image width
    center_y: float = 0.5  # window centre, fraction of image height
    half_width: float = 0.25  # half the window width, fraction of image width
    half_height: float = 0.25  # half the window height, fraction of image height
    num_points: int = 0  # how many training points the statistics came from (0 = default)

    def window(
        self,
        shape_hw: tuple[int, int],
        *,
        square: bool = True,
        orientation: Sequence[float] | None = None,
    ) -> Window:
        """The pixel window on an image of `shape_hw`; `square` keeps pixels undistorted by
        taking the larger of the two sides. Without `orientation` the image is taken to be in the
        canonical frame already; with it (the native image's ImageOrientationPatient) the window
        is mirrored onto the native image wherever its rows or columns run the other way."""
        h, w = shape_hw
        hh, ww = 2 * self.half_height * h, 2 * self.half_width * w
        if square:
            hh = ww = max(hh, ww)
        window = _fit_window(self.center_y * h, self.center_x * w, hh, ww, (h, w))
        if orientation is None:
            return window
        from lsdc.constants import AXIAL_T2

        return flip_window(window, (h, w), canonical_flips(orientation, AXIAL_T2))

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, float | int]) -> AxialRoi:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> AxialRoi:
        return cls.from_dict(json.loads(Path(path).read_text()))


def fit_axial_roi(
    points_frac: np.ndarray,
    *,
    quantile: float = 0.01,
    margin: float = 0.1,
    min_half: float = 0.18,
) -> AxialRoi:
    """Fit an `AxialRoi` to training points given as `(N, 2)` x/y fractions of their image size.

    The window spans the `quantile`..`1 - quantile` range of the points in each direction, grown
    by `margin` (fraction of the image) on each side and at least `min_half` from its centre.
    """
    pts = np.asarray(points_frac, dtype=np.float64).reshape(-1, 2)
    pts = pts[np.isfinite(pts).all(axis=1)]
    if len(pts) == 0:
        raise ValueError("fit_axial_roi: no finite training points")
    lo = np.quantile(pts, quantile, axis=0)
    hi = np.quantile(pts, 1.0 - quantile, axis=0)
    center = (lo + hi) / 2
    half = np.maximum((hi - lo) / 2 + margin, min_half)
    return AxialRoi(
        center_x=float(center[0]),
        center_y=float(center[1]),
        half_width=float(half[0]),
        half_height=float(half[1]),
        num_points=len(pts),
    )
