"""CSV faults. A malformed table stops the run before any work with one line naming the file,
line and column (a broken table is not one study's problem). A well-formed row that points at
nothing usable (negative or out-of-image point, unknown series, missing instance) drops only that
coordinate, named by `lsdc index` (file line) and by preprocessing (study, condition, level)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

from lsdc.io.tables import TableError


def _edit(path: Path, change: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    change(pd.read_csv(path, dtype=str, keep_default_na=False)).to_csv(path, index=False)


def _set(col: str, value: str, row: int = 1) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[row, col] = value
        return df

    return change


def _dup(row: int = 1) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda df: pd.concat([df, df.iloc[[row]]], ignore_index=True)


def _drop(col: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda df: df.drop(columns=[col])


# table, change, (line, column) the message must name, text it must contain, the pipeline
# that reads the table first.
MALFORMED = {
    "labels_missing_column": (
        "train.csv",
        _drop("spinal_canal_stenosis_l4_l5"),
        ("line 1", "spinal_canal_stenosis_l4_l5"),
        "missing column",
    ),
    "labels_unknown_severity": (
        "train.csv",
        _set("left_subarticular_stenosis_l2_l3", "Very Severe"),
        ("line 3", "left_subarticular_stenosis_l2_l3"),
        "Very Severe",
    ),
    "labels_duplicate_study": ("train.csv", _dup(), ("line 5", "study_id"), "duplicate row"),
    "descriptions_missing_column": (
        "train_series_descriptions.csv",
        _drop("series_description"),
        ("line 1", "series_description"),
        "missing column",
    ),
    "descriptions_unknown_type": (
        "train_series_descriptions.csv",
        _set("series_description", "Coronal T1"),
        ("line 3", "series_description"),
        "Coronal T1",
    ),
    "descriptions_duplicate_row": (
        "train_series_descriptions.csv",
        _dup(),
        ("line", "series_id"),
        "duplicate row",
    ),
    "descriptions_path_id": (
        "train_series_descriptions.csv",
        _set("study_id", "../x"),
        ("line 3", "study_id"),
        "../x",
    ),
    "coordinates_nan": (
        "train_label_coordinates.csv",
        _set("x", "nan"),
        ("line 3", "'x'"),
        "",
    ),
    "coordinates_missing_column": (
        "train_label_coordinates.csv",
        _drop("level"),
        ("line 1", "level"),
        "missing column",
    ),
    "coordinates_unknown_condition": (
        "train_label_coordinates.csv",
        _set("condition", "Central Stenosis"),
        ("line 3", "condition"),
        "Central Stenosis",
    ),
    "coordinates_duplicate_row": (
        "train_label_coordinates.csv",
        _dup(),
        ("line",),
        "duplicate row",
    ),
    "coordinates_path_id": (
        "train_label_coordinates.csv",
        _set("series_id", "../../etc"),
        ("line 3", "series_id"),
        "../../etc",
    ),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_table_is_one_line_naming_file_line_and_column(
    fx: ModuleType, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    from lsdc.cli import main

    name, change, where, text = MALFORMED[kind]
    _edit(data / name, change)
    pipeline = "multitask" if "coordinates" in name else "sequence"
    runner = fx.run_multitask if pipeline == "multitask" else fx.run_sequence
    with pytest.raises(TableError) as err:
        runner(data, tmp_path / "cache")
    message = str(err.value)
    assert message.startswith(str(data / name)), message
    for part in where:
        assert part in message, message
    assert text.lower() in message.lower(), message
    # Nothing was written before the table was read.
    assert not (tmp_path / "cache" / "manifest.json").exists()

    extra = ["selection.without_prediction=middle", "selection.prefer_labelled=true"]
    args = ["preprocess", str(data), "--pipeline", pipeline, "--cache", str(tmp_path / "c2")]
    with pytest.raises(SystemExit) as stop:
        main([*args, *(extra if pipeline == "multitask" else [])])
    assert stop.value.code == 1
    err_lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    # One line naming what and where; the second only says how to see the traceback.
    assert len(err_lines) == 2 and str(data / name) in err_lines[0], err_lines
    assert "--debug" in err_lines[1]
    fx.no_partial_files(tmp_path)


def _axial_row(data: Path) -> tuple[int, pd.Series]:
    coords = pd.read_csv(data / "train_label_coordinates.csv")
    rows = coords[coords.condition == "Left Subarticular Stenosis"]
    return int(rows.index[0]), rows.iloc[0]


UNUSABLE_POINT = {
    "negative": ("x", -7.0, "lies outside"),
    "beyond_image": ("y", 4000.0, "lies outside"),
    "unknown_series": ("series_id", 987654321, "not among the study's readable series"),
    "missing_instance": ("instance_number", 999, "has no readable instance 999"),
}


@pytest.mark.parametrize("kind", sorted(UNUSABLE_POINT))
def test_an_unusable_coordinate_drops_only_that_point_and_is_named(
    fx: ModuleType, data: Path, tmp_path: Path, kind: str
) -> None:
    from lsdc.preprocess.multitask import load_multitask_study

    col, value, reason = UNUSABLE_POINT[kind]
    i, row = _axial_row(data)
    coords = pd.read_csv(data / "train_label_coordinates.csv")
    coords.loc[i, col] = value
    coords.to_csv(data / "train_label_coordinates.csv", index=False)
    study, level = int(row.study_id), str(row.level)

    if kind != "missing_instance":  # the index reads headers, not instances per coordinate
        found = fx.problems_about(fx.index(data), f"train_label_coordinates.csv line {i + 2}")
        assert found and f"study {study}" in found[0], found

    rep = fx.run_multitask(data, tmp_path / "cache")
    assert rep.failed == {} and rep.written == fx.studies(data)
    named = [w for w in rep.warnings[study] if "coordinate dropped" in w]
    assert len(named) == 1 and reason in named[0] and "left_subarticular_stenosis" in named[0]
    # Only that point is masked: the right-side point of the same level is still there.
    key = level.lower().replace("/", "_")
    right = coords[
        (coords.study_id == study)
        & (coords.level == level)
        & (coords.condition == "Right Subarticular Stenosis")
    ]
    crops = {c.key: c for c in load_multitask_study(tmp_path / "cache", study)}
    crop = next(c for k, c in crops.items() if k.endswith(key) and c.series_type == "Axial T2")
    mask = dict(zip(crop.keypoint_names, crop.keypoint_mask, strict=True))
    assert not mask[f"left_subarticular_stenosis_{key}"]
    assert mask[f"right_subarticular_stenosis_{key}"] == (len(right) == 1)
    fx.no_partial_files(tmp_path)


def test_slice_relevance_names_the_coordinates_it_cannot_use() -> None:
    import numpy as np

    from lsdc.constants import AXIAL_T2
    from lsdc.preprocess.slice_relevance import SeriesFeatures, labelled_series

    feats = SeriesFeatures(
        series_id=5,
        series_type=AXIAL_T2,
        features=np.zeros((3, 4), np.float32),
        instance_numbers=np.array([1, 2, 2]),
        native_shapes=np.array([[48, 48]] * 3),
        orientation=np.array([1.0, 0, 0, 0, 1, 0]),
    )
    rows = [  # series, instance, x, y
        (5, 1, 10.0, 12.0),  # fine
        (5, 2, 10.0, 12.0),  # instance carried by two files
        (5, 9, 10.0, 12.0),  # no such instance
        (6, 1, 10.0, 12.0),  # no such series
        (5, 1, -3.0, 12.0),  # outside the image: labels the slice, not the ROI
    ]
    coords = pd.DataFrame(
        [(s, i, "left_subarticular_stenosis", "l4_l5", x, y, AXIAL_T2) for s, i, x, y in rows],
        columns=["series_id", "instance_number", "condition", "level", "x", "y", "series_type"],
    )
    skipped: list[str] = []
    series, points = labelled_series([feats], coords, 77, skipped)
    assert len(points) == 1 and series[0].targets == {"l4_l5": [0, 0]}
    assert len(skipped) == 4
    assert "study 77 series 5 instance 2" in skipped[0] and "several files" in skipped[0]
    assert "instance 9" in skipped[1] and "no readable file" in skipped[1]
    assert "series 6" in skipped[2] and "no readable Axial T2 series" in skipped[2]
    assert "outside the 48x48 image" in skipped[3]
