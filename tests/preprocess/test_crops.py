"""Crop windows, crop + resize and the native <-> crop coordinate mapping."""

from __future__ import annotations

import numpy as np
import pytest

from lsdc.preprocess.crops import (
    AxialRoi,
    crop_and_resize,
    fit_axial_roi,
    map_points_from_crop,
    map_points_to_crop,
    points_inside,
    sagittal_roi,
)


@pytest.mark.parametrize(
    ("window", "size"),
    [((10, 74, 20, 84), 32), ((-5, 100, 3, 60), (48, 40)), ((0, 17, 0, 23), 128)],
)
def test_round_trip_within_half_a_pixel(window, size):
    rng = np.random.default_rng(1)
    y0, y1, x0, x1 = window
    pts = np.c_[rng.uniform(x0, x1 - 1, 50), rng.uniform(y0, y1 - 1, 50)]
    crop_pts, valid = map_points_to_crop(pts, window, size)
    assert valid.all()
    back = map_points_from_crop(crop_pts, window, size)
    assert np.abs(back - pts).max() < 1e-9
    # Stored as float32 and even rounded to the nearest crop pixel when the crop magnifies, the
    # point comes back within half a native pixel.
    h, w = (size, size) if isinstance(size, int) else size
    if h >= y1 - y0 and w >= x1 - x0:
        back_r = map_points_from_crop(np.round(crop_pts.astype(np.float32)), window, size)
        assert np.abs(back_r - pts).max() <= 0.5 + 1e-6


def test_hand_computed_mapping():
    # Window 10 px wide resized to 20: pixel centre 10 (first crop pixel) covers crop pixels 0, 1;
    # its centre maps to 0.5. Native 14.25 -> (14.25 - 10 + 0.5) * 2 - 0.5 = 9.
    pts, valid = map_points_to_crop(np.array([[10.0, 14.25]]), (10, 20, 10, 20), 20)
    assert pts.tolist() == [[0.5, 9.0]]
    assert valid.tolist() == [True]


def test_missing_and_outside_points_are_masked():
    pts = np.array([[np.nan, np.nan], [5.0, 5.0], [50.0, 5.0], [-1.0, 5.0]])
    mapped, valid = map_points_to_crop(pts, (0, 20, 0, 20), 40)
    assert valid.tolist() == [False, True, False, False]
    assert np.isnan(mapped[0]).all()
    assert points_inside(np.array([[-0.5, 0.0], [9.49, 9.49], [9.5, 0]]), (10, 10)).tolist() == [
        True,
        True,
        False,
    ]


@pytest.mark.parametrize(("window", "size"), [((8, 72, 16, 80), 96), ((0, 96, 0, 96), 48)])
def test_crop_pixels_follow_the_point_mapping(window, size):
    # A bright dot at a native pixel must peak at the crop pixel the mapping predicts.
    img = np.zeros((96, 96), np.float32)
    y, x = 40, 33
    img[y, x] = 1000.0
    crop = crop_and_resize(img, window, size)
    assert crop.shape == (size, size) and crop.dtype == np.float32
    ((cx, cy),), _ = map_points_to_crop(np.array([[x, y]], float), window, size)
    peak = np.unravel_index(np.argmax(crop), crop.shape)
    assert abs(peak[0] - cy) <= 0.5 + 1e-6
    assert abs(peak[1] - cx) <= 0.5 + 1e-6


def test_crop_outside_image_is_zero_and_stacks_work():
    img = np.ones((3, 20, 20), np.float32)
    crop = crop_and_resize(img, (-20, 20, 0, 20), (40, 20))
    assert crop.shape == (3, 40, 20)
    assert crop[:, :18].max() == 0.0 and crop[:, 22:].min() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="empty crop window"):
        crop_and_resize(img[0], (5, 5, 0, 4), 8)


def test_stack_crops_have_the_bits_of_scipy_per_image(scipy_crop):
    """Shrinking, enlarging, copying (a window of the output's size), windows reaching outside
    the image, negative values and non-finite pixels: every crop of a stack has the bits of the
    per-image scipy reference."""
    rng = np.random.default_rng(0)
    for k in range(120):
        h, w = (int(v) for v in rng.integers(3, 90, 2))
        stack = (rng.random((int(rng.integers(1, 4)), h, w)) * 1000).astype(np.float32)
        if k % 4 == 0:
            stack -= 500.0
            stack[:, ::5] = -0.0  # a -0.0 first term: scipy's sum starts from +0.0
        if k % 9 == 0:
            stack[0, int(rng.integers(h)), int(rng.integers(w))] = np.inf
        y0, x0 = int(rng.integers(-15, h)), int(rng.integers(-15, w))
        window = (y0, y0 + int(rng.integers(1, 2 * h)), x0, x0 + int(rng.integers(1, 2 * w)))
        size = (int(rng.integers(1, 100)), int(rng.integers(1, 100)))
        if k % 3 == 0:
            size = (window[1] - window[0], window[3] - window[2])
        got = crop_and_resize(stack, window, size)
        ref = np.stack([scipy_crop(im, window, size) for im in stack])
        assert got.shape == ref.shape and got.dtype == np.float32 and got.flags.c_contiguous
        assert got.tobytes() == ref.tobytes(), (k, stack.shape, window, size)
        assert crop_and_resize(stack[0], window, size).tobytes() == ref[0].tobytes()
    img = rng.random((40, 50)).astype(np.float32)
    for order in (0, 3):
        ref = scipy_crop(img, (3, 30, 5, 41), (20, 30), order=order)
        assert (
            crop_and_resize(img, (3, 30, 5, 41), (20, 30), order=order).tobytes() == ref.tobytes()
        )


@pytest.mark.parametrize("shift", [(0, 0), (20, -25), (-15, 20), (0, 30), (10, 10)])
def test_sagittal_roi_contains_spine_and_follows_field_of_view(shift, toy_sagittal):
    vol, discs = toy_sagittal(shift=shift)
    window = sagittal_roi(vol)
    y0, y1, x0, x1 = window
    assert 0 <= y0 < y1 <= 128 and 0 <= x0 < x1 <= 128
    _, valid = map_points_to_crop(discs, window, 64)
    assert valid.all(), (window, discs)


@pytest.mark.parametrize("dx", [-30, 0, 30])
def test_sagittal_roi_is_centred_on_the_spine_of_a_wide_field_of_view(dx, toy_sagittal):
    # A wide field of view (100 x 200 px) leaves room to crop: the window is a square centred
    # on the spine column, wherever the spine sits.
    vol, discs = toy_sagittal(size=100, width=200, shift=(0, dx))
    y0, y1, x0, x1 = sagittal_roi(vol)
    assert x1 - x0 == y1 - y0 <= 100
    assert map_points_to_crop(discs, (y0, y1, x0, x1), 64)[1].all()
    spine_x = discs[:, 0].mean() + 5  # vertebral bodies and the canal behind them
    assert abs((x0 + x1) / 2 - spine_x) <= 12


def test_sagittal_roi_of_a_flat_image_is_the_centred_full_window():
    assert sagittal_roi(np.zeros((3, 40, 60))) == (0, 40, 10, 50)


def test_axial_roi_fit_window_and_json(tmp_path):
    rng = np.random.default_rng(0)
    pts = np.c_[rng.normal(0.5, 0.04, 400), rng.normal(0.55, 0.03, 400)]
    roi = fit_axial_roi(pts)
    assert roi.num_points == 400
    assert roi.center_x == pytest.approx(0.5, abs=0.02)
    assert roi.center_y == pytest.approx(0.55, abs=0.02)
    window = roi.window((200, 200))
    y0, y1, x0, x1 = window
    assert y1 - y0 == x1 - x0  # square by default
    inside = map_points_to_crop(pts * 200, window, 64)[1]
    assert inside.mean() > 0.99
    loaded = AxialRoi.load(roi.save(tmp_path / "axial_roi.json"))
    assert loaded == roi
    with pytest.raises(ValueError, match="no finite"):
        fit_axial_roi(np.full((3, 2), np.nan))
