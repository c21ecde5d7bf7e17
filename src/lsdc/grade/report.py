"""The per-study HTML report of `lsdc grade`.

Input: one `StudyGrades` (grades, keypoints on named source instances, series choices,
warnings). Output: `out_dir/report.html` and the PNGs it shows in `out_dir/images/`, linked
relatively, so the folder can be moved, zipped or opened from disk in any browser (no external
CSS, scripts or fonts). The page holds, in order: the study's identity and models, the 5 x 5 grade
table, a mid-sagittal overview with each level's point, each target's window around its point,
the study's series and what grading did with them, and every warning.

Pixels come from each keypoint's source file (`Keypoint.source_path`), rescaled, MONOCHROME1
inverted and windowed on the instance's 1st-99.5th percentiles. A file that cannot be read any
more leaves its picture out, with the reason in text: the report still shows the grades.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lsdc import geometry
from lsdc.constants import (
    CONDITION_SERIES,
    CONDITIONS,
    LEVELS,
    SAGITTAL_T1,
    SAGITTAL_T2,
    SEVERITIES,
    level_to_title,
)
from lsdc.fileio import atomic_write_text
from lsdc.grade.results import Grade, Keypoint, StudyGrades
from lsdc.htmlpage import FileNames, esc, figure, pyplot, save_figure
from lsdc.io.dicom import SliceHeader, SliceReadError, read_image

__all__ = ["write_study_report"]

# Most probable severity -> cell colour, light to dark so the order survives greyscale printing
# and every colour-vision deficiency (ColorBrewer RdYlBu's blue, orange and red, a scheme it marks
# colour-blind safe); the class is also named in text, so colour is never the only cue.
_SEVERITY_COLOURS = ("#d1e5f0", "#fdb863", "#b2182b")
_SEVERITY_INK = ("#10263a", "#3d2300", "#ffffff")
_SEVERITY_SHORT = ("N", "M", "S")
_NOT_LOCATED = "not located: no model placed this point"

_WINDOW_PX = 200  # side of each window picture
_OVERVIEW_PX = 480  # long side of the overview picture
_MARK = "#ffd700"  # marker colour: bright on grey, with a black outline for bright tissue

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 1.5em auto;
       max-width: 1180px; padding: 0 1em; color: #1b1b1b; line-height: 1.4; }
h1 { margin-bottom: 0.3em; font-size: 1.6em; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: 0.2em; margin-top: 1.8em; }
h3 { margin: 1.2em 0 0.4em; }
p.disclaimer { background: #fff4d6; border-left: 5px solid #c58a00; padding: 0.5em 0.8em;
               font-weight: 600; }
p.note { color: #444; font-size: 0.92em; max-width: 62em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.6em; vertical-align: top; }
th { background: #f0f0f0; text-align: left; }
table.grades th { vertical-align: middle; }
table.meta th { width: 11em; }
table.meta td { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 0.95em; }
table.grades { table-layout: fixed; width: 100%; }
table.grades th.lvl { width: 5.5em; }
table.grades td { text-align: center; padding: 0.5em 0.3em; }
table.grades .cls { display: block; font-weight: 700; font-size: 1.05em; }
table.grades .probs { display: block; font-variant-numeric: tabular-nums; white-space: nowrap;
                      font-size: 0.92em; }
.legend { display: flex; gap: 1.2em; align-items: center; flex-wrap: wrap; font-size: 0.92em; }
.swatch { display: inline-block; width: 1.1em; height: 1.1em; border: 1px solid #777;
          vertical-align: -0.2em; margin-right: 0.35em; }
figure { margin: 0; }
figure img { display: block; border: 1px solid #999; }
figcaption { color: #333; font-size: 0.85em; margin-top: 0.3em; }
figure.overview figcaption { max-width: 60em; }
.windows { display: flex; gap: 12px; flex-wrap: wrap; }
.windows figure { width: 202px; border-top: 6px solid #ccc; padding-top: 4px; }
.missing { width: 200px; height: 200px; border: 1px dashed #888; background: #f4f4f4;
           display: flex; align-items: center; justify-content: center; text-align: center;
           color: #444; font-size: 0.9em; padding: 0 1em; box-sizing: border-box; }
td.used { color: #145a14; font-weight: 600; }
td.skipped { color: #7a4a00; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
""" + "".join(
    f".sev-{i} {{ background: {bg}; color: {ink}; }}\n"
    f".windows figure.sev-{i} {{ background: none; color: inherit; border-top-color: {bg}; }}\n"
    for i, (bg, ink) in enumerate(zip(_SEVERITY_COLOURS, _SEVERITY_INK, strict=True))
)


def write_study_report(
    result: StudyGrades, out_dir: str | Path, *, window_mm: float = 24.0
) -> Path:
    """Write `out_dir/report.html` for one graded study, with its PNGs in `out_dir/images/`;
    returns the page's path. `window_mm`: side of the square region shown around each point."""
    if not window_mm > 0:
        raise ValueError(f"window_mm must be positive, got {window_mm}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    page = _Page(result, out, window_mm)
    parts = [
        _header(result),
        _grade_table(result),
        page.overview_section(),
        page.windows_section(),
        _series_section(result),
        _warnings_section(result),
    ]
    title = f"lsdc grade: study {result.study_id}"
    doc = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body>\n</html>\n"
    )
    return atomic_write_text(out / "report.html", doc)


# --- text sections -------------------------------------------------------------------------


def _condition_name(condition: str) -> str:
    """`left_neural_foraminal_narrowing` -> `Left neural foraminal narrowing`."""
    return condition.replace("_", " ").capitalize()


def _split_target(target: str) -> tuple[str, str]:
    """`spinal_canal_stenosis_l1_l2` -> (`spinal_canal_stenosis`, `l1_l2`)."""
    return target[: -len("_l1_l2")], target[-len("l1_l2") :]


def _grade_text(grade: Grade) -> str:
    """`Moderate (0.62)`: the most probable severity and its probability."""
    i = grade.severity_index
    return f"{SEVERITIES[i]} ({grade.probs[i]:.2f})"


def _header(result: StudyGrades) -> str:
    models = ", ".join(result.models) if result.models else "none recorded"
    located = len({k.target for k in result.keypoints})
    return "\n".join(
        [
            f"<h1>Lumbar spine MRI grades: study {esc(result.study_id)}</h1>",
            '<p class="disclaimer">These are outputs of research models, not a diagnosis: they '
            "have not been reviewed by a radiologist.</p>",
            '<table class="meta">',
            f"<tr><th>StudyInstanceUID</th><td>{esc(result.study_instance_uid)}</td></tr>",
            f"<tr><th>Study id</th><td>{esc(result.study_id)}</td></tr>",
            f"<tr><th>Models</th><td>{esc(models)}</td></tr>",
            f"<tr><th>Points located</th><td>{located} of {len(result.grades)}</td></tr>",
            "</table>",
        ]
    )


def _grade_table(result: StudyGrades) -> str:
    head = "".join(f"<th>{esc(_condition_name(c))}</th>" for c in CONDITIONS)
    legend = "".join(
        f'<span><span class="swatch sev-{i}"></span>{esc(s)} ({_SEVERITY_SHORT[i]})</span>'
        for i, s in enumerate(SEVERITIES)
    )
    lines = [
        "<h2>Grades</h2>",
        '<p class="note">Each cell: the most probable severity (its colour) and the probability '
        "of each: N Normal/Mild, M Moderate, S Severe.</p>",
        f'<div class="legend">{legend}</div>',
        f'<table class="grades">\n<tr><th class="lvl">Level</th>{head}</tr>',
    ]
    for level in LEVELS:
        cells = []
        for condition in CONDITIONS:
            g = result.grade(f"{condition}_{level}")
            i = g.severity_index
            probs = " · ".join(
                f"{s} {p:.2f}" for s, p in zip(_SEVERITY_SHORT, g.probs, strict=True)
            )
            cells.append(
                f'<td class="sev-{i}"><span class="cls">{esc(SEVERITIES[i])}</span>'
                f'<span class="probs">{esc(probs)}</span></td>'
            )
        title = level_to_title(level)
        lines.append(
            f'<tr><th class="lvl"><a href="#{level}">{esc(title)}</a></th>{"".join(cells)}</tr>'
        )
    lines.append("</table>")
    return "\n".join(lines)


def _series_section(result: StudyGrades) -> str:
    lines = [
        "<h2>Series</h2>",
        "<table>\n<tr><th>Description</th><th>Series number</th><th>Files</th>"
        "<th>Identified as</th><th>Used</th><th>Reason</th></tr>",
    ]
    for s in result.series:
        number = "" if s.series_number is None else str(s.series_number)
        used = "used" if s.used else "skipped"
        lines.append(
            f"<tr><td>{esc(s.description or '(no description)')}</td>"
            f'<td class="num">{esc(number)}</td><td class="num">{s.files}</td>'
            f"<td>{esc(s.series_type or '–')}</td>"
            f'<td class="{used}">{used}</td><td>{esc(s.reason)}</td></tr>'
        )
    lines.append("</table>")
    if not result.series:
        lines = ["<h2>Series</h2>", '<p class="note">No series recorded.</p>']
    return "\n".join(lines)


def _warnings_section(result: StudyGrades) -> str:
    if not result.warnings:
        return '<h2>Warnings</h2>\n<p class="note">None.</p>'
    items = "".join(f"<li>{esc(w)}</li>" for w in result.warnings)
    return f"<h2>Warnings</h2>\n<ul>{items}</ul>"


# --- pictures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Image:
    """One source instance, ready to show."""

    header: SliceHeader
    pixels: np.ndarray  # float32 (rows, cols), rescaled, MONOCHROME1 inverted
    lo: float  # display window: 1st and 99.5th percentiles of the instance
    hi: float


@dataclass(frozen=True)
class _Mark:
    """A point to draw on a picture, in its pixel coordinates."""

    x: float
    y: float
    label: str = ""
    projected: bool = False  # placed on another instance and projected onto this one


class _Page:
    """The picture sections of one report: reads each source instance once, names each PNG."""

    def __init__(self, result: StudyGrades, out: Path, window_mm: float) -> None:
        self.result = result
        self.out = out
        self.window_mm = window_mm
        self.names = FileNames()
        self._images: dict[str, _Image | str] = {}

    # -- reading

    def image(self, path: str) -> _Image | str:
        """The instance at `path`, or why it cannot be shown (without the folder, which the
        page must not reveal)."""
        if path not in self._images:
            self._images[path] = self._read(Path(path))
        return self._images[path]

    @staticmethod
    def _read(path: Path) -> _Image | str:
        if not path.is_file():
            return f"source file {path.name} not found"
        try:
            header, pixels = read_image(path)
        except SliceReadError as exc:
            return f"source file {path.name} unreadable ({exc.reason.replace(str(path), '…')})"
        lo, hi = np.percentile(pixels, [1.0, 99.5])
        return _Image(header, pixels, float(lo), float(max(hi, lo + 1e-6)))

    def description(self, kp: Keypoint, image: _Image | None = None) -> str:
        """The series description of a keypoint's instance, as the study's series table has it."""
        for s in self.result.series:
            if s.series_instance_uid == kp.series_instance_uid and s.description:
                return s.description
        if image is not None and image.header.description:
            return image.header.description
        return "series without a description"

    def save(self, stem: str, fig) -> str:
        """Save `fig` under images/ with a unique name; its URL relative to the page."""
        name = f"images/{self.names.new(stem)}"
        save_figure(self.out / name, fig)
        return name

    # -- overview

    def _overview_choice(self) -> tuple[str, Keypoint, list[Keypoint]] | None:
        """(what the points are, the instance to show, the points to mark): the instance most
        spinal-canal points lie on, else Sagittal T1's, else any sagittal point's."""
        kps = self.result.keypoints

        def on(series_type: str) -> list[Keypoint]:
            return [k for k in kps if CONDITION_SERIES[_split_target(k.target)[0]] == series_type]

        def sagittal(k: Keypoint) -> bool:
            img = self.image(k.source_path)
            return isinstance(img, _Image) and (
                geometry.orientation_label(img.header.orientation) == "sagittal"
            )

        groups = [
            ("spinal canal points", on(SAGITTAL_T2)),
            ("foraminal points (Sagittal T1)", on(SAGITTAL_T1)),
            ("sagittal points", [k for k in kps if sagittal(k)]),
        ]
        for what, group in groups:
            counts = Counter(k.sop_instance_uid for k in group)
            for sop, _ in counts.most_common():
                shown = next(k for k in group if k.sop_instance_uid == sop)
                if isinstance(self.image(shown.source_path), _Image):
                    return what, shown, group
        return None

    def overview_section(self) -> str:
        lines = ["<h2>Mid-sagittal overview</h2>"]
        choice = self._overview_choice()
        if choice is None:
            lines.append(
                '<p class="note">No overview: no model placed a point on a readable sagittal '
                "image.</p>"
            )
            return "\n".join(lines)
        what, shown, group = choice
        img = self.image(shown.source_path)
        assert isinstance(img, _Image)
        rows, cols = img.pixels.shape
        row_mm, col_mm = img.header.pixel_spacing
        # Square display pixels of the same size in mm both ways, long side _OVERVIEW_PX.
        step = max(rows * row_mm, cols * col_mm) / _OVERVIEW_PX
        height = max(1, round(rows * row_mm / step))
        width = max(1, round(cols * col_mm / step))
        grey = _sample(
            img,
            (np.arange(height) + 0.5) * (rows / height) - 0.5,
            (np.arange(width) + 0.5) * (cols / width) - 0.5,
        )

        def to_display(col: float, row: float) -> tuple[float, float]:
            return (col + 0.5) * width / cols - 0.5, (row + 0.5) * height / rows - 0.5

        marks, notes = _overview_marks(img, shown, group, to_display)
        fig = _picture(grey, marks, img.header.orientation, label_size=11)
        url = self.save("overview-sagittal", fig)
        caption = (
            f"Overview: {self.description(shown, img)}, instance {shown.instance_number} "
            f"(SOPInstanceUID {shown.sop_instance_uid}), the instance most {what} were placed "
            "on, shown whole; each level's point marked. " + " ".join(notes)
        )
        lines.append(figure(url, caption, css_class="overview"))
        return "\n".join(lines)

    # -- windows

    def windows_section(self) -> str:
        w = f"{self.window_mm:g}"
        lines = [
            "<h2>Windows around each point</h2>",
            f'<p class="note">Per level, a {w} × {w} mm region of the source instance centred on '
            "each predicted point (between the four ticks), upsampled for visibility. Letters at "
            "the edges give the patient direction (L/R left/right, A/P anterior/posterior, S/I "
            "superior/inferior); the bar above each picture has the colour of its grade.</p>",
        ]
        for level in LEVELS:
            title = level_to_title(level)
            lines.append(f'<h3 id="{level}">{esc(title)}</h3>\n<div class="windows">')
            for condition in CONDITIONS:
                lines.append(self._window(condition, level))
            lines.append("</div>")
        return "\n".join(lines)

    def _window(self, condition: str, level: str) -> str:
        target = f"{condition}_{level}"
        grade = self.result.grade(target)
        sev = f"sev-{grade.severity_index}"
        what = f"{_condition_name(condition)}, {level_to_title(level)}"
        kp = self.result.keypoint(target)
        if kp is None:
            return _text_figure(sev, _NOT_LOCATED, f"{what}: {_grade_text(grade)}")
        img = self.image(kp.source_path)
        source = f"{self.description(kp, img if isinstance(img, _Image) else None)}"
        source += f", instance {kp.instance_number}"
        if isinstance(img, str):
            return _text_figure(
                sev, f"image not available: {img}", f"{what}: {source}: {_grade_text(grade)}"
            )
        row_mm, col_mm = img.header.pixel_spacing
        # Output pixel k samples the point + (k + 0.5 - n/2) * (window / n) mm along each axis.
        offsets = (np.arange(_WINDOW_PX) + 0.5 - _WINDOW_PX / 2) * (self.window_mm / _WINDOW_PX)
        grey = _sample(img, kp.row + offsets / row_mm, kp.column + offsets / col_mm)
        centre = _WINDOW_PX / 2 - 0.5
        fig = _picture(grey, [_Mark(centre, centre)], img.header.orientation, label_size=9)
        url = self.save(f"{level}-{condition}", fig)
        caption = f"{what}: {source}: {_grade_text(grade)}"
        return figure(url, caption, css_class=sev)


def _overview_marks(
    img: _Image,
    shown: Keypoint,
    group: list[Keypoint],
    to_display: Callable[[float, float], tuple[float, float]],
) -> tuple[list[_Mark], list[str]]:
    """Each level's point of `group` on the overview instance `img` (the instance of `shown`),
    and the caption's notes on levels placed elsewhere or not at all."""
    h = img.header
    marks, absent, elsewhere = [], [], {}
    for level in LEVELS:
        title = level_to_title(level)
        at_level = [k for k in group if _split_target(k.target)[1] == level]
        here = [k for k in at_level if k.sop_instance_uid == shown.sop_instance_uid]
        if here:
            marks.append(_Mark(*to_display(here[0].column, here[0].row), title))
        elif not at_level:
            absent.append(title)
        else:
            # Placed on a neighbouring instance: drawn where it projects onto this one, so
            # that every level shows, and the caption says how far away it lies.
            found = [
                geometry.patient_to_pixel(k.patient_mm, h.position, h.orientation, h.pixel_spacing)
                + (k.instance_number,)
                for k in at_level
            ]
            col_row, dist, instance = min(found, key=lambda f: abs(float(f[1])))
            xy = to_display(float(col_row[0]), float(col_row[1]))
            marks.append(_Mark(*xy, title + "*", projected=True))
            elsewhere.setdefault(instance, []).append((title, abs(float(dist))))
    notes = []
    for instance, items in elsewhere.items():
        lo, hi = min(d for _, d in items), max(d for _, d in items)
        away = f"{hi:.1f}" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}–{hi:.1f}"
        titles = ", ".join(t for t, _ in items)
        notes.append(
            f"* Placed on instance {instance}, {away} mm from this one, and drawn where it "
            f"projects: {titles}."
        )
    if absent:
        notes.append(f"Not located: {', '.join(absent)}.")
    return marks, notes


def _text_figure(sev: str, text: str, caption: str) -> str:
    """A figure-sized box holding `text` where a picture would be."""
    return (
        f'<figure class="{sev}"><div class="missing">{esc(text)}</div>'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _sample(img: _Image, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The instance at source pixel rows (H,) x cols (W,) (fractional, centres at integers),
    cubic, windowed to uint8 (H, W); outside the image is black."""
    from scipy import ndimage

    pixels = img.pixels
    steps = [abs(float(np.diff(a).mean())) if len(a) > 1 else 1.0 for a in (rows, cols)]
    if max(steps) > 1.5:
        # Shrinking: smooth first, or the noise of the skipped pixels aliases into the picture.
        pixels = ndimage.gaussian_filter(pixels, [max(0.0, (s - 1) / 2) for s in steps])
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    # "nearest" so that the outer half of the edge pixels keeps their value ("constant" would
    # blacken it); only what lies beyond the image's edge is black.
    values = ndimage.map_coordinates(pixels, [rr, cc], order=3, mode="nearest")
    height, width = pixels.shape
    outside = (rr < -0.5) | (rr > height - 0.5) | (cc < -0.5) | (cc > width - 0.5)
    values[outside] = img.lo
    scaled = (values - img.lo) / (img.hi - img.lo)
    return np.round(255 * np.clip(scaled, 0, 1)).astype(np.uint8)


def _direction_letters(direction: np.ndarray) -> tuple[str, str]:
    """(toward, away) patient-direction letters of an image axis, e.g. ("P", "A") for +y in LPS;
    the dominant axis only (oblique planes show their nearest direction)."""
    axis = int(np.argmax(np.abs(direction)))
    plus, minus = (("L", "R"), ("P", "A"), ("S", "I"))[axis]
    return (plus, minus) if direction[axis] > 0 else (minus, plus)


def _picture(grey: np.ndarray, marks: list[_Mark], orientation: np.ndarray, *, label_size: int):
    """A matplotlib figure exactly the size of `grey` (H, W) uint8, with the patient directions
    at its edges and `marks` drawn: a labelled circle where a mark has a label, else four ticks
    around the point that leave the anatomy under it visible."""
    from matplotlib import patheffects

    plt = pyplot()
    height, width = grey.shape
    fig = plt.figure(figsize=(width / 100, height / 100))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.imshow(grey, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xlim(-0.5, width - 0.5)
    ax.set_ylim(height - 0.5, -0.5)
    ax.axis("off")
    outline = [patheffects.withStroke(linewidth=2.5, foreground="black")]

    row_dir, col_dir = geometry.plane_axes(orientation)
    right, left = _direction_letters(row_dir)
    down, up = _direction_letters(col_dir)
    pad = 4
    for text, x, y, ha, va in (
        (left, pad, height / 2, "left", "center"),
        (right, width - 1 - pad, height / 2, "right", "center"),
        (up, width / 2, pad, "center", "top"),
        (down, width / 2, height - 1 - pad, "center", "bottom"),
    ):
        ax.text(x, y, text, color="white", fontsize=label_size - 1, ha=ha, va=va,
                fontweight="bold", path_effects=outline)  # fmt: skip

    scale = min(width, height)
    for m in marks:
        if m.label:
            ax.plot(
                m.x, m.y, marker="o", markersize=scale / 50, markerfacecolor="none",
                markeredgecolor=_MARK, markeredgewidth=1.6, linestyle="none",
                alpha=0.7 if m.projected else 1.0, path_effects=outline,
            )  # fmt: skip
            ax.annotate(
                m.label, (m.x, m.y), xytext=(scale / 45, 0), textcoords="offset points",
                color="white", fontsize=label_size, va="center", ha="left",
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "black", "alpha": 0.6,
                      "edgecolor": "none"},
            )  # fmt: skip
        else:
            gap, tick = scale * 0.05, scale * 0.09
            for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                ax.plot(
                    [m.x + dx * gap, m.x + dx * (gap + tick)],
                    [m.y + dy * gap, m.y + dy * (gap + tick)],
                    color=_MARK, linewidth=2, solid_capstyle="butt", path_effects=outline,
                )  # fmt: skip
    return fig
