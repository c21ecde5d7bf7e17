"""lsdc.geometry against hand-computed cases (oblique planes included)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lsdc import geometry
from lsdc.io.dicom import Series

C30, S30 = math.cos(math.radians(30)), math.sin(math.radians(30))
C10, S10 = math.cos(math.radians(10)), math.sin(math.radians(10))

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
OBLIQUE = (C30, S30, 0.0, 0.0, 0.0, -1.0)  # a sagittal-ish plane turned 60 deg about z
AXIAL_TILTED = (1.0, 0.0, 0.0, 0.0, C10, S10)  # axial tilted 10 deg about x


def make_series(
    positions, orientation, spacing=(0.5, 0.5), shape=(200, 200), orientations=None
) -> Series:
    positions = np.asarray(positions, dtype=np.float64)
    n = len(positions)
    return Series(
        study_id=1,
        series_id=2,
        volume=np.zeros((n, *shape), np.float32),
        instance_numbers=np.arange(101, 101 + n),
        positions=positions,
        orientation=np.asarray(orientation, dtype=np.float64),
        pixel_spacing=spacing,
        slice_thickness=1.0,
        spacing_between_slices=1.0,
        orientation_label=geometry.orientation_label(orientation),
        orientations=None if orientations is None else np.asarray(orientations),
    )


def test_slice_normal_and_label():
    np.testing.assert_allclose(geometry.slice_normal(SAGITTAL), [-1, 0, 0])
    np.testing.assert_allclose(geometry.slice_normal(AXIAL), [0, 0, 1])
    # (c30, s30, 0) x (0, 0, -1) = (-s30, c30, 0)
    np.testing.assert_allclose(geometry.slice_normal(OBLIQUE), [-S30, C30, 0], atol=1e-12)
    np.testing.assert_allclose(geometry.slice_normal(AXIAL_TILTED), [0, -S10, C10], atol=1e-12)
    assert geometry.orientation_label(SAGITTAL) == "sagittal"
    assert geometry.orientation_label(AXIAL_TILTED) == "axial"
    assert geometry.orientation_label(OBLIQUE) == "coronal"  # |c30| > |s30|: closer to y
    assert geometry.orientation_label((1, 0, 0, 0, 0, -1)) == "coronal"
    # Cosines rounded in headers are renormalised.
    np.testing.assert_allclose(geometry.slice_normal((0, 1.001, 0, 0, 0, -0.999)), [-1, 0, 0])
    with pytest.raises(ValueError, match="parallel"):
        geometry.slice_normal((1, 0, 0, 1, 0, 0))


def test_pixel_to_patient_oblique_hand_computed():
    # P = (10, 20, 30) + col * 0.25 * (c30, s30, 0) + row * 0.5 * (0, 0, -1)
    p = geometry.pixel_to_patient(4, 6, (10, 20, 30), OBLIQUE, (0.5, 0.25))
    np.testing.assert_allclose(p, [10 + C30, 20.5, 27.0])
    # Vectorised, and (0, 0) is exactly ImagePositionPatient.
    pts = geometry.pixel_to_patient([0, 4], [0, 6], (10, 20, 30), OBLIQUE, (0.5, 0.25))
    np.testing.assert_allclose(pts, [[10, 20, 30], [10 + C30, 20.5, 27.0]])


def test_patient_to_pixel_oblique_hand_computed():
    # 2 mm off the plane along the normal (-s30, c30, 0) from pixel (4, 6).
    q = np.array([10 + C30 - 2 * S30, 20.5 + 2 * C30, 27.0])
    cr, dist = geometry.patient_to_pixel(q, (10, 20, 30), OBLIQUE, (0.5, 0.25))
    np.testing.assert_allclose(cr, [4.0, 6.0], atol=1e-12)
    assert dist == pytest.approx(2.0)
    # Tilted axial through the origin, spacing 1: point (0, 10, 5)
    # row = (10 c10 + 5 s10), distance = -10 s10 + 5 c10 (= 3.1876 mm).
    cr, dist = geometry.patient_to_pixel((0, 10, 5), (0, 0, 0), AXIAL_TILTED, (1, 1))
    np.testing.assert_allclose(cr, [0.0, 10 * C10 + 5 * S10])
    assert dist == pytest.approx(-10 * S10 + 5 * C10)
    assert dist == pytest.approx(3.18756, abs=1e-5)


def test_round_trip_random_oblique():
    rng = np.random.default_rng(0)
    a = rng.normal(size=3)
    a /= np.linalg.norm(a)
    b = np.cross(a, rng.normal(size=3))
    b /= np.linalg.norm(b)
    orientation = np.concatenate([a, b])
    col, row = rng.uniform(0, 300, 50), rng.uniform(0, 300, 50)
    pts = geometry.pixel_to_patient(col, row, (5, -7, 11), orientation, (0.7, 0.4))
    cr, dist = geometry.patient_to_pixel(pts, (5, -7, 11), orientation, (0.7, 0.4))
    np.testing.assert_allclose(cr, np.stack([col, row], -1), atol=1e-9)
    np.testing.assert_allclose(dist, 0, atol=1e-9)


def test_distances():
    assert geometry.distance_mm((0, 0, 0), (3, 4, 12)) == pytest.approx(13.0)
    np.testing.assert_allclose(geometry.distance_mm([[0, 0, 0], [1, 1, 1]], [0, 0, 1]), [1, 2**0.5])
    d = geometry.signed_distance_to_plane((0, 10, 5), (0, 0, 0), AXIAL_TILTED)
    assert d == pytest.approx(-10 * S10 + 5 * C10)
    np.testing.assert_allclose(
        geometry.positions_along_normal([[1, 2, 3], [1, 2, 7]], AXIAL), [3, 7]
    )


AXIAL_SERIES_Z = [0.0, 4.0, 8.0, 12.0, 16.0]


def _axial_series() -> Series:
    return make_series([(-50, -60, z) for z in AXIAL_SERIES_Z], AXIAL)


def test_nearest_slice_hand_computed():
    hit = geometry.nearest_slice(_axial_series(), (-40, -55, 9.5))
    # z = 9.5: 1.5 mm from z = 8 (index 2), 2.5 mm from z = 12.
    assert (hit.slice_index, hit.instance_number) == (2, 103)
    assert hit.distance_mm == pytest.approx(1.5)
    assert (hit.col, hit.row) == pytest.approx(((-40 + 50) / 0.5, (-55 + 60) / 0.5))
    assert hit.inside
    far = geometry.nearest_slice(_axial_series(), (100, -55, 30))
    assert far.slice_index == 4 and far.distance_mm == pytest.approx(14) and not far.inside


def test_project_sagittal_point_onto_axial_series():
    sagittal = make_series([(4, -80, 40), (2, -80, 40), (0, -80, 40)], SAGITTAL, spacing=(1, 1))
    # Sagittal slice 1, pixel (col 25, row 31): (2, -80 + 25, 40 - 31) = (2, -55, 9).
    np.testing.assert_allclose(geometry.series_pixel_to_patient(sagittal, 25, 31, 1), [2, -55, 9])
    hit = geometry.project_point(sagittal, 1, 25.0, 31.0, _axial_series())
    assert hit.slice_index == 2 and hit.distance_mm == pytest.approx(1.0)
    assert (hit.col, hit.row) == pytest.approx(((2 + 50) / 0.5, (-55 + 60) / 0.5))


def test_project_onto_tilted_multi_stack_axial():
    # Two stacks: flat slices at z = 0, 4 and slices tilted 10 deg about x through z = 30, 34.
    positions = [(0, 0, 0), (0, 0, 4), (0, 0, 30), (0, 0, 34)]
    orientations = [AXIAL, AXIAL, AXIAL_TILTED, AXIAL_TILTED]
    series = make_series(positions, AXIAL, spacing=(1, 1), orientations=orientations)
    # Point (3, 10, 35): distance to tilted plane through (0,0,34) = -10 s10 + 1 c10 = -0.752;
    # to the one through (0,0,30): -10 s10 + 5 c10 = 3.188; flat planes are >= 31 mm away.
    hit = geometry.nearest_slice(series, (3, 10, 35))
    assert hit.slice_index == 3
    assert hit.distance_mm == pytest.approx(abs(-10 * S10 + C10))
    assert (hit.col, hit.row) == pytest.approx((3.0, 10 * C10 + 1 * S10))


def test_volume_pixel_patient_round_trip_with_fractional_slice():
    series = _axial_series()
    p = geometry.series_pixel_to_patient(series, 10, 20, 1.25)
    np.testing.assert_allclose(p, [-50 + 5, -60 + 10, 5.0])
    np.testing.assert_allclose(geometry.series_patient_to_pixel(series, p), [10, 20, 1.25])
    # Beyond the stack the slice coordinate extrapolates (still detectable as outside).
    np.testing.assert_allclose(
        geometry.series_patient_to_pixel(series, (-50, -60, -2)), [0, 0, -0.5]
    )
    with pytest.raises(IndexError):
        geometry.series_pixel_to_patient(series, 0, 0, 4.5)
