"""Slice-relevance tasks and the names of models and methods."""

from __future__ import annotations

import re

from lsdc.constants import AXIAL_T2, CONDITION_SERIES, LEVELS, SERIES_TYPES

MODEL_NAMES: tuple[str, ...] = ("random_forest", "svm", "mlp", "xgboost")
ENSEMBLE = "ensemble"
BASELINE = "middle_slice"


def series_slug(series_type: str) -> str:
    """A file- and key-safe name for a series type: `Sagittal T2/STIR` -> `sagittal_t2_stir`."""
    return re.sub(r"[^a-z0-9]+", "_", series_type.lower()).strip("_")


def tasks_for(series_type: str) -> tuple[str, ...]:
    """The slice-relevance tasks of a series type: the conditions labelled on a sagittal type,
    the levels on the axial type (left and right subarticular share the slice of a level)."""
    if series_type == AXIAL_T2:
        return LEVELS
    if series_type not in SERIES_TYPES:
        raise ValueError(f"unknown series type {series_type!r}")
    return tuple(c for c, t in CONDITION_SERIES.items() if t == series_type)


def task_of(series_type: str, condition: str, level: str) -> str:
    """The task a coordinate row (condition, level) on `series_type` belongs to."""
    return level if series_type == AXIAL_T2 else condition


def middle_slice(num_slices: int) -> int:
    return int(num_slices) // 2
