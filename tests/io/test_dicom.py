"""read_series: ordering, geometry, intensities, decoding, resampling and bad files."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from lsdc import geometry
from lsdc.io.dicom import (
    FLAG_DUPLICATE_POSITIONS,
    FLAG_MIXED_ORIENTATION,
    FLAG_MIXED_SERIES_UID,
    FLAG_RESAMPLED,
    FLAG_SKIPPED_FILES,
    FLAG_UNEVEN_SPACING,
    SeriesReadError,
    SliceReadError,
    read_header,
    read_image,
    read_series,
)
from lsdc.io.dicomwrite import write_slice


def _assert_spatial_order(series, written) -> None:
    np.testing.assert_array_equal(series.instance_numbers, written.instance_numbers)
    np.testing.assert_array_equal(series.volume, written.stored.astype(np.float32))
    np.testing.assert_allclose(series.positions, written.positions, atol=1e-9)
    z = series.positions @ geometry.slice_normal(series.orientation)
    assert np.all(np.diff(z) > 0), "slices must ascend along the slice normal"


@pytest.mark.parametrize(
    "instances",
    [
        [4, 1, 6, 2, 5, 3],  # shuffled
        [6, 5, 4, 3, 2, 1],  # reversed: instance 1 is the last slice in space
    ],
    ids=["shuffled", "reversed"],
)
def test_sorted_by_position_not_instance_number(tmp_path, dicomfx, instances):
    w = dicomfx.write_series(tmp_path, instance_numbers=instances)
    s = read_series(w.folder)
    _assert_spatial_order(s, w)
    assert s.volume.dtype == np.float32 and s.volume.shape == (6, 24, 32)
    assert (s.study_id, s.series_id) == (1, 10)  # from the folder names
    assert s.orientation_label == "sagittal"
    assert s.slice_index(instances[2]) == 2
    assert s.spacing_between_slices == pytest.approx(3.0, abs=1e-4)
    assert s.pixel_spacing == pytest.approx((0.8, 0.6))
    assert s.slice_thickness == pytest.approx(2.7)
    assert s.description == "Sagittal T1"
    assert s.flags == [] and s.skipped_files == []


def test_oblique_series_sorted_along_its_normal(tmp_path, dicomfx):
    # Tilted so the normal mixes x and z; the slice step moves positions mostly along x but also
    # along z, with instance numbers shuffled: only projection on the normal gives this order.
    orientation = dicomfx.oblique(dicomfx.SAGITTAL, ("z", 14.0), ("y", 9.0))
    w = dicomfx.write_series(
        tmp_path, orientation=orientation, instance_numbers=[3, 6, 1, 5, 2, 4], step=2.5
    )
    s = read_series(w.folder, study_id=7, series_id=8)
    assert (s.study_id, s.series_id) == (7, 8)
    _assert_spatial_order(s, w)
    np.testing.assert_allclose(s.orientation, orientation, atol=1e-5)
    assert s.spacing_between_slices == pytest.approx(2.5, abs=1e-3)
    assert s.orientation_label == "sagittal"


@pytest.mark.parametrize(
    ("orientation", "label"),
    [("SAGITTAL", "sagittal"), ("AXIAL", "axial"), ("CORONAL", "coronal")],
)
def test_orientation_label(tmp_path, dicomfx, orientation, label):
    w = dicomfx.write_series(tmp_path, orientation=getattr(dicomfx, orientation), n=3)
    assert read_series(w.folder).orientation_label == label


def test_rescale_slope_intercept_applied(tmp_path, dicomfx):
    w = dicomfx.write_series(tmp_path, rescale=(2.5, -100.0), n=4)
    s = read_series(w.folder)
    np.testing.assert_allclose(s.volume, w.stored * 2.5 - 100.0, rtol=1e-6)


def test_monochrome1_inverted(tmp_path, dicomfx):
    w1 = dicomfx.write_series(tmp_path, series_id=11, photometric="MONOCHROME1", n=4)
    w2 = dicomfx.write_series(tmp_path, series_id=12, photometric="MONOCHROME2", n=4)
    s1, s2 = read_series(w1.folder), read_series(w2.folder)
    expected = s2.volume.max() + s2.volume.min() - s2.volume  # reflected within the series range
    np.testing.assert_array_equal(s1.volume, expected)
    # Bright where MONOCHROME2 is dark, across slices (not per slice).
    assert s1.volume[0].mean() > s1.volume[-1].mean()


def test_read_image_rescales_and_inverts_one_file(tmp_path, dicomfx):
    w = dicomfx.write_series(tmp_path, rescale=(2.5, -100.0), photometric="MONOCHROME1", n=2)
    header, pixels = read_image(w.folder / "2.dcm")
    assert header.instance_number == 2 and pixels.dtype == np.float32
    shown = w.stored[1] * 2.5 - 100.0
    # Reflected within this image's own range: bright where the stored values are low.
    np.testing.assert_allclose(pixels, shown.max() + shown.min() - shown, rtol=1e-6)
    (tmp_path / "empty.dcm").write_bytes(b"")
    with pytest.raises(SliceReadError, match="empty.dcm"):
        read_image(tmp_path / "empty.dcm")


def test_mixed_slice_sizes_resampled_to_majority(tmp_path, dicomfx):
    # 5 slices of 20x24 px at 1.0 mm; one slice at 40x48 px, 0.5 mm, same field of view. The
    # image is a linear ramp in patient mm, which bilinear resampling reproduces exactly inside.
    folder = tmp_path / "3" / "30"
    folder.mkdir(parents=True)
    orientation = dicomfx.AXIAL
    normal = dicomfx.normal_of(orientation)
    origin = np.array([-10.0, -12.0, 50.0])

    def ramp(rows, cols, spacing, pos):
        r, c = np.mgrid[0:rows, 0:cols].astype(np.float64)
        x = pos[0] + c * spacing  # dicomfx.AXIAL: columns run along +x, rows along +y
        y = pos[1] + r * spacing
        return np.round(1000 + 20 * x + 7 * y).astype(np.uint16)

    for k in range(6):
        fine = k == 3
        pos = origin + k * 4.0 * normal
        if fine:
            # Pixel centres of the fine grid: FOV edges coincide with the coarse grid's.
            pos = pos - np.array([0.25, 0.25, 0.0])
        rows, cols, sp = (40, 48, 0.5) if fine else (20, 24, 1.0)
        write_slice(
            folder / f"{k + 1}.dcm",
            ramp(rows, cols, sp, pos),
            study_id=3,
            series_id=30,
            instance_number=k + 1,
            position=pos,
            orientation=orientation,
            pixel_spacing=(sp, sp),
            slice_thickness=4.0,
        )
    s = read_series(folder)
    assert FLAG_RESAMPLED in s.flags
    assert s.volume.shape == (6, 20, 24)
    assert s.pixel_spacing == pytest.approx((1.0, 1.0))
    expected = ramp(20, 24, 1.0, origin + 3 * 4.0 * normal).astype(np.float32)
    # Interior pixels (the Gaussian pre-filter and the zero outside the FOV touch the border).
    np.testing.assert_allclose(s.volume[3, 2:-2, 2:-2], expected[2:-2, 2:-2], atol=0.6)
    # The resampled slice lies on the majority grid; its native grid is kept for label mapping.
    np.testing.assert_allclose(s.positions[3], origin + 3 * 4.0 * normal, atol=1e-6)
    assert s.native_shapes[3].tolist() == [40, 48]
    col, row = s.native_to_volume(3, 9.5, 19.5)  # fine pixel (9.5, 19.5) = coarse (4.5, 9.5)
    assert (col, row) == pytest.approx((4.5, 9.5))
    assert s.native_to_volume(0, 3.0, 4.0) == pytest.approx((3.0, 4.0))


def test_bad_files_skipped_and_reported(tmp_path, dicomfx):
    w = dicomfx.write_series(tmp_path, n=6)
    bad = dicomfx.add_bad_files(w.folder)
    s = read_series(w.folder)
    _assert_spatial_order(s, w)
    assert FLAG_SKIPPED_FILES in s.flags
    reasons = {p.name: r for p, r in s.skipped_files}
    assert set(reasons) == {p.name for p in bad.values()}
    assert "zero-byte" in reasons["902.dcm"]
    assert "not a DICOM" in reasons["notes.txt"]
    assert "decoded" in reasons["901.dcm"] or "truncated" in reasons["901.dcm"]


def test_mostly_bad_folder_is_unusable(tmp_path, dicomfx):
    w = dicomfx.write_series(tmp_path, n=2)
    dicomfx.add_bad_files(w.folder)
    with pytest.raises(SeriesReadError, match=str(w.folder)):
        read_series(w.folder)


def test_empty_or_missing_folder_raises(tmp_path):
    empty = tmp_path / "1" / "2"
    empty.mkdir(parents=True)
    with pytest.raises(SeriesReadError, match="no files"):
        read_series(empty)
    with pytest.raises(SeriesReadError, match="not a directory"):
        read_series(tmp_path / "1" / "3")
    (tmp_path / "x").mkdir()
    with pytest.raises(SeriesReadError, match="not integers"):
        read_series(tmp_path / "x")


def test_missing_geometry_is_a_bad_file(tmp_path, dicomfx):
    w = dicomfx.write_series(tmp_path, n=4)
    path = w.folder / "2.dcm"
    ds = pydicom.dcmread(path)
    del ds.ImagePositionPatient
    ds.save_as(path)
    s = read_series(w.folder)
    assert s.num_slices == 3
    assert s.skipped_files == [(path, "missing ImagePositionPatient")]


def test_multi_stack_axial_flags_orientation_and_gaps(tmp_path, dicomfx):
    # Two stacks (like real axial T2 series, one block per disc) tilted differently, a gap between
    # them, instance numbers running per acquisition order.
    folder = tmp_path / "5" / "50"
    folder.mkdir(parents=True)
    tilt_a, tilt_b = (
        dicomfx.oblique(dicomfx.AXIAL, ("x", 6.0)),
        dicomfx.oblique(dicomfx.AXIAL, ("x", -8.0)),
    )
    k = 0
    for orientation, z0 in [(tilt_b, 80.0), (tilt_a, 20.0)]:
        for j in range(3):
            k += 1
            write_slice(
                folder / f"{k}.dcm",
                np.full((16, 16), k, np.uint16),
                study_id=5,
                series_id=50,
                instance_number=k,
                position=(0.0, 0.0, z0 + 4.0 * j),
                orientation=orientation,
                pixel_spacing=(1.0, 1.0),
                slice_thickness=4.0,
            )
    s = read_series(folder)
    assert FLAG_MIXED_ORIENTATION in s.flags and FLAG_UNEVEN_SPACING in s.flags
    assert s.orientations is not None and s.orientations.shape == (6, 6)
    # Feet-to-head along +z: the 20 mm stack (instances 4-6) first.
    assert s.instance_numbers.tolist() == [4, 5, 6, 1, 2, 3]
    np.testing.assert_allclose(s.slice_orientation(0), tilt_a, atol=1e-5)
    np.testing.assert_allclose(s.slice_orientation(5), tilt_b, atol=1e-5)
    assert s.volume[:, 0, 0].tolist() == [4, 5, 6, 1, 2, 3]


def test_duplicate_positions_flagged_and_tie_broken_by_instance(tmp_path, dicomfx):
    w = dicomfx.write_series(tmp_path, n=3)
    first = pydicom.dcmread(w.folder / "1.dcm")
    first.InstanceNumber = 9
    first.save_as(w.folder / "9.dcm")
    s = read_series(w.folder)
    assert FLAG_DUPLICATE_POSITIONS in s.flags
    assert FLAG_MIXED_SERIES_UID not in s.flags
    assert s.instance_numbers.tolist() == [1, 9, 2, 3]
    first.SeriesInstanceUID = "1.2.3.4"
    first.save_as(w.folder / "9.dcm")
    assert FLAG_MIXED_SERIES_UID in read_series(w.folder).flags


# --- decoding of real files (pydicom / pydicom-data) and compressed project-made series -------

MR_SMALL_VARIANTS = [
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "MR_small_padded.dcm",
]


@pytest.mark.parametrize("name", MR_SMALL_VARIANTS)
def test_decodes_pydicom_mr_small_variants(tmp_path, dicomfx, name):
    ref = read_series(
        dicomfx.copy_into_series(dicomfx.testdata("MR_small.dcm"), tmp_path / "1" / "1").parent
    )
    s = read_series(dicomfx.copy_into_series(dicomfx.testdata(name), tmp_path / "1" / "2").parent)
    assert s.volume.shape == (1, 64, 64)
    np.testing.assert_array_equal(s.volume, ref.volume)
    np.testing.assert_array_equal(
        ref.volume[0], pydicom.dcmread(dicomfx.testdata("MR_small.dcm")).pixel_array
    )
    np.testing.assert_allclose(s.positions[0], [-83.9063, -91.2, 6.6406])
    assert s.orientation_label == "axial"


@pytest.mark.parametrize(
    ("name", "reference"),
    [("MR2_J2KR.dcm", "MR2_UNCR.dcm"), ("MR2_J2KI.dcm", "MR2_UNCI.dcm")],
    ids=["j2k-lossless", "j2k-lossy"],
)
def test_decodes_pydicom_data_philips_mr(tmp_path, dicomfx, name, reference):
    # 1024x1024 oblique Philips MR, 12 bits stored, RescaleSlope 3.77 (pydicom-data); the lossy
    # J2K file's reference is its own uncompressed twin (UNCI).
    ds = pydicom.dcmread(dicomfx.testdata(reference))
    s = read_series(dicomfx.copy_into_series(dicomfx.testdata(name), tmp_path / "4" / "4").parent)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )
    np.testing.assert_allclose(s.volume[0], expected, rtol=1e-6)
    # Cosines (.57, .82, 0), (0, 0, -1): normal (-.82, .57, 0), closest to the x axis.
    assert s.orientation_label == "sagittal"
    np.testing.assert_allclose(s.positions[0], [-180.058222, -97.147766, 112.82799])


@pytest.mark.parametrize("codec", ["rle", "jpeg2000", "jpeg_ls", "jpeg_lossless"])
def test_compressed_series_match_uncompressed(tmp_path, dicomfx, codec):
    orientation = dicomfx.oblique(dicomfx.SAGITTAL, ("z", 10.0))
    # 40x48: OpenJPEG's default 6 resolutions need at least 32 px per side.
    kwargs = dict(
        n=4, shape=(40, 48), instance_numbers=[2, 4, 1, 3], orientation=orientation, seed=3
    )
    plain = dicomfx.write_series(tmp_path / "plain", **kwargs)
    if codec in ("rle", "jpeg2000"):
        ts = RLELossless if codec == "rle" else JPEG2000Lossless
        packed = dicomfx.write_series(tmp_path / "packed", transfer_syntax=ts, **kwargs)
        folder = packed.folder
    else:
        folder = tmp_path / "packed" / "1" / "10"
        folder.mkdir(parents=True)
        for f in plain.folder.iterdir():
            dicomfx.gdcm_transcode(f, folder / f.name, codec)
    syntaxes = {str(pydicom.dcmread(f).file_meta.TransferSyntaxUID) for f in folder.iterdir()}
    assert len(syntaxes) == 1 and syntaxes != {pydicom.uid.ExplicitVRLittleEndian}
    a, b = read_series(plain.folder), read_series(folder)
    np.testing.assert_array_equal(b.volume, a.volume)
    np.testing.assert_array_equal(b.instance_numbers, plain.instance_numbers)
    np.testing.assert_allclose(b.positions, a.positions)


def test_native_fast_path_matches_pydicom(tmp_path, dicomfx):
    # Signed 16-bit data decoded without pydicom's pipeline must equal pixel_array exactly.
    px = np.random.default_rng(1).integers(-2000, 2000, (16, 20)).astype(np.int16)
    folder = tmp_path / "1" / "1"
    write_slice(
        folder / "1.dcm",
        px,
        study_id=1,
        series_id=1,
        instance_number=1,
        position=(0, 0, 0),
        orientation=dicomfx.AXIAL,
        pixel_spacing=(1, 1),
        slice_thickness=1,
    )
    s = read_series(folder)
    np.testing.assert_array_equal(s.volume[0], pydicom.dcmread(folder / "1.dcm").pixel_array)
    np.testing.assert_array_equal(s.volume[0], px)


def test_multi_frame_file_reported(tmp_path, dicomfx):
    folder = tmp_path / "1" / "1"
    dicomfx.copy_into_series(dicomfx.testdata("emri_small.dcm"), folder)
    with pytest.raises(SeriesReadError, match="multi-frame"):
        read_series(folder)


def test_read_header_detects_bad_files(tmp_path, dicomfx):
    w = dicomfx.write_series(tmp_path, n=2)
    bad = dicomfx.add_bad_files(w.folder)
    h = read_header(w.folder / "1.dcm")
    assert (h.rows, h.cols, h.instance_number) == (24, 32, 1)
    np.testing.assert_allclose(h.position, w.positions[0])
    for kind, match in [("truncated", "truncated"), ("zero", "zero-byte"), ("text", "not a DICOM")]:
        with pytest.raises(SliceReadError, match=match) as info:
            read_header(bad[kind])
        assert info.value.path == bad[kind]


def test_non_ascii_description_uses_character_set(tmp_path, dicomfx):
    w = dicomfx.write_series(tmp_path, n=2)
    for f in w.folder.iterdir():
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SeriesDescription = "Sagittal T1 gewichtet (Übersicht)"
        ds.save_as(f)
    assert read_series(w.folder).description == "Sagittal T1 gewichtet (Übersicht)"
    assert read_header(w.folder / "1.dcm").description == "Sagittal T1 gewichtet (Übersicht)"


def test_duplicate_instance_numbers_are_flagged_and_never_resolved_to_a_slice(tmp_path, dicomfx):
    from lsdc.io.dicom import FLAG_DUPLICATE_INSTANCES, AmbiguousInstanceError
    from lsdc.io.index import index_series

    w = dicomfx.write_series(tmp_path, n=4)
    third = pydicom.dcmread(w.folder / "3.dcm")
    third.InstanceNumber = 2  # two files (2.dcm, 3.dcm) now carry instance 2
    third.save_as(w.folder / "3.dcm")
    s = read_series(w.folder)
    assert FLAG_DUPLICATE_INSTANCES in s.flags
    assert s.slice_index(4) == 3
    with pytest.raises(AmbiguousInstanceError, match="instance 2 is carried by 2 slices"):
        s.slice_index(2)
    row, problems = index_series(w.folder, 1, 10)
    assert FLAG_DUPLICATE_INSTANCES in row.flags.split(";")
    assert [p.reason for p in problems] == ["duplicate InstanceNumber 2: labels on them are masked"]


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "explicit"])
def test_a_series_written_without_preamble_or_file_meta_reads_the_same(tmp_path, dicomfx, implicit):
    # Older PACS and scanner exports write bare datasets: no 128-byte preamble, no "DICM", no
    # file meta. lsdc grade finds them by content, so the reader must read them too.
    w = dicomfx.write_series(tmp_path / "a", n=4)
    bare = tmp_path / "bare" / w.folder.name
    bare.mkdir(parents=True)
    for f in sorted(w.folder.iterdir()):
        ds = pydicom.dcmread(f)
        ds.preamble = None
        del ds.file_meta
        ds.save_as(bare / f.name, enforce_file_format=False, implicit_vr=implicit)
        assert (bare / f.name).read_bytes()[128:132] != b"DICM"
    s = read_series(bare, study_id=1, series_id=1)
    np.testing.assert_array_equal(s.volume, read_series(w.folder, study_id=1, series_id=1).volume)
    # A text file is still not DICOM.
    (bare / "9.dcm").write_text("not an image")
    with pytest.raises(SliceReadError, match="not a DICOM file"):
        read_header(bare / "9.dcm")
