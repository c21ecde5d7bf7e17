"""The scanner (PACS export) layout: the competition's studies, named and headed by a scanner."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet
from typer.testing import CliRunner

from lsdc.cli import app
from lsdc.constants import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2, SERIES_TYPES
from lsdc.io.dicomwrite import write_slice
from lsdc.synth import generate_dataset
from lsdc.synth.scanner import _SPELLINGS, LOCALIZER, MANIFEST_COLUMNS

# Seed 15 draws three vendors and a STIR into 3 studies, one with two axial series.
KW = {"train_studies": 2, "test_studies": 1, "size": 64, "seed": 15}
SPLITS = ("train", "test")


@pytest.fixture(scope="module")
def both(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(competition layout, scanner layout) of the same arguments."""
    base = tmp_path_factory.mktemp("layouts")
    comp = generate_dataset(base / "competition", progress=False, **KW)
    scan = generate_dataset(base / "scanner", layout="scanner", progress=False, **KW)
    return comp, scan


@pytest.fixture(scope="module")
def dicomdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scanner export with DICOMDIR, made through the command line."""
    out = tmp_path_factory.mktemp("cli") / "ph"
    args = ["synth", str(out), "--train-studies", "2", "--test-studies", "1", "--size", "64"]
    res = CliRunner().invoke(app, [*args, "--seed", "48", "--layout", "scanner", "--dicomdir"])
    assert res.exit_code == 0, res.output
    assert "export_manifest.csv" in res.output
    return out


def _manifest(root: Path, split: str) -> list[dict[str, str]]:
    with open(root / "truth" / f"{split}_export_manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and tuple(rows[0]) == MANIFEST_COLUMNS
    return rows


def _types(root: Path, split: str) -> dict[str, str]:
    """Competition series id -> type, from the descriptions table."""
    with open(root / f"{split}_series_descriptions.csv", newline="") as fh:
        return {r["series_id"]: r["series_description"] for r in csv.DictReader(fh)}


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _sequence(ds) -> list[str]:
    """ScanningSequence as a list (one value reads back as a str, several as a MultiValue)."""
    value = ds.ScanningSequence
    return [value] if isinstance(value, str) else list(value)


def _kind(series_type: str, ds) -> str:
    if series_type == SAGITTAL_T1:
        return "T1"
    if series_type == SAGITTAL_T2:
        return "STIR" if "IR" in _sequence(ds) else "T2"
    return {AXIAL_T2: "AX", LOCALIZER: "LOC"}[series_type]


@pytest.mark.parametrize("split", SPLITS)
def test_same_instances_pixels_and_geometry_as_the_competition_layout(
    both: tuple[Path, Path], split: str
) -> None:
    comp, scan = both
    assert not (scan / f"{split}_images").exists()
    theirs = {}
    for p in (comp / f"{split}_images").rglob("*.dcm"):
        ds = dcmread(p)
        theirs[ds.SOPInstanceUID] = ds
    rows = [r for r in _manifest(scan, split) if r["duplicate"] == "0"]
    ours = {r["sop_instance_uid"]: r for r in rows if r["series_type"] != LOCALIZER}
    assert set(ours) == set(theirs)
    same = (
        "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "InstanceNumber",
        "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
        "Rows", "Columns", "PixelRepresentation",
    )  # fmt: skip
    for uid, row in ours.items():
        a, b = theirs[uid], dcmread(scan / f"{split}_export" / row["path"])
        for keyword in same:
            assert a.get(keyword) == b.get(keyword), (row["path"], keyword)
        assert a.get("RescaleSlope") == b.get("RescaleSlope")
        np.testing.assert_array_equal(a.pixel_array, b.pixel_array)
        assert b.SeriesNumber != a.SeriesNumber  # the scanner numbers its series itself


def test_tables_and_truth_are_those_of_the_competition_layout(both: tuple[Path, Path]) -> None:
    comp, scan = both
    for name in sorted(_files(comp)):
        if name.endswith(".csv"):
            assert (scan / name).read_bytes() == (comp / name).read_bytes(), name
    assert (scan / "truth" / "studies.jsonl").read_bytes() == (
        comp / "truth" / "studies.jsonl"
    ).read_bytes()


@pytest.mark.parametrize("split", SPLITS)
def test_manifest_names_every_file_and_matches_its_headers(
    both: tuple[Path, Path], split: str
) -> None:
    _, scan = both
    export = scan / f"{split}_export"
    rows = _manifest(scan, split)
    assert {r["path"] for r in rows} == _files(export)
    types = _types(scan, split)
    for r in rows:
        ds = dcmread(export / r["path"])
        assert ds.SOPInstanceUID == r["sop_instance_uid"]
        assert ds.SeriesInstanceUID == r["series_instance_uid"]
        assert ds.StudyInstanceUID == r["study_instance_uid"]
        assert ds.PatientID == ds.StudyID == r["study_id"]
        assert ds.SeriesNumber == int(r["series_number"])
        assert ds.InstanceNumber == int(r["instance_number"])
        if r["series_type"] == LOCALIZER:
            assert r["series_id"] == ""
        else:
            assert types[r["series_id"]] == r["series_type"]
    by_series = defaultdict(set)
    for r in rows:
        by_series[r["series_instance_uid"]].add((r["study_id"], r["series_id"], r["series_type"]))
    assert all(len(v) == 1 for v in by_series.values())


def test_vendor_headers_and_timing(both: tuple[Path, Path]) -> None:
    _, scan = both
    vendors, kinds = set(), set()
    axial: dict[str, list[tuple]] = defaultdict(list)  # study -> its axial series' settings
    for split in SPLITS:
        rows = _manifest(scan, split)
        for r in {r["series_instance_uid"]: r for r in rows}.values():
            ds = dcmread(scan / f"{split}_export" / r["path"])
            kind = _kind(r["series_type"], ds)
            kinds.add(kind)
            vendors.add(ds.Manufacturer)
            assert ds.SeriesDescription not in SERIES_TYPES
            assert ds.SeriesDescription in _SPELLINGS[ds.Manufacturer][kind]
            assert ds.ProtocolName in _SPELLINGS[ds.Manufacturer][kind]
            assert ds.Modality == "MR" and ds.MRAcquisitionType == "2D"
            assert ds.StudyDate and ds.StudyTime
            tr, te = float(ds.RepetitionTime), float(ds.EchoTime)
            ti = ds.get("InversionTime")
            sequence = _sequence(ds)
            if kind == "LOC":
                assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
                assert sequence == ["GR"] and tr < 20 and te < 5
            else:
                assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M", "ND"]
            if kind == "T1":
                assert 400 <= tr <= 750 and 8 <= te <= 15 and ti is None and sequence == ["SE"]
            elif kind in ("T2", "AX"):
                assert 2500 <= tr <= 5000 and 80 <= te <= 120 and ti is None
                assert sequence == ["SE"]
            elif kind == "STIR":
                assert 3000 <= tr <= 5000 and 30 <= te <= 70 and 140 <= float(ti) <= 200
                assert sequence in (["IR"], ["SE", "IR"])
            if kind == "AX":
                axial[r["study_id"]].append((ds.SeriesDescription, tr, te, ds.ProtocolName))
    # A study's two axial series are two blocks of one acquisition: one description, one TR/TE.
    assert all(len(set(d)) == 1 for d in axial.values())
    assert any(len(d) == 2 for d in axial.values())
    assert vendors == {"SIEMENS", "GE MEDICAL SYSTEMS", "Philips"}
    assert kinds == {"LOC", "T1", "STIR", "T2", "AX"}


@pytest.mark.parametrize("split", SPLITS)
def test_localizer_and_duplicate(both: tuple[Path, Path], split: str) -> None:
    _, scan = both
    export = scan / f"{split}_export"
    rows = _manifest(scan, split)
    studies = {r["study_id"] for r in rows}
    locs = [r for r in rows if r["series_type"] == LOCALIZER and r["duplicate"] == "0"]
    assert sorted(r["study_id"] for r in locs) == sorted([*studies] * 3)
    for r in locs:
        ds = dcmread(export / r["path"])
        o = np.asarray(ds.ImageOrientationPatient, float)
        assert np.allclose(np.linalg.norm(o[:3]), 1) and abs(o[:3] @ o[3:]) < 1e-6
        assert ds.Rows == ds.Columns == 32  # half the sagittal matrix
        assert float(ds.PixelSpacing[0]) > 8  # a wide, coarse field of view
        assert ds.pixel_array.std() > 0
    dups = [r for r in rows if r["duplicate"] == "1"]
    assert len(dups) == 1
    copy = dups[0]
    original = next(
        r
        for r in rows
        if r["sop_instance_uid"] == copy["sop_instance_uid"] and r["duplicate"] == "0"
    )
    assert Path(copy["path"]).parent != Path(original["path"]).parent
    assert (export / copy["path"]).read_bytes() == (export / original["path"]).read_bytes()


def test_naming_varies_and_two_studies_share_a_folder(both: tuple[Path, Path]) -> None:
    _, scan = both
    rows = _manifest(scan, "train")
    studies_in = defaultdict(set)
    for r in rows:
        studies_in[str(Path(r["path"]).parent)].add(r["study_id"])
    assert any(len(s) == 2 for s in studies_in.values())
    # The test export's single study keeps its own style: not the competition's names.
    test_rows = _manifest(scan, "test")
    assert not any(r["path"].endswith(f"/{r['instance_number']}.dcm") for r in test_rows)


def test_dicomdir_lists_every_file_but_the_duplicate(dicomdir: Path) -> None:
    for split in SPLITS:
        export = (dicomdir / f"{split}_export").resolve()
        rows = _manifest(dicomdir, split)
        assert {r["path"] for r in rows} | {"DICOMDIR"} == _files(export)
        fs = FileSet(dcmread(export / "DICOMDIR"))
        listed = {Path(i.path).relative_to(export).as_posix(): i.SOPInstanceUID for i in fs}
        originals = {r["path"]: r["sop_instance_uid"] for r in rows if r["duplicate"] == "0"}
        assert listed == originals
        assert sum(r["duplicate"] == "1" for r in rows) == 1


def test_export_is_byte_identical_for_any_workers(dicomdir: Path, tmp_path: Path) -> None:
    again = generate_dataset(
        tmp_path / "again", train_studies=2, test_studies=1, size=64, seed=48,
        layout="scanner", dicomdir=True, workers=2, progress=False,
    )  # fmt: skip
    names = _files(dicomdir)
    assert names == _files(again)
    different = [n for n in names if (dicomdir / n).read_bytes() != (again / n).read_bytes()]
    assert not different, different[:5]


def test_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dicomdir"):
        generate_dataset(tmp_path / "a", dicomdir=True, **KW)
    with pytest.raises(ValueError, match="layout"):
        generate_dataset(tmp_path / "b", layout="pacs", **KW)
    res = CliRunner().invoke(
        app, ["synth", str(tmp_path / "c"), "--layout", "scanner", "--preview"]
    )
    assert res.exit_code != 0 and not (tmp_path / "c").exists()


def test_write_slice_extra_headers(tmp_path: Path) -> None:
    kw = {
        "study_id": 1, "series_id": 2, "instance_number": 3, "position": [0, 0, 0],
        "orientation": [1, 0, 0, 0, 1, 0], "pixel_spacing": [1, 1], "slice_thickness": 3,
    }  # fmt: skip
    pixels = np.zeros((4, 4), np.uint16)
    plain = write_slice(tmp_path / "a.dcm", pixels, **kw).read_bytes()
    assert write_slice(tmp_path / "b.dcm", pixels, extra={}, **kw).read_bytes() == plain
    ds = dcmread(
        write_slice(
            tmp_path / "c.dcm",
            pixels,
            extra={"EchoTime": 12.5, "ImageType": ["ORIGINAL", "PRIMARY"], "SeriesNumber": 7},
            **kw,
        )
    )
    assert ds.EchoTime == 12.5 and list(ds.ImageType) == ["ORIGINAL", "PRIMARY"]
    assert ds.SeriesNumber == 7
    with pytest.raises(ValueError, match="not a DICOM keyword"):
        write_slice(tmp_path / "d.dcm", pixels, extra={"EchoTme": 1}, **kw)
    with pytest.raises(ValueError, match="SOPInstanceUID"):
        write_slice(tmp_path / "e.dcm", pixels, extra={"SOPInstanceUID": "1.2"}, **kw)
