"""lsdc.grade.report on a tiny phantom study: the page is self-contained (relative, existing,
valid PNGs; no absolute path, no external URL), names every picture, holds all 25 grades, and
says so where no model placed a point or a source file is gone."""

from __future__ import annotations

import csv
import re
from collections.abc import Collection
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from lsdc import geometry
from lsdc.constants import (
    CONDITIONS,
    LEVELS,
    SEVERITIES,
    TARGETS,
    condition_from_title,
    level_from_title,
    level_to_title,
)
from lsdc.grade.report import write_study_report
from lsdc.grade.results import Grade, Keypoint, SeriesUse, StudyGrades

NOT_LOCATED = "not located: no model placed this point"
# Targets the test leaves without a keypoint (besides any the phantom has no coordinate for).
DROPPED = {"spinal_canal_stenosis_l5_s1", "left_subarticular_stenosis_l1_l2"}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    from lsdc.synth import generate_dataset

    out = tmp_path_factory.mktemp("phantom") / "data"
    return generate_dataset(out, train_studies=0, test_studies=1, size=64, seed=5, progress=False)


def phantom_grades(data_dir: Path, dropped: Collection[str] = ()) -> StudyGrades:
    """A `StudyGrades` of the phantom's one test study: keypoints at its true coordinates
    (truth/test_label_coordinates.csv) on the files they name, except `dropped`; grades drawn
    so that every severity is the most probable somewhere."""
    data_dir = Path(data_dir)
    with open(data_dir / "test_series_descriptions.csv") as fh:
        descriptions = list(csv.DictReader(fh))
    with open(data_dir / "truth" / "test_label_coordinates.csv") as fh:
        coordinates = list(csv.DictReader(fh))
    study = descriptions[0]["study_id"]
    images = data_dir / "test_images" / study

    rng = np.random.default_rng(0)
    grades = []
    for i, target in enumerate(TARGETS):
        p = rng.dirichlet(np.ones(3))
        p = np.roll(np.sort(p), i % 3 - 2)  # the largest at index i % 3
        grades.append(Grade(target, *map(float, p)))

    keypoints = []
    for c in coordinates:
        target = f"{condition_from_title(c['condition'])}_{level_from_title(c['level'])}"
        if target in dropped:
            continue
        path = images / c["series_id"] / f"{c['instance_number']}.dcm"
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        x, y = float(c["x"]), float(c["y"])
        mm = geometry.pixel_to_patient(
            x, y, ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
        )
        keypoints.append(
            Keypoint(
                target=target,
                series_instance_uid=ds.SeriesInstanceUID,
                sop_instance_uid=ds.SOPInstanceUID,
                sop_class_uid=ds.SOPClassUID,
                instance_number=int(ds.InstanceNumber),
                column=x,
                row=y,
                patient_mm=tuple(float(v) for v in mm),
                source_path=str(path),
            )
        )

    series = []
    for d in descriptions:
        files = sorted((images / d["series_id"]).glob("*.dcm"))
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        series.append(
            SeriesUse(
                series_instance_uid=ds.SeriesInstanceUID,
                series_number=int(ds.SeriesNumber),
                description=d["series_description"],
                files=len(files),
                series_type=d["series_description"],
                used=True,
                reason="SeriesDescription",
            )
        )
    series.append(
        SeriesUse("1.2.3.4", 1, "3-plane loc", 3, None, False, "localizer: 3 orientations")
    )
    ds = pydicom.dcmread(next(images.rglob("*.dcm")), stop_before_pixels=True)
    return StudyGrades(
        study_instance_uid=ds.StudyInstanceUID,
        study_id=ds.StudyID,
        grades=grades,
        keypoints=keypoints,
        series=series,
        models=["multitask", "sequence"],
        warnings=["Axial T2 <covers> L3/L4 to L5/S1 only"],
    )


class _Page(HTMLParser):
    """Images (src, alt, the caption of their figure), figure captions and texts, grade cells."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.figures: list[dict[str, str]] = []  # {"caption", "text"} of every figure
        self.grade_cells: list[str] = []
        self.links: list[str] = []
        self._stack: list[str] = []
        self._figure: dict[str, str] | None = None
        self._grades = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self._stack.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "table":
            self._grades = "grades" in (a.get("class") or "")
        if tag == "figure":
            self._figure = {"caption": "", "text": "", "img": ""}
            self.figures.append(self._figure)
        if tag == "img":
            self.images.append({"src": a["src"], "alt": a.get("alt") or ""})
            if self._figure is not None:
                self._figure["img"] = a["src"]
        if tag == "td" and self._grades:
            self._cell = []

    def handle_endtag(self, tag):
        if self._stack:
            self._stack.pop()
        if tag == "figure":
            self._figure = None
        if tag == "td" and self._cell is not None:
            self.grade_cells.append(" ".join(self._cell))
            self._cell = None
        if tag == "table":
            self._grades = False

    def handle_data(self, data):
        if self._figure is not None:
            key = "caption" if "figcaption" in self._stack else "text"
            self._figure[key] += data
        if self._cell is not None:
            self._cell.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def test_report_is_self_contained_and_complete(phantom, tmp_path):
    result = phantom_grades(phantom, DROPPED)
    located = {k.target for k in result.keypoints}
    missing = [t for t in TARGETS if t not in located]
    assert set(DROPPED) <= set(missing) and len(missing) < len(TARGETS) // 2

    out = tmp_path / "report"
    page_path = write_study_report(result, out)
    assert page_path == out / "report.html"
    text = page_path.read_text()
    page = _parse(page_path)

    # Every picture: a relative path under images/, a PNG there, alt text and a caption that
    # names it (its series description and instance number).
    by_src = {f["img"]: f for f in page.figures if f["img"]}
    assert len(page.images) == len(by_src) == len(located) + 1  # windows + the overview
    for img in page.images:
        assert img["src"].startswith("images/"), img
        png = out / img["src"]
        assert png.resolve().is_relative_to(out.resolve()) and png.is_file(), img
        with Image.open(png) as im:
            assert im.format == "PNG"
            im.verify()
        caption = by_src[img["src"]]["caption"]
        assert img["alt"] == caption and "instance" in caption, img
        assert any(s.description in caption for s in result.series), caption
    assert len({i["src"] for i in page.images}) == len(page.images)  # uniquely named
    windows = [f["caption"] for f in page.figures if f["img"] and "overview" not in f["img"]]
    for k in result.keypoints:
        condition, level = k.target[: -len("_l1_l2")], k.target[-len("l1_l2") :]
        name = f"{condition.replace('_', ' ').capitalize()}, {level_to_title(level)}"
        assert sum(c.startswith(name) and f"instance {k.instance_number}" in c for c in windows)

    # The overview: a spinal canal instance, every level marked or accounted for.
    overview = next(f for f in page.figures if "overview" in f["img"])
    assert "Sagittal T2/STIR" in overview["caption"] and "SOPInstanceUID" in overview["caption"]

    # The 25 cells, levels by row and conditions by column, with their probabilities.
    assert len(page.grade_cells) == 25
    for i, cell in enumerate(page.grade_cells):
        g = result.grade(f"{CONDITIONS[i % 5]}_{LEVELS[i // 5]}")
        n, m, s = g.probs
        assert f"N {n:.2f} · M {m:.2f} · S {s:.2f}" in cell
        assert cell.startswith(SEVERITIES[g.severity_index])
    assert {c.split()[0] for c in page.grade_cells} == {"Normal/Mild", "Moderate", "Severe"}

    # A target without a point says so, in place of its picture.
    not_located = [f for f in page.figures if NOT_LOCATED in f["text"]]
    assert len(not_located) == len(missing) == text.count(NOT_LOCATED)
    for f in not_located:
        assert not f["img"]

    # Series, warnings (escaped), identity; nothing that points outside the folder.
    for s in result.series:
        assert s.description in text and s.reason in text
    assert "skipped" in text and "Axial T2 &lt;covers&gt; L3/L4" in text
    assert result.study_instance_uid in text and "not a diagnosis" in text
    assert "multitask, sequence" in text
    assert str(phantom) not in text and str(tmp_path) not in text
    assert not re.search(r"(?:https?|file):|//|\burl\(|@import", text)
    assert all(not link.startswith("/") for link in page.links)
    assert sum(p.stat().st_size for p in out.rglob("*")) < 2_000_000


def test_overview_falls_back_and_lost_files_are_reported(phantom, tmp_path):
    # No spinal canal point: the overview shows a Sagittal T1 instance. One source file gone:
    # its window says so, naming the file but not its folder.
    result = phantom_grades(phantom, {f"spinal_canal_stenosis_{lv}" for lv in LEVELS})
    gone = next(k for k in result.keypoints if k.target.startswith("right_subarticular"))
    copy = tmp_path / "moved" / Path(gone.source_path).name
    copy.parent.mkdir()
    result.keypoints[result.keypoints.index(gone)] = Keypoint(
        **{**gone.__dict__, "source_path": str(copy)}
    )
    page_path = write_study_report(result, tmp_path / "report", window_mm=30)
    page = _parse(page_path)
    text = page_path.read_text()

    overview = next(f for f in page.figures if "overview" in f["img"])
    assert "Sagittal T1" in overview["caption"] and "foraminal" in overview["caption"]
    assert f"source file {copy.name} not found" in text and str(copy.parent) not in text
    assert text.count(NOT_LOCATED) == 5 and "30 × 30 mm" in text


def test_no_sagittal_point_no_overview(phantom, tmp_path):
    result = phantom_grades(phantom, {t for t in TARGETS if "subarticular" not in t})
    page_path = write_study_report(result, tmp_path / "report")
    page = _parse(page_path)
    assert "No overview" in page_path.read_text()
    assert all("overview" not in i["src"] for i in page.images)
    with pytest.raises(ValueError, match="window_mm"):
        write_study_report(result, tmp_path / "again", window_mm=0)
