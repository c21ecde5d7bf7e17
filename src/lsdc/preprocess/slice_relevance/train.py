"""The training run: features, cross-validation, final models, report."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lsdc.config import load_config, save_config
from lsdc.fileio import atomic_write_json, atomic_write_text
from lsdc.preprocess.crops import (
    AxialRoi,
    fit_axial_roi,
)
from lsdc.preprocess.slice_relevance.config import SliceRelevanceConfig
from lsdc.preprocess.slice_relevance.cv import (
    OOF_SLICES_FILE,
    LabelledSeries,
    accuracy_table,
    cross_validate,
    fit_all,
    format_table,
    labelled_series,
)
from lsdc.preprocess.slice_relevance.features import compute_features, load_cached_features
from lsdc.preprocess.slice_relevance.persist import save_models
from lsdc.preprocess.slice_relevance.tasks import MODEL_NAMES, series_slug


def fit_axial_roi_from_points(points: Sequence[Mapping[str, float]]) -> AxialRoi:
    """`AxialRoi` from axial label points given as x/y fractions of their image size."""
    if not points:
        return AxialRoi()
    return fit_axial_roi(np.array([[p["x"], p["y"]] for p in points], dtype=np.float64))


@dataclass
class SliceRelevanceReport:
    """What `train_slice_relevance` produced."""

    run_dir: Path
    table: pd.DataFrame
    studies: int
    failed: dict[int, str]


def format_weights(weights: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table of the vote weights per series type."""
    names = list(MODEL_NAMES)
    lines = ["| series type | " + " | ".join(names) + " |", "|---" + "|---:" * len(names) + "|"]
    for st, w in weights.items():
        lines.append(f"| {st} | " + " | ".join(f"{w.get(n, 0.0):.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def train_slice_relevance(
    data_dir: str | Path,
    out: str | Path,
    *,
    workers: int = 1,
    overrides: Sequence[str] = (),
    feature_cache: str | Path | None = None,
    progress: bool = True,
) -> SliceRelevanceReport:
    """Train and evaluate the slice-relevance ensemble; write a run folder `out`:

    config.yaml, models/<series type>/ (skops + XGBoost JSON + models.json), axial_roi.json,
    oof.csv (out-of-fold predictions per label row), oof_slices.csv (the ensemble's
    out-of-fold slice per series and task), report.json, report.md.
    Features are cached (default `out/features`) and reused by later runs with the same feature
    configuration. `workers` processes compute features and fit the CV folds.
    """
    from lsdc.io.tables import read_coordinates
    from lsdc.preprocess.cache import StudyCache

    data_dir, out = Path(data_dir), Path(out)
    cfg = load_config(SliceRelevanceConfig, None, overrides)
    coords_path = data_dir / "train_label_coordinates.csv"
    coords = read_coordinates(coords_path)
    study_ids = sorted(int(s) for s in coords["study_id"].unique())
    if cfg.max_studies:
        study_ids = study_ids[: cfg.max_studies]
    if len(study_ids) < 2:
        raise ValueError(f"{coords_path}: need coordinates of at least 2 studies to train")
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    cache_dir = Path(feature_cache) if feature_cache is not None else out / "features"
    report = compute_features(
        data_dir, cache_dir, study_ids, cfg.features, workers=workers, progress=progress
    )
    cache = StudyCache.open(cache_dir)

    series: list[LabelledSeries] = []
    axial_points: list[dict[str, float]] = []
    skipped_coordinates: list[str] = []
    by_study = dict(iter(coords.groupby("study_id")))
    for sid in study_ids:
        if sid in report.failed:
            continue
        ls, pts = labelled_series(
            load_cached_features(cache, sid), by_study[sid], sid, skipped_coordinates
        )
        series.extend(ls)
        axial_points.extend(pts)
    if not series:
        raise ValueError(f"{data_dir}: no labelled series could be read")
    if skipped_coordinates:
        print(
            f"slice relevance: {len(skipped_coordinates)} coordinate rows skipped (listed in "
            f"{out / 'report.json'}), e.g. {skipped_coordinates[0]}",
            file=sys.stderr,
        )

    cv = cross_validate(series, cfg, workers=workers, progress=progress)
    table = accuracy_table(cv.rows)
    atomic_write_text(out / "oof.csv", cv.rows.to_csv(index=False))
    atomic_write_text(out / OOF_SLICES_FILE, cv.oof_slices.to_csv(index=False))
    final = fit_all(series, cfg, weights=cv.weights, workers=workers, progress=progress)
    for st, models in final.items():
        save_models(models, out / "models" / series_slug(st))

    fit_axial_roi_from_points(axial_points).save(out / "axial_roi.json")
    studies = len({ls.study_id for ls in series})
    atomic_write_json(
        out / "report.json",
        {
            "studies": studies,
            "labelled_series": len(series),
            "folds": cfg.folds,
            "feature_count": int(series[0].features.shape[1]),
            "failed_studies": {str(k): v for k, v in report.failed.items()},
            # Coordinate rows that could not label a slice (or, outside the image, the ROI).
            "skipped_coordinates": skipped_coordinates,
            "accuracy": table.to_dict(orient="records"),
            "vote_steps": cfg.vote_steps,
            "vote_weights": {st: m.weights for st, m in final.items()},
            "fold_vote_weights": cv.fold_weights,
            "fitted_vote_exact_on_oof": cv.fitted_vote_exact,
        },
    )
    atomic_write_text(
        out / "report.md",
        f"# Slice relevance: study-wise {cfg.folds}-fold cross-validation\n\n"
        f"{studies} studies, {len(series)} labelled series; accuracy over label rows. The "
        "ensemble of each fold votes with weights fitted on the other folds' out-of-fold "
        "probabilities; the final models vote with:\n\n"
        + format_weights({st: m.weights for st, m in final.items()})
        + "\n"
        + format_table(table),
    )
    return SliceRelevanceReport(out, table, studies, dict(report.failed))
