"""PNG montage of a phantom study: mid-sagittal T2, left/right parasagittal T1, axial per disc.

Points come from the dataset's coordinate tables (train_label_coordinates.csv, or
truth/test_label_coordinates.csv for test studies), so the picture checks the CSVs too; where a
study has no coordinate row, the true landmark of truth/studies.jsonl is projected instead
(drawn as a cross). Images are read back through lsdc.io (what every pipeline sees).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lsdc.constants import (
    AXIAL_T2,
    CONDITION_SERIES,
    LEVELS,
    SAGITTAL_T1,
    SAGITTAL_T2,
    SEVERITIES,
    level_to_title,
)
from lsdc.synth.writer import CONDITION_LANDMARK

_COLOUR = {0: "#3ddc84", 1: "#ffb000", 2: "#ff3b3b", -1: "#9e9e9e"}  # by severity; grey = empty


def _truth(data_dir: Path, study_id: int) -> dict:
    path = data_dir / "truth" / "studies.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not a phantom dataset (no truth/studies.jsonl)")
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if int(rec["study_id"]) == int(study_id):
            return rec
    raise KeyError(f"study {study_id} not in {path}")


def _window(img: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(img, [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def render_preview(
    data_dir: str | Path, study_id: int, out_png: str | Path, *, dpi: int = 80
) -> Path:
    """Write the montage PNG of `study_id` (train or test split, found from truth/).

    Saved as a 256-colour palette PNG (noise compresses poorly; this halves the file).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lsdc import geometry
    from lsdc.fileio import atomic_write_bytes
    from lsdc.io.study import load_study
    from lsdc.io.tables import read_coordinates, read_series_descriptions

    data_dir, out_png = Path(data_dir), Path(out_png)
    truth = _truth(data_dir, study_id)
    split = truth["split"]
    descs = read_series_descriptions(data_dir / f"{split}_series_descriptions.csv")
    descs = descs[descs.study_id == study_id]
    study = load_study(
        data_dir,
        study_id,
        split=split,
        descriptions={int(r.series_id): r.series_description for r in descs.itertuples()},
    )
    cpath = (
        data_dir / "train_label_coordinates.csv"
        if split == "train"
        else data_dir / "truth" / "test_label_coordinates.csv"
    )
    coords = read_coordinates(cpath)
    coords = coords[coords.study_id == study_id]

    def points(cond: str) -> list[tuple[int, int, float, float, str, bool]]:
        """(series_id, sorted slice index, x, y, level, from_csv) for one condition."""
        out = []
        stype = CONDITION_SERIES[cond]
        series = study.of_type(stype)
        for lv in LEVELS:
            rows = coords[(coords.condition == cond) & (coords.level == lv)]
            if len(rows):
                r = rows.iloc[0]
                s = next((x for x in series if x.series_id == int(r.series_id)), None)
                if s is not None:
                    idx = s.slice_index(int(r.instance_number))
                    # Native file pixels -> the (possibly resampled) volume grid.
                    col, row = s.native_to_volume(idx, float(r.x), float(r.y))
                    out.append((s.series_id, idx, col, row, lv, True))
                    continue
            pt = truth["landmarks"][CONDITION_LANDMARK[cond]][lv]
            hits = [(geometry.nearest_slice(s, pt), s) for s in series]
            if hits:
                hit, s = min(hits, key=lambda h: h[0].distance_mm)
                out.append((s.series_id, hit.slice_index, hit.col, hit.row, lv, False))
        return out

    labels = truth["labels"]
    panels: list[tuple[str, np.ndarray, list[tuple[float, float, int, bool]]]] = []

    def add_panel(title: str, cond_list: list[str], stype: str, pick_level: str | None) -> None:
        pts = {c: points(c) for c in cond_list}
        first = pts[cond_list[0]]
        if not first:
            return
        if pick_level is None:  # sagittal: the slice most of the condition's points sit on
            sid, idx = max(
                {(p[0], p[1]) for p in first}, key=lambda k: sum((p[0], p[1]) == k for p in first)
            )
        else:
            sel = [p for p in first if p[4] == pick_level]
            if not sel:
                return
            sid, idx = sel[0][0], sel[0][1]
        s = next(x for x in study.series if x.series_id == sid)
        marks = []
        for c in cond_list:
            for p in pts[c]:
                if p[0] == sid and (pick_level is None or p[4] == pick_level):
                    sev = labels[f"{c}_{p[4]}"]
                    marks.append((p[2], p[3], sev, p[5]))
        panels.append((f"{title}  ({stype}, slice {idx + 1}/{s.num_slices})", s.volume[idx], marks))

    add_panel("mid-sagittal", ["spinal_canal_stenosis"], SAGITTAL_T2, None)
    add_panel("left parasagittal", ["left_neural_foraminal_narrowing"], SAGITTAL_T1, None)
    add_panel("right parasagittal", ["right_neural_foraminal_narrowing"], SAGITTAL_T1, None)
    for lv in LEVELS:
        add_panel(
            f"axial {level_to_title(lv)}",
            ["left_subarticular_stenosis", "right_subarticular_stenosis"],
            AXIAL_T2,
            lv,
        )
    if not panels:
        raise ValueError(f"study {study_id}: no series to show")
    ncol = 4
    nrow = int(np.ceil(len(panels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 4.4 * nrow), facecolor="black")
    for ax in np.atleast_1d(axes).ravel():
        ax.axis("off")
    for ax, (title, img, marks) in zip(np.atleast_1d(axes).ravel(), panels, strict=False):
        lo, hi = _window(img)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="lanczos")
        for x, y, sev, from_csv in marks:
            # Rings leave the anatomy under the point visible; a cross marks a projected landmark.
            ax.plot(x, y, "o" if from_csv else "x", ms=9, mfc="none", mec=_COLOUR[sev], mew=1.6)
        ax.set_title(title, color="white", fontsize=9)
    sev_text = "  ".join(f"{s}" for s in SEVERITIES)
    fig.suptitle(
        f"phantom study {study_id} ({split}) - points by severity: green/amber/red = {sev_text}; "
        "x = no CSV row (true landmark)",
        color="white",
        fontsize=10,
    )
    fig.tight_layout()
    import io

    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="black")
    plt.close(fig)
    # Fixed palette: 248 grays plus the marker colours, so quantising never merges severities.
    marks = [tuple(int(c[i : i + 2], 16) for i in (1, 3, 5)) for c in _COLOUR.values()]
    grays = [(int(round(g)),) * 3 for g in np.linspace(0, 255, 256 - len(marks))]
    pal = Image.new("P", (1, 1))
    pal.putpalette([v for rgb in grays + marks for v in rgb])
    rgb = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    img = rgb.quantize(palette=pal, dither=Image.Dither.NONE)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=True)
    return atomic_write_bytes(out_png, out.getvalue())
