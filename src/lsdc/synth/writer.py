"""Phantom dataset writer: one study per task (DICOM series + table rows), then the RSNA CSV set.

Every study draws from its own random streams seeded by (seed, study index, purpose), so the output
is byte-identical for the same arguments whatever the number of workers or completion order, and
changing one label leaves the anatomy, geometry and noise of the study untouched.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lsdc.constants import (
    CONDITION_SERIES,
    CONDITIONS,
    LEVELS,
    PROB_COLUMNS,
    SERIES_TYPES,
    SEVERITIES,
    TARGETS,
    condition_to_title,
    level_to_title,
    make_row_id,
)
from lsdc.fileio import atomic_write_text
from lsdc.synth.acquire import SeriesSpec, render_series, sample_protocol, to_stored
from lsdc.synth.anatomy import LEVEL_DISC, SpineParams, SpinePhantom, sample_params, set_narrowing
from lsdc.synth.labels import narrowing_for, sample_labels

# Random stream purposes (the third seed word); never reorder, outputs depend on them.
_LABELS, _NARROW, _ANATOMY, _PROTOCOL, _NOISE, _IDS, _COORDS, _EXPORT = range(8)

# Which landmark (anatomy.SpinePhantom.landmarks key) each condition's coordinate points at.
CONDITION_LANDMARK = {
    "spinal_canal_stenosis": "spinal",
    "left_neural_foraminal_narrowing": "foraminal_left",
    "right_neural_foraminal_narrowing": "foraminal_right",
    "left_subarticular_stenosis": "subarticular_left",
    "right_subarticular_stenosis": "subarticular_right",
}


def _rng(seed: int, index: int, purpose: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), purpose, *extra])


@dataclass
class PhantomStudy:
    """Everything that defines one phantom study, before rendering."""

    labels: np.ndarray  # (25,) severity index per target, -1 = empty
    narrowing: np.ndarray  # (25,) true fraction of space lost per target
    params: SpineParams
    phantom: SpinePhantom
    specs: list[SeriesSpec]
    dropped: str | None


def build_study(
    seed: int,
    index: int,
    size: int,
    labels: np.ndarray | None = None,
    axial_flip: str = "none",
    axial_slices: int = 0,
    axial_series: int = 0,
) -> PhantomStudy:
    """Labels, anatomy and series geometry of study `index` (no rendering, no I/O).

    `labels` overrides the sampled labels (tests vary one label and diff the images);
    `axial_flip`, `axial_slices` and `axial_series` are `acquire.sample_protocol`'s.
    """
    if labels is None:
        labels = sample_labels(_rng(seed, index, _LABELS))
    labels = np.asarray(labels, np.int64)
    nrng = _rng(seed, index, _NARROW)
    # One independent draw per target so one label's change moves only its own narrowing.
    narrowing = np.array(
        [narrowing_for(_rng(seed, index, _NARROW, i), int(lab)) for i, lab in enumerate(labels)]
    )
    deg_noise = nrng.normal(0, 0.08, 6)
    params = sample_params(_rng(seed, index, _ANATOMY))
    n = narrowing.reshape(len(CONDITIONS), len(LEVELS))
    set_narrowing(params, n[0], n[1:3], n[3:5], deg_noise)
    ph = SpinePhantom(params)
    prng = _rng(seed, index, _PROTOCOL)
    dropped = None
    if prng.random() < 0.04:
        dropped = str(prng.choice(list(SERIES_TYPES), p=[0.3, 0.3, 0.4]))
    lab = labels.reshape(len(CONDITIONS), len(LEVELS))
    # Axial stacks skip discs whose subarticular cells are both empty (not imaged, as in real data).
    discs = [LEVEL_DISC[lv] for i, lv in enumerate(LEVELS) if lab[3, i] >= 0 or lab[4, i] >= 0]
    irng = _rng(seed, index, _IDS)
    ids: list[int] = []
    while len(ids) < 4:  # unique series ids of this study
        x = int(irng.integers(10_000_000, 2_000_000_000))
        ids = ids if x in ids else [*ids, x]
    specs = sample_protocol(
        prng,
        ph,
        size,
        [int(x) for x in ids],
        axial_discs=discs or None,
        drop=dropped,
        axial_flip=axial_flip,
        axial_slices=axial_slices,
        axial_series=axial_series,
    )
    return PhantomStudy(labels, narrowing, params, ph, specs, dropped)


def render_study(study: PhantomStudy, seed: int, index: int, **kw) -> list[list[np.ndarray]]:
    """Signal images (spatial order) of every slice of every series of the study."""
    return [
        render_series(study.phantom, spec, _rng(seed, index, _NOISE, j), **kw)
        for j, spec in enumerate(study.specs)
    ]


def coordinates(study: PhantomStudy, study_id: int) -> list[dict]:
    """True coordinate rows (official layout) for the labelled cells of one study."""
    lm = study.phantom.landmarks()
    rows = []
    for ci, cond in enumerate(CONDITIONS):
        stype = CONDITION_SERIES[cond]
        candidates = [s for s in study.specs if s.series_type == stype]
        if not candidates:
            continue
        for li, lv in enumerate(LEVELS):
            if study.labels[ci * len(LEVELS) + li] < 0:
                continue
            point = np.asarray(lm[CONDITION_LANDMARK[cond]][lv])
            best = min(((s.project(point), s) for s in candidates), key=lambda t: t[0][3])
            (sl, x, y, dist), spec = best
            n_rows, n_cols, _ = spec.grid(sl)
            if not (0 <= x < n_cols and 0 <= y < n_rows) or dist > spec.spacing:
                continue  # structure outside the imaged volume: no point, as with real readers
            rows.append(
                {
                    "study_id": study_id,
                    "series_id": spec.series_id,
                    "instance_number": int(spec.instance_numbers[sl]),
                    "condition": condition_to_title(cond),
                    "level": level_to_title(lv),
                    "x": round(x, 4),
                    "y": round(y, 4),
                }
            )
    return rows


@dataclass(frozen=True)
class StudyTask:
    out_dir: str
    seed: int
    index: int
    study_id: int
    split: str  # train | test
    size: int
    with_coords: bool
    axial_flip: str = "none"
    axial_slices: int = 0
    axial_series: int = 0
    layout: str = "competition"  # competition | scanner (see synth.scanner)
    mix_folder: str = ""  # scanner: the folder this study shares with another one
    duplicate: bool = False  # scanner: write one file of this study twice


def make_study(task: StudyTask) -> dict:
    """Render and write one study's DICOM files; return its table rows and truth record
    (and, in the scanner layout, its export manifest rows under "export")."""
    study = build_study(
        task.seed,
        task.index,
        task.size,
        axial_flip=task.axial_flip,
        axial_slices=task.axial_slices,
        axial_series=task.axial_series,
    )
    volumes = render_study(study, task.seed, task.index)
    from lsdc.io.dicomwrite import write_slice

    export = None
    if task.layout == "scanner":
        from lsdc.synth.scanner import ScannerStudy

        export = ScannerStudy(
            _rng(task.seed, task.index, _EXPORT),
            task.study_id,
            study.specs,
            study.phantom,
            task.size,
            mix_folder=task.mix_folder,
            duplicate=task.duplicate,
        )
        root = Path(task.out_dir) / f"{task.split}_export"
    else:
        root = Path(task.out_dir) / f"{task.split}_images" / str(task.study_id)

    for j, (spec, images) in enumerate(zip(study.specs, volumes, strict=True)):
        # The same pixels and geometry in both layouts; the scanner adds names and headers.
        scan = None if export is None else export.series[j]
        for s in range(spec.num_slices):
            inst = int(spec.instance_numbers[s])
            name = f"{spec.series_id}/{inst}.dcm" if scan is None else scan.paths[s]
            write_slice(
                root / name,
                to_stored(images[s], spec),
                study_id=task.study_id,
                series_id=spec.series_id,
                instance_number=inst,
                position=spec.positions[s],
                orientation=spec.orientations[s],
                pixel_spacing=spec.grid(s)[2],
                slice_thickness=spec.thickness,
                spacing_between_slices=spec.spacing,
                series_description=spec.series_type if scan is None else scan.description,
                rescale_slope=spec.slope,
                rescale_intercept=spec.intercept,
                extra=None if scan is None else scan.headers,
            )
    if export is not None:
        export.write_localizer(root, _rng(task.seed, task.index, _EXPORT, 1))
        export.write_duplicate(root)
    label_row = {
        t: (SEVERITIES[int(v)] if v >= 0 else "")
        for t, v in zip(TARGETS, study.labels, strict=False)
    }
    lm = study.phantom.landmarks()
    truth = {
        "study_id": task.study_id,
        "split": task.split,
        "index": task.index,
        "narrowing": {
            t: round(float(f), 5) for t, f in zip(TARGETS, study.narrowing, strict=False)
        },
        "labels": {t: int(v) for t, v in zip(TARGETS, study.labels, strict=False)},
        "landmarks": {
            k: {lv: np.round(p, 4).tolist() for lv, p in d.items()} for k, d in lm.items()
        },
        "series": [s.to_dict() for s in study.specs],
        "dropped_series_type": study.dropped,
        "params": study.params.to_dict(),
    }
    return {
        "index": task.index,
        "study_id": task.study_id,
        "split": task.split,
        "labels": label_row,
        "coordinates": coordinates(study, task.study_id),
        "with_coords": task.with_coords,
        "descriptions": [(task.study_id, s.series_id, s.series_type) for s in study.specs],
        "truth": truth,
        "export": None if export is None else export.manifest(),
    }


def _csv(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    buf.write(",".join(header) + "\n")
    for r in rows:
        buf.write(",".join("" if v is None else str(v) for v in r) + "\n")
    return buf.getvalue()


def write_tables(out_dir: Path, results: list[dict]) -> None:
    """The RSNA CSV set plus truth/ from the per-study results (sorted by study id)."""
    results = sorted(results, key=lambda r: r["study_id"])
    train = [r for r in results if r["split"] == "train"]
    test = [r for r in results if r["split"] == "test"]
    coord_cols = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    desc_cols = ["study_id", "series_id", "series_description"]

    def labels(rs: list[dict]) -> str:
        return _csv(["study_id", *TARGETS], [[r["study_id"], *r["labels"].values()] for r in rs])

    def coords(rs: list[dict]) -> str:
        return _csv(coord_cols, [[c[k] for k in coord_cols] for r in rs for c in r["coordinates"]])

    def descs(rs: list[dict]) -> str:
        return _csv(desc_cols, [list(d) for r in rs for d in r["descriptions"]])

    atomic_write_text(out_dir / "train.csv", labels(train))
    atomic_write_text(
        out_dir / "train_label_coordinates.csv", coords([r for r in train if r["with_coords"]])
    )
    atomic_write_text(out_dir / "train_series_descriptions.csv", descs(train))
    atomic_write_text(out_dir / "test_series_descriptions.csv", descs(test))
    # Full precision so each row sums to 1 within 1e-6 (0.333333 x 3 would not).
    third = repr(1 / 3)
    sub_rows = [
        [make_row_id(r["study_id"], c, lv), third, third, third]
        for r in test
        for c in CONDITIONS
        for lv in LEVELS
    ]
    atomic_write_text(out_dir / "sample_submission.csv", _csv(["row_id", *PROB_COLUMNS], sub_rows))
    atomic_write_text(out_dir / "truth" / "test_labels.csv", labels(test))
    atomic_write_text(out_dir / "truth" / "test_label_coordinates.csv", coords(test))
    atomic_write_text(
        out_dir / "truth" / "studies.jsonl",
        "".join(json.dumps(r["truth"], sort_keys=True) + "\n" for r in results),
    )
