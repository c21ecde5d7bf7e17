"""A written phantom dataset: readers accept it, coordinates hit their structures, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lsdc import geometry
from lsdc.cli import app
from lsdc.constants import AXIAL_T2, CONDITION_SERIES, CONDITIONS, SERIES_TYPES, TARGETS
from lsdc.io.study import load_study
from lsdc.io.tables import read_coordinates, read_series_descriptions, read_train_labels
from lsdc.synth import generate_dataset
from lsdc.synth.writer import CONDITION_LANDMARK

# Seed 108 draws the real-data quirks the readers must survive into 5 studies: a study lacking a
# series type, one with two axial series, one with a per-disc stack on another matrix, rescale.
KW = {"train_studies": 3, "test_studies": 2, "size": 64, "seed": 108, "coords_fraction": 1.0}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("phantom"), progress=False, **KW)


def _truth(root: Path) -> dict[int, dict]:
    lines = (root / "truth" / "studies.jsonl").read_text().splitlines()
    return {int(r["study_id"]): r for r in map(json.loads, lines)}


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_layout_and_tables_pass_the_readers(dataset: Path) -> None:
    train = read_train_labels(dataset / "train.csv")
    assert len(train) == 3 and list(train.columns) == ["study_id", *TARGETS]
    test = read_train_labels(dataset / "truth" / "test_labels.csv")
    assert len(test) == 2
    coords = read_coordinates(dataset / "train_label_coordinates.csv")
    assert set(coords.condition) <= set(CONDITIONS) and len(coords) > 40
    quirks = {"lacking": 0, "two_axial": 0, "resampled": 0, "multi_stack": 0}
    for split, n in (("train", 3), ("test", 2)):
        descs = read_series_descriptions(dataset / f"{split}_series_descriptions.csv")
        assert descs.study_id.nunique() == n
        assert set(descs.series_description) <= set(SERIES_TYPES)
        mapping = {int(r.series_id): r.series_description for r in descs.itertuples()}
        for sid in descs.study_id.unique():
            study = load_study(dataset, int(sid), split=split, descriptions=mapping)
            assert not study.errors
            types = [s.series_type for s in study.series]
            assert set(types) <= set(SERIES_TYPES)
            quirks["lacking"] += len(set(types)) < 3
            quirks["two_axial"] += types.count(AXIAL_T2) == 2
            for s in study.series:
                assert s.volume.shape[1:] in ((64, 64), (48, 48))
                assert 3 <= s.num_slices <= 60
                quirks["resampled"] += "resampled" in s.flags
                quirks["multi_stack"] += "mixed_orientation" in s.flags
    assert all(quirks.values()), quirks


def test_sample_submission_is_valid_and_scores(dataset: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "validate-submission",
            str(dataset / "sample_submission.csv"),
            "--series-descriptions",
            str(dataset / "test_series_descriptions.csv"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "valid" in res.output
    from lsdc.metrics import score_files

    s = score_files(dataset / "truth" / "test_labels.csv", dataset / "sample_submission.csv")
    assert 0.5 < s["score"] < 2.0


@pytest.mark.parametrize("split", ["train", "test"])
def test_coordinates_lie_at_their_structure(dataset: Path, split: str) -> None:
    truth = _truth(dataset)
    cfile = (
        "train_label_coordinates.csv" if split == "train" else "truth/test_label_coordinates.csv"
    )
    coords = read_coordinates(dataset / cfile)
    descs = read_series_descriptions(dataset / f"{split}_series_descriptions.csv")
    mapping = {int(r.series_id): r.series_description for r in descs.itertuples()}
    checked = 0
    for sid, rows in coords.groupby("study_id"):
        study = load_study(dataset, int(sid), split=split, descriptions=mapping)
        rec = truth[int(sid)]
        x0 = rec["params"]["x0"]
        by_id = {s.series_id: s for s in study.series}
        for r in rows.itertuples():
            series = by_id[int(r.series_id)]
            assert series.series_type == CONDITION_SERIES[r.condition]
            idx = series.slice_index(int(r.instance_number))
            # x, y are native pixels of the file; a resampled slice maps them onto the volume.
            col, row = series.native_to_volume(idx, r.x, r.y)
            p = geometry.series_pixel_to_patient(series, col, row, idx)
            want = np.asarray(rec["landmarks"][CONDITION_LANDMARK[r.condition]][r.level])
            # In-plane: the projection is exact; through-plane: at most half a slice gap.
            tol = 0.5 * series.spacing_between_slices + 1.0
            assert np.linalg.norm(p - want) < tol, (sid, r.condition, r.level)
            if r.condition.startswith("left"):
                assert p[0] > x0 + 5  # the patient's left is +x (LPS)
            elif r.condition.startswith("right"):
                assert p[0] < x0 - 5
            checked += 1
    assert checked >= 40


def test_deterministic_across_runs_and_workers(dataset: Path, tmp_path: Path) -> None:
    again = generate_dataset(tmp_path / "again", workers=2, progress=False, **KW)
    a, b = _tree(dataset), _tree(again)
    assert a.keys() == b.keys()
    different = [k for k in a if a[k] != b[k]]
    assert not different, different[:5]


def test_coords_fraction_and_arguments(tmp_path: Path) -> None:
    out = generate_dataset(
        tmp_path / "d",
        train_studies=2,
        test_studies=0,
        size=32,
        seed=1,
        coords_fraction=0.0,
        progress=False,
    )
    assert (out / "train_label_coordinates.csv").read_text().count("\n") == 1  # header only
    with pytest.raises(ValueError, match="coords_fraction"):
        generate_dataset(
            tmp_path / "e", train_studies=1, test_studies=0, size=64, seed=1, coords_fraction=1.5
        )


@pytest.mark.slow
def test_cli_synth_with_preview_and_viz(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(
        app,
        [
            "synth",
            str(out),
            "--train-studies",
            "1",
            "--test-studies",
            "1",
            "--size",
            "64",
            "--seed",
            "2",
            "--preview",
        ],
    )
    assert res.exit_code == 0, res.output
    png = out / "preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    test_id = next(r for r in _truth(out).values() if r["split"] == "test")["study_id"]
    res = runner.invoke(
        app, ["viz", "phantom", str(out), str(test_id), "--out", str(tmp_path / "t.png")]
    )
    assert res.exit_code == 0, res.output
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_rerun_replaces_a_phantom_but_never_other_data(tmp_path: Path) -> None:
    out = tmp_path / "p"
    generate_dataset(out, train_studies=2, test_studies=0, size=32, seed=1, progress=False)
    first = sorted(p.name for p in (out / "train_images").iterdir())
    generate_dataset(out, train_studies=1, test_studies=0, size=32, seed=2, progress=False)
    second = sorted(p.name for p in (out / "train_images").iterdir())
    assert len(second) == 1 and not set(second) & set(first)  # no stale studies left
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError):
        generate_dataset(other, train_studies=1, test_studies=0, size=32, seed=1)
    assert (other / "keep.txt").read_text() == "user data"


def test_axial_slices_and_series_make_real_size_axial_stacks(tmp_path: Path) -> None:
    from lsdc.synth.writer import build_study

    out = generate_dataset(
        tmp_path / "d", train_studies=2, test_studies=0, size=64, seed=108,
        axial_slices=24, axial_series=2, progress=False,
    )  # fmt: skip
    desc = read_series_descriptions(out / "train_series_descriptions.csv")
    axial = desc[desc["series_description"] == AXIAL_T2]
    assert axial.groupby("study_id").size().tolist() == [2, 2]
    for sid, ser in axial[["study_id", "series_id"]].itertuples(index=False):
        assert len(list((out / "train_images" / str(sid) / str(ser)).glob("*.dcm"))) == 24
    assert json.loads((out / "truth" / "synth.json").read_text())["axial_slices"] == 24
    # The options change the axial series only: the sagittal ones are drawn first, unchanged.
    plain, forced = build_study(108, 0, 64), build_study(108, 0, 64, axial_slices=24)
    pairs = zip(plain.specs, forced.specs, strict=True)
    sag = [(a, b) for a, b in pairs if a.series_type != AXIAL_T2]
    assert sag and all(np.array_equal(a.positions, b.positions) for a, b in sag)
    np.testing.assert_array_equal(plain.labels, forced.labels)
    with pytest.raises(ValueError, match="axial_series"):
        generate_dataset(tmp_path / "e", train_studies=1, test_studies=0, size=64, seed=1,
                         axial_series=3)  # fmt: skip
