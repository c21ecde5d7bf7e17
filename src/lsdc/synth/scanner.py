"""The scanner (PACS export) layout of the phantom: `generate_dataset(..., layout="scanner")`.

The same studies as the competition layout (same pixels, geometry and Study/Series/SOP Instance
UIDs) written as a hospital export holds them, for commands that must find and identify series
from headers alone:

- files under `{split}_export/` in one of several folder and file naming styles per study
  (`ScannerStudy.STYLES`), with or without `.dcm`/`.DCM`; in every export with two or more
  studies, two studies share one folder (their files mixed);
- vendor headers per series: SeriesDescription and ProtocolName in the spelling of the study's
  manufacturer and site, SeriesNumber in acquisition order, TR/TE/TI, ScanningSequence,
  ImageType, StudyDate/Time and the like;
- a three-plane (or three-slice sagittal) gradient-echo localiser series per study, rendered
  from the study's phantom at low resolution with exact geometry;
- one file per export written twice (same SOPInstanceUID, another folder);
- optionally a DICOMDIR (`to_file_set`), in which case pydicom's FileSet names the files.

The truth is `truth/{split}_export_manifest.csv` (`MANIFEST_COLUMNS`), one row per file.
Every draw comes from the study's own export stream (or the export's stream for the mixed
pair and the duplicate), so the competition layout's random streams and bytes are untouched.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lsdc.constants import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2
from lsdc.synth.acquire import SeriesSpec, render_series, to_stored
from lsdc.synth.anatomy import SpinePhantom

LOCALIZER = "Localizer"  # the manifest's series_type of the localiser series
MANIFEST_COLUMNS = (
    "path",
    "study_id",
    "series_id",
    "series_type",
    "study_instance_uid",
    "series_instance_uid",
    "sop_instance_uid",
    "duplicate",
    "series_number",
    "instance_number",
)
VENDORS = ("SIEMENS", "GE MEDICAL SYSTEMS", "Philips")

# SeriesDescription / ProtocolName spellings by vendor and kind (T1, T2 and STIR are sagittal,
# AX the axial T2, LOC the localiser). A site uses one spelling column for all its series.
_SPELLINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "SIEMENS": {
        "T1": ("t1_tse_sag", "SAG T1 TSE"),
        "T2": ("t2_tse_sag", "SAG T2 TSE"),
        "STIR": ("t2_tirm_sag", "SAG STIR"),
        "AX": ("t2_tse_tra", "AX T2 TSE"),
        "LOC": ("localizer", "Localizer"),
    },
    "GE MEDICAL SYSTEMS": {
        "T1": ("Sag T1 FSE", "SAG T1 FSE"),
        "T2": ("SAG T2 FRFSE", "Sag T2 FSE"),
        "STIR": ("Sag STIR", "SAG STIR"),
        "AX": ("Ax T2 FRFSE", "AX T2 FSE"),
        "LOC": ("3-pl T2* FGRE Loc", "3 PLANE LOC"),
    },
    "Philips": {
        "T1": ("T1W_TSE SAG", "sT1W_TSE"),
        "T2": ("T2W_TSE SAG", "sT2W_TSE"),
        "STIR": ("STIR SAG", "sSTIR_TSE"),
        "AX": ("T2W_TSE TRA", "aT2W_TSE"),
        "LOC": ("SURVEY", "Survey"),
    },
}
_MODELS = {
    "SIEMENS": ("Aera", "Skyra", "Avanto", "Prisma"),
    "GE MEDICAL SYSTEMS": ("SIGNA Artist", "Optima MR450w", "DISCOVERY MR750"),
    "Philips": ("Ingenia", "Achieva"),
}
# First SeriesNumber and step: Philips numbers its scans 101, 201, ...
_NUMBERING = {"SIEMENS": (1, 1), "GE MEDICAL SYSTEMS": (1, 1), "Philips": (101, 100)}
_STUDY_DESCRIPTIONS = ("MRI LUMBAR SPINE", "MR L-SPINE W/O CONTRAST", "MR LWS nativ", "L SPINE")

# Acquisition parameters per kind: TR (ms), TE (ms), TI (ms) or None, echo train length.
_Range = tuple[float, float]
_TIMING: dict[str, tuple[_Range, _Range, _Range | None, tuple[int, int]]] = {
    "T1": ((400.0, 750.0), (8.0, 15.0), None, (3, 6)),
    "T2": ((2500.0, 5000.0), (80.0, 120.0), None, (15, 28)),
    "AX": ((2500.0, 5000.0), (80.0, 120.0), None, (15, 28)),
    "STIR": ((3000.0, 5000.0), (30.0, 70.0), (140.0, 200.0), (10, 20)),
    "LOC": ((4.0, 12.0), (1.2, 4.0), None, (1, 1)),
}
_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def random_name(rng: np.random.Generator, n: int = 8) -> str:
    """`n` random uppercase letters and digits, starting with a letter (folder names)."""
    first = _CHARS[int(rng.integers(26))]
    return first + "".join(_CHARS[int(i)] for i in rng.integers(0, len(_CHARS), n - 1))


def _hashed_name(uid: str) -> str:
    # Export tools name files by a digest of the instance; deterministic and unique in practice
    # (the manifest check in generate_dataset catches a collision).
    digest = int.from_bytes(hashlib.sha1(uid.encode()).digest()[:8], "big")
    out = ""
    for _ in range(8):
        digest, r = divmod(digest, len(_CHARS))
        out += _CHARS[r]
    return out


def _safe(text: str) -> str:
    """Text usable as a folder name on every file system (viewers name folders by descriptions)."""
    return re.sub(r"[^A-Za-z0-9 ._-]", "_", text).strip() or "_"


def _kind(spec: SeriesSpec) -> str:
    if spec.series_type == SAGITTAL_T1:
        return "T1"
    if spec.series_type == SAGITTAL_T2:
        return "STIR" if spec.sequence == "STIR" else "T2"
    if spec.series_type == AXIAL_T2:
        return "AX"
    raise ValueError(f"series {spec.series_id}: no scanner kind for type {spec.series_type!r}")


def _ranks(instance_numbers: np.ndarray) -> np.ndarray:
    """1-based rank of each slice's instance number (export counters follow instance order)."""
    return np.argsort(np.argsort(instance_numbers, kind="stable"), kind="stable") + 1


@dataclass
class ExportSeries:
    """One exported series: its spec (spatial order) and the headers the scanner gives it."""

    spec: SeriesSpec
    kind: str  # T1 | T2 | STIR | AX | LOC
    description: str
    headers: dict[str, Any]  # DICOM keyword -> value (study's and series'), write_slice's extra
    paths: list[str]  # per slice (spatial order), relative to the export root

    @property
    def series_type(self) -> str:
        return LOCALIZER if self.kind == "LOC" else self.spec.series_type


class ScannerStudy:
    """The scanner export of one study: vendor, headers, localiser and file names.

    Built from the study's series specs and its own random stream; `series[j]` is the export of
    `specs[j]`, `localizer` the extra series (series id 0 keys its UIDs). `mix_folder` (shared
    with one other study of the export) replaces the drawn naming style; `duplicate` makes one
    file be written twice.
    """

    STYLES = ("pacs", "dicom_uid", "viewer", "dated", "flat")

    def __init__(
        self,
        rng: np.random.Generator,
        study_id: int,
        specs: list[SeriesSpec],
        phantom: SpinePhantom,
        size: int,
        *,
        mix_folder: str = "",
        duplicate: bool = False,
    ) -> None:
        self.study_id = int(study_id)
        self._phantom = phantom
        self.vendor = str(rng.choice(VENDORS))
        spelling = int(rng.integers(2))
        names = _SPELLINGS[self.vendor]
        self.date = f"{int(rng.integers(2012, 2024))}{int(rng.integers(1, 13)):02d}"
        self.date += f"{int(rng.integers(1, 29)):02d}"
        start = int(rng.integers(7 * 60, 19 * 60))  # minutes after midnight
        self.study_description = str(rng.choice(_STUDY_DESCRIPTIONS))
        self.common: dict[str, Any] = {
            "Manufacturer": self.vendor,
            "ManufacturerModelName": str(rng.choice(_MODELS[self.vendor])),
            "MagneticFieldStrength": float(rng.choice([1.5, 3.0])),
            "StudyDate": self.date,
            "StudyTime": f"{start // 60:02d}{start % 60:02d}{int(rng.integers(60)):02d}",
            "StudyDescription": self.study_description,
            "AccessionNumber": str(int(rng.integers(10**7, 10**8))),
            "PatientName": f"PHANTOM^{self.study_id}",
            "BodyPartExamined": "LSPINE",
        }
        stir_sequence = ["IR"] if rng.random() < 0.5 else ["SE", "IR"]
        self.three_plane = bool(rng.random() < 0.75)

        # Acquisition order: localiser, the two sagittals in either order, the axials.
        sag = [j for j, s in enumerate(specs) if s.series_type != AXIAL_T2]
        if len(sag) == 2 and rng.random() < 0.5:
            sag = sag[::-1]
        order = sag + [j for j, s in enumerate(specs) if s.series_type == AXIAL_T2]
        first, step = _NUMBERING[self.vendor]
        numbers = [first]
        # GE exports skip the calibration scan's number now and then.
        nxt = first + step * (2 if self.vendor.startswith("GE") and rng.random() < 0.5 else 1)
        for _ in order:
            numbers.append(nxt)
            nxt += step

        def headers(kind: str, number: int, minute: int) -> tuple[str, dict[str, Any]]:
            description = names[kind][spelling]
            tr, te, ti, etl = _TIMING[kind]
            h: dict[str, Any] = {
                "SeriesNumber": number,
                "ProtocolName": names[kind][int(rng.integers(2))],
                "SeriesDate": self.date,
                "SeriesTime": f"{(start + minute) // 60 % 24:02d}{(start + minute) % 60:02d}00",
                "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]
                if kind == "LOC"
                else ["ORIGINAL", "PRIMARY", "M", "ND"],
                "MRAcquisitionType": "2D",
                "RepetitionTime": round(float(rng.uniform(*tr)), 1),
                "EchoTime": round(float(rng.uniform(*te)), 2),
                "EchoTrainLength": int(rng.integers(etl[0], etl[1] + 1)),
            }
            if kind == "LOC":
                h |= {"ScanningSequence": "GR", "SequenceVariant": "SP", "FlipAngle": 30.0}
            elif kind == "STIR" and ti is not None:
                h |= {
                    "ScanningSequence": stir_sequence,
                    "SequenceVariant": ["SK", "SP", "MP"],
                    "InversionTime": round(float(rng.uniform(*ti)), 1),
                }
            else:
                h |= {"ScanningSequence": "SE", "SequenceVariant": ["SK", "SP"]}
            return description, self.common | h

        loc_spec = localizer_spec(rng, phantom, size, self.three_plane)
        desc, h = headers("LOC", numbers[0], 0)
        self.localizer = ExportSeries(loc_spec, "LOC", desc, h, [])
        by_spec: dict[int, ExportSeries] = {}
        minute = 2
        for j, number in zip(order, numbers[1:], strict=True):
            kind = _kind(specs[j])
            desc, h = headers(kind, number, minute)
            axial = [e for e in by_spec.values() if e.kind == "AX"]
            if kind == "AX" and axial:
                # A second axial series is the second block of the same acquisition.
                desc, h = (
                    axial[0].description,
                    axial[0].headers | {k: h[k] for k in ("SeriesNumber", "SeriesTime")},
                )
            by_spec[j] = ExportSeries(specs[j], kind, desc, h, [])
            minute += int(rng.integers(3, 7))
        self.series = [by_spec[j] for j in range(len(specs))]  # series[j] exports specs[j]

        self.style = "mixed" if mix_folder else str(rng.choice(self.STYLES))
        self._name_files(rng, mix_folder)
        self.duplicate: tuple[str, str] | None = None  # (path of the original, path of the copy)
        if duplicate:
            j = int(rng.integers(len(self.series)))
            s = int(rng.integers(self.series[j].spec.num_slices))
            original = self.series[j].paths[s]
            top = original.split("/")[0]
            self.duplicate = (original, f"{top}/{random_name(rng)}/{original.rsplit('/', 1)[-1]}")

    def all_series(self) -> list[ExportSeries]:
        """The localiser then the study's series, in acquisition order."""
        return [self.localizer, *sorted(self.series, key=lambda e: e.headers["SeriesNumber"])]

    def _name_files(self, rng: np.random.Generator, mix_folder: str) -> None:
        from lsdc.io.dicomwrite import deterministic_uid

        pid = sid = str(self.study_id)
        r_study = random_name(rng)
        running = 0
        for e in self.all_series():
            sn = int(e.headers["SeriesNumber"])
            r_series = random_name(rng)
            ranks = _ranks(e.spec.instance_numbers)
            # Names of one series follow instance order, as an export walks the series.
            by_rank = {int(k): s for s, k in enumerate(ranks)}
            paths = [""] * e.spec.num_slices
            for k in sorted(by_rank):
                s = by_rank[k]
                running += 1
                inst = int(e.spec.instance_numbers[s])
                sop = str(deterministic_uid("sop", self.study_id, e.spec.series_id, inst))
                if self.style == "mixed":
                    p = f"{mix_folder}/{_hashed_name(sop)}"
                elif self.style == "pacs":
                    p = f"{pid}/{self.date}_{sid}/SE{sn}/IM{k:04d}"
                elif self.style == "dicom_uid":
                    p = f"DICOM/{r_study}/{r_series}/{sop}.dcm"
                elif self.style == "viewer":
                    p = (
                        f"{pid}/{_safe(self.study_description)} - {self.date}/"
                        f"{_safe(e.description)}_{sn}/IM-{sn:04d}-{k:04d}.dcm"
                    )
                elif self.style == "dated":
                    d = self.date
                    p = f"{d[:4]}/{d[4:6]}/{d[6:]}/{pid}/{r_study}/S{sn:04d}/I{running:06d}.DCM"
                else:  # flat: the whole study in one folder
                    p = f"{r_study}/{_hashed_name(sop)}"
                paths[s] = p
            e.paths = paths

    def manifest_row(self, e: ExportSeries, s: int, path: str, duplicate: bool) -> dict:
        """The manifest row of slice `s` (spatial order) of series `e`, written at `path`."""
        from lsdc.io.dicomwrite import deterministic_uid

        sid, inst = e.spec.series_id, int(e.spec.instance_numbers[s])
        return {
            "path": path,
            "study_id": self.study_id,
            "series_id": "" if e.kind == "LOC" else sid,
            "series_type": e.series_type,
            "study_instance_uid": str(deterministic_uid("study", self.study_id)),
            "series_instance_uid": str(deterministic_uid("series", self.study_id, sid)),
            "sop_instance_uid": str(deterministic_uid("sop", self.study_id, sid, inst)),
            "duplicate": int(duplicate),
            "series_number": int(e.headers["SeriesNumber"]),
            "instance_number": inst,
        }

    def write_localizer(self, root: Path, rng: np.random.Generator) -> None:
        """Render (noise from `rng`) and write the localiser series under export root `root`."""
        from lsdc.io.dicomwrite import write_slice

        e = self.localizer
        spec = e.spec
        images = render_series(self._phantom, spec, rng)
        for s in range(spec.num_slices):
            write_slice(
                root / e.paths[s],
                to_stored(images[s], spec),
                study_id=self.study_id,
                series_id=spec.series_id,
                instance_number=int(spec.instance_numbers[s]),
                position=spec.positions[s],
                orientation=spec.orientations[s],
                pixel_spacing=spec.pixel_spacing,
                slice_thickness=spec.thickness,
                # Three planes have no spacing between slices.
                spacing_between_slices=None if self.three_plane else spec.spacing,
                series_description=e.description,
                extra=e.headers,
            )

    def manifest(self) -> list[dict]:
        """One row per file this study writes (the copy of the duplicate last)."""
        rows = [
            self.manifest_row(e, s, e.paths[s], False)
            for e in self.all_series()
            for s in range(e.spec.num_slices)
        ]
        if self.duplicate is not None:
            original, copy = self.duplicate
            row = next(r for r in rows if r["path"] == original)
            rows.append(row | {"path": copy, "duplicate": 1})
        return rows

    def write_duplicate(self, root: Path) -> None:
        """Copy the chosen file (already written) under its second name."""
        from lsdc.fileio import atomic_write_bytes

        if self.duplicate is not None:
            original, copy = self.duplicate
            atomic_write_bytes(root / copy, (root / original).read_bytes())


def localizer_spec(
    rng: np.random.Generator, phantom: Any, size: int, three_plane: bool
) -> SeriesSpec:
    """Geometry of a 3-slice low-resolution localiser around L3.

    Three planes (sagittal, coronal, axial through the L3 body) or three parallel sagittal
    slices; matrix about half the sagittal one over a wider field of view.
    """
    p = phantom.p
    centre = phantom.unstraighten(0.0, float(phantom.body_c[4]), -p.body_depth / 2)
    centre = centre + rng.normal(0, 3.0, 3)
    n = max(32, size // 4 * 2)
    ps = float(rng.uniform(380, 440)) / n
    thick = float(rng.uniform(7.0, 10.0))
    sag = (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]))
    cor = (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0]))
    ax = (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]))
    if three_plane:
        frames, centres, spacing = [sag, cor, ax], [centre] * 3, thick
    else:
        spacing = float(rng.uniform(12.0, 25.0))
        frames = [sag] * 3
        centres = [centre + k * spacing * np.array([1.0, 0.0, 0.0]) for k in (-1, 0, 1)]
    half = (n / 2 - 0.5) * ps
    pos = np.stack([c - half * r - half * cc for c, (r, cc) in zip(centres, frames, strict=True)])
    return SeriesSpec(
        series_id=0,
        series_type=LOCALIZER,
        sequence="T2",
        rows=n,
        cols=n,
        pixel_spacing=(ps, ps),
        thickness=thick,
        spacing=spacing,
        positions=pos,
        orientations=np.stack([np.concatenate(f) for f in frames]),
        instance_numbers=np.arange(1, 4, dtype=np.int64),
        scale=float(rng.uniform(400, 2500)),
    )


def plan_export(seed: int, n_studies: int, split_code: int) -> tuple[dict[int, str], int | None]:
    """Cross-study choices of one export: ({position: shared folder} for the mixed pair, the
    position of the study that writes a duplicate). Positions index the split's studies."""
    if n_studies == 0:
        return {}, None
    rng = np.random.default_rng([int(seed), 2**31 - 2, split_code])
    mixed: dict[int, str] = {}
    if n_studies >= 2:
        folder = f"DICOM/{random_name(rng)}"
        for k in rng.choice(n_studies, 2, replace=False):
            mixed[int(k)] = folder
    return mixed, int(rng.integers(n_studies))


def to_file_set(export: Path, rows: list[dict], uid: str) -> list[dict]:
    """Turn the export folder into a DICOM File-set with a DICOMDIR; return the rows renamed.

    pydicom's FileSet names the files itself (PTxxxxxx/STxxxxxx/SExxxxxx/IMxxxxxx, the DICOM
    media File ID rules), so the drawn naming styles and the mixed folder give way to its
    names; the duplicate copy stays where it was drawn, outside the DICOMDIR. `uid` (the
    File-set UID) makes the DICOMDIR byte-identical per seed.
    """
    from pydicom.fileset import FileSet

    staging = export.parent / f".{export.name}.staging"
    if staging.exists():
        shutil.rmtree(staging)
    export.rename(staging)
    fs = FileSet()
    fs.UID = uid
    fs.ID = "LSDC PHANTOM"
    originals = sorted(
        (r for r in rows if not r["duplicate"]),
        key=lambda r: (r["study_id"], r["series_number"], r["instance_number"]),
    )
    for r in originals:
        fs.add(staging / r["path"])
    fs.write(export.resolve())
    file_ids = {str(inst.SOPInstanceUID): Path(inst.FileID).as_posix() for inst in fs}
    out = []
    for r in rows:
        if r["duplicate"]:
            (export / r["path"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(staging / r["path"], export / r["path"])
            out.append(r)
        else:
            out.append(r | {"path": file_ids[r["sop_instance_uid"]]})
    shutil.rmtree(staging)
    return out


def manifest_csv(rows: Iterable[dict]) -> str:
    """The export manifest (`MANIFEST_COLUMNS`), rows sorted by path."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in sorted(rows, key=lambda r: r["path"]):
        writer.writerow({k: r[k] for k in MANIFEST_COLUMNS})
    return buf.getvalue()
