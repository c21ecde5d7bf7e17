"""Inference from a run folder: the predicted slice of every task of a study."""

from __future__ import annotations

import functools
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lsdc.config import load_config
from lsdc.constants import SERIES_TYPES
from lsdc.preprocess.crops import (
    AxialRoi,
)
from lsdc.preprocess.slice_relevance.config import SliceRelevanceConfig
from lsdc.preprocess.slice_relevance.cv import OOF_SLICE_COLUMNS, OOF_SLICES_FILE
from lsdc.preprocess.slice_relevance.features import (
    FeatureConfig,
    normalise_volume,
    series_features,
)
from lsdc.preprocess.slice_relevance.models import SeriesTypeModels
from lsdc.preprocess.slice_relevance.persist import load_models
from lsdc.preprocess.slice_relevance.tasks import series_slug


@dataclass
class SlicePrediction:
    """The predicted slice of one task in one series."""

    series_id: int
    series_type: str
    task: str
    slice_index: int  # sorted index into Series.volume
    instance_number: int
    probability: float  # ensemble probability of that slice for the task
    scores: np.ndarray  # (S,) ensemble probability of every slice for the task


RunModels = tuple[FeatureConfig, dict[str, SeriesTypeModels]]
# The runs this process has loaded, by resolved folder (at most `_MAX_RUNS`, oldest dropped):
# loaded at a worker's first study, or handed over by the process that started the worker
# (`run_models_initializer`).
_LOADED: dict[str, RunModels] = {}
_MAX_RUNS = 4


def _load_run(run_dir: str) -> RunModels:
    cfg = load_config(SliceRelevanceConfig, Path(run_dir) / "config.yaml")
    models = {}
    for st in SERIES_TYPES:
        folder = Path(run_dir) / "models" / series_slug(st)
        if (folder / "models.json").exists():
            # Only the members that vote: inference never runs the others.
            models[st] = load_models(folder, voting_only=True)
    return cfg.features, models


def run_models(run_dir: str | Path) -> RunModels:
    """The feature configuration and the (voting) models of a run, loaded once per process."""
    key = str(Path(run_dir).resolve())
    if key not in _LOADED:
        _use_run(key, _load_run(key))
    return _LOADED[key]


def _use_run(key: str, loaded: RunModels) -> None:
    _LOADED[key] = loaded
    while len(_LOADED) > _MAX_RUNS:
        del _LOADED[next(iter(_LOADED))]


def run_models_initializer(run_dir: str | Path) -> Callable[[], None]:
    """A worker initializer (`parallel_map(initializer=...)`) that hands the run's models,
    loaded once here, to every worker process: unpickled there, they are the same objects,
    so each worker skips loading them from the run's files (skops, its import and its checks:
    about a second of each worker's start). Models travel between this package's own
    processes only; nothing from the run folder is unpickled."""
    key = str(Path(run_dir).resolve())
    return functools.partial(_use_run, key, run_models(key))


def predict_slices(
    run_dir: str | Path,
    study: Any,
    normalised: MutableMapping[int, np.ndarray] | None = None,
) -> dict[int, dict[str, SlicePrediction]]:
    """For every typed series of `study` with a trained model: task -> `SlicePrediction`.

    Returns `{series_id: {task: SlicePrediction}}`; series of a type the run has no model for
    are left out. `normalised` caches `normalise_volume(series.volume)` by series id: volumes
    found there are used, the others computed and added, so a caller that crops the same
    series (multitask preprocessing) normalises each volume once.
    """
    feats_cfg, models = run_models(run_dir)
    out: dict[int, dict[str, SlicePrediction]] = {}
    for s in study.series:
        m = models.get(s.series_type)
        if m is None:
            continue
        norm = None
        if normalised is not None:
            sid = int(s.series_id)
            if sid not in normalised:
                normalised[sid] = normalise_volume(s.volume)
            norm = normalised[sid]
        f = series_features(s, feats_cfg, normalised=norm)
        proba = m.ensemble_proba(f.features)  # one call per series, members of weight 0 skipped
        preds = {}
        for k, task in enumerate(m.tasks, start=1):
            i = int(np.argmax(proba[:, k]))
            preds[task] = SlicePrediction(
                series_id=f.series_id,
                series_type=f.series_type,
                task=task,
                slice_index=i,
                instance_number=int(f.instance_numbers[i]),
                probability=float(proba[i, k]),
                scores=proba[:, k].copy(),
            )
        out[f.series_id] = preds
    return out


@functools.lru_cache(maxsize=4)
def load_oof_slices(run_dir: str | Path) -> dict[int, dict[int, dict[str, SlicePrediction]]]:
    """The run's out-of-fold slices (`oof_slices.csv`) as `{study: {series: {task:
    SlicePrediction}}}` (with empty `scores` and instance number -1: the table keeps neither).
    Empty when the run predates the file or had too few studies to cross-validate."""
    path = Path(run_dir) / OOF_SLICES_FILE
    if not path.exists():
        return {}
    table = pd.read_csv(path)
    missing = set(OOF_SLICE_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    out: dict[int, dict[int, dict[str, SlicePrediction]]] = {}
    for r in table.itertuples(index=False):
        out.setdefault(int(r.study_id), {}).setdefault(int(r.series_id), {})[str(r.task)] = (
            SlicePrediction(
                series_id=int(r.series_id),
                series_type=str(r.series_type),
                task=str(r.task),
                slice_index=int(r.slice_index),
                instance_number=-1,
                probability=float(r.probability),
                scores=np.empty(0),
            )
        )
    return out


def load_axial_roi(run_dir: str | Path) -> AxialRoi:
    """The axial ROI statistics a slice-relevance run saved."""
    return AxialRoi.load(Path(run_dir) / "axial_roi.json")
