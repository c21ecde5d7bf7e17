"""`lsdc fit` / `lsdc predict DATA --runs`: plan, resume, portability, degraded studies."""

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lsdc.cli import main
from lsdc.inference.submission import validate_submission_file
from lsdc.pipeline import PLAN_FILE, make_plan, predict, stages_of
from lsdc.synth import generate_dataset

TINY = [
    "multitask.engine.epochs=1",
    "sequence.engine.epochs=1",
    "multitask.model.upsample=sr",  # the SR stage and its relative sr_run path
]


def test_plan_puts_user_overrides_after_the_preset_and_refuses_unknown_stages():
    plan = make_plan("demo", ["sequence"], ["sequence.engine.epochs=2"])
    assert plan.overrides["sequence"][-1] == "engine.epochs=2"
    assert stages_of(plan) == ["relevance", "sequence_cache", "sequence", "ensemble"]
    with pytest.raises(ValueError, match="STAGE.key=value"):
        make_plan("demo", ["sequence"], ["epochs=2"])
    with pytest.raises(ValueError, match="unknown preset"):
        make_plan("laptop")
    with pytest.raises(ValueError, match="models must be"):
        make_plan("demo", ["resnet"])


@pytest.mark.parametrize("preset", ["demo", "tiny", "cpu", "gpu"])
def test_the_multitask_cache_is_built_at_the_presets_input_size(preset):
    """Issue 19, item 3: the gpu preset's 256-px input was upsampled from 128-px crops."""
    from lsdc.config import load_config
    from lsdc.preprocess.multitask import MultitaskConfig
    from lsdc.training.multitask import MultitaskTrainConfig

    plan = make_plan(preset)
    cache = load_config(MultitaskConfig, None, plan.overrides["multitask_cache"])
    train = load_config(MultitaskTrainConfig, None, plan.overrides["multitask"])
    inputs = [train.data.input.sagittal_size, train.data.input.axial_size]
    assert cache.crop_size >= max(s or cache.crop_size for s in inputs)


@pytest.mark.parametrize("preset", ["demo", "cpu", "gpu"])
def test_every_preset_that_trains_for_quality_takes_the_measured_reader(preset):
    """The learning curve's choices were in the demo preset alone: `lsdc fit --preset gpu`
    trained without the refiner, the series heads or slice shift."""
    from lsdc.config import load_config
    from lsdc.preprocess.multitask import MultitaskConfig
    from lsdc.training.multitask import MultitaskTrainConfig

    plan = make_plan(preset)
    cache = load_config(MultitaskConfig, None, plan.overrides["multitask_cache"])
    train = load_config(MultitaskTrainConfig, None, plan.overrides["multitask"])
    assert train.model.refine and train.model.read_refined
    assert train.model.keypoint_heads == "series" and train.model.window_sagittal_t1 > 0
    # slice shift moves the three slices read among the cache's 2 x neighbours + 1
    assert train.data.augment.slice_shift_prob > 0 and cache.selection.neighbours >= 2


def test_fit_runs_its_named_stage_units_in_order_and_records_each(tmp_path, monkeypatch):
    """The stages are units the loop runs (`STAGE_ACTIONS`), testable without training."""
    from lsdc.parallel import LOCAL
    from lsdc.pipeline import FIT_FILE, STAGE_ACTIONS, STAGES, _fit_stages

    assert list(STAGE_ACTIONS) == list(STAGES)
    calls: list[str] = []
    for stage in STAGES:
        monkeypatch.setitem(STAGE_ACTIONS, stage, lambda ctx, s=stage: calls.append(s))
    plan = make_plan("tiny", overrides=TINY)
    runs = tmp_path / "runs"
    runs.mkdir()
    lines: list[str] = []
    _fit_stages(
        tmp_path / "data", runs, runs / "cache", plan, writer=True, workers=1,
        log=lines.append, progress=False, executor=LOCAL,
    )  # fmt: skip
    assert calls == stages_of(plan)
    state = json.loads((runs / FIT_FILE).read_text())
    assert state["started"] == stages_of(plan) and set(state["seconds"]) == set(stages_of(plan))
    assert lines[0] == f"[lsdc fit] 1/{len(calls)} relevance"


def test_a_runs_folder_refuses_to_resume_on_other_training_data(tmp_path):
    """Before, only the overrides were compared: another DATA_DIR with the same study ids
    silently reused the old slice-relevance run and cached studies."""
    from lsdc.pipeline import FIT_FILE, _check_plan, data_fingerprint

    data = tmp_path / "data"
    (data / "train_images" / "1").mkdir(parents=True)
    (data / "train.csv").write_text("study_id,x\n1,a\n2,a\n")
    runs = tmp_path / "runs"
    runs.mkdir()
    plan = make_plan("tiny")
    plan.data = data_fingerprint(data)
    (runs / PLAN_FILE).write_text(json.dumps(plan.to_dict()))
    (runs / FIT_FILE).write_text(json.dumps({"started": ["relevance"]}))
    _check_plan(runs, plan)  # the same data resumes

    (data / "train_images" / "9").mkdir()  # unnamed by the tables: trains nothing
    plan.data = data_fingerprint(data)
    _check_plan(runs, plan)
    (data / "train.csv").write_text("study_id,x\n1,b\n2,a\n")
    (data / "train_images" / "2").mkdir()  # a named study's images arrive
    plan.data = data_fingerprint(data)
    with pytest.raises(
        ValueError,
        match=r"other training data \(train.csv differs; study folders: 1 then, 2 now; see ",
    ):
        _check_plan(runs, plan)


def test_predict_on_a_dask_scheduler_needs_a_shared_work_folder(tmp_path):
    # Its default, a temporary folder on this machine, is invisible to workers elsewhere.
    from lsdc.parallel import Executor

    pytest.importorskip("distributed")
    remote = Executor("dask", scheduler="tcp://127.0.0.1:8786")
    with pytest.raises(ValueError, match="every worker sees"):
        predict(tmp_path, tmp_path, tmp_path / "sub.csv", executor=remote)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    generate_dataset(data, train_studies=10, test_studies=3, size=64, seed=3, workers=1)
    code = _cli(["fit", str(data), "--out", str(root / "runs"), "--preset", "tiny", *TINY])
    assert code == 0
    return root


def _cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


@pytest.mark.slow
def test_fit_writes_a_portable_runs_folder_that_predicts_from_raw_dicom(fitted, tmp_path, capsys):
    data, runs = fitted / "data", fitted / "runs"
    fit_json = json.loads((runs / "fit.json").read_text())
    assert set(fit_json["seconds"]) == set(stages_of(make_plan("tiny", overrides=TINY)))
    assert "ensemble" in fit_json and (runs / "ensemble.json").exists()
    log = (runs / "fit.log").read_text()
    assert "GPU available" in log  # Lightning's banner went to the log...
    assert "GPU available" not in capsys.readouterr().out  # ...not to the terminal
    # Stage and epoch lines are in the log too, with timestamps, and epochs give an ETA.
    assert re.search(
        r"^\d{4}-\d\d-\d\d [\d:,]+ lsdc.fit INFO \[lsdc fit\] 1/\d+ relevance$", log, re.M
    )
    assert re.search(
        r"lsdc.fit INFO   multitask fold0 epoch 1/1: .*, multitask ETA \d+ s\)$", log, re.M
    )
    # No file of the runs folder (outside its caches) names an absolute path.
    for f in runs.rglob("*"):
        if f.suffix in (".json", ".yaml", ".csv") and "cache" not in f.relative_to(runs).parts:
            assert str(fitted) not in f.read_text(), f

    # Copied elsewhere without its training caches, the runs folder predicts the same.
    first = predict(data, runs, tmp_path / "a" / "submission.csv")
    moved = tmp_path / "moved"
    shutil.copytree(runs, moved, ignore=shutil.ignore_patterns("cache", "checkpoints"))
    second = predict(data, moved, tmp_path / "b" / "submission.csv")
    assert first.path.read_text() == second.path.read_text()
    assert validate_submission_file(first.path, data / "test_series_descriptions.csv") == []
    assert first.seen_by == {"multitask": 3, "sequence": 3} and first.prior_only == []
    assert first.coordinates is not None and first.coordinates.exists()


@pytest.mark.slow
def test_fit_resumes_and_refuses_other_settings_for_finished_stages(fitted, capsys):
    data, runs = fitted / "data", fitted / "runs"
    plan = (runs / PLAN_FILE).read_text()
    assert _cli(["fit", str(data), "--out", str(runs), "--preset", "tiny", *TINY]) == 0
    assert (runs / PLAN_FILE).read_text() == plan
    code = _cli(["fit", str(data), "--out", str(runs), "--preset", "tiny", *TINY,
                 "sequence.engine.epochs=7"])  # fmt: skip
    assert code == 1
    assert "other settings for sequence" in capsys.readouterr().err


@pytest.mark.slow
def test_a_study_missing_a_series_or_unreadable_is_degraded_and_listed(fitted, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(fitted / "data", data)
    desc = pd.read_csv(data / "test_series_descriptions.csv")
    studies = sorted(desc["study_id"].unique())
    # Study A: its Sagittal T1 series is gone from disk. Study B: every file is garbage.
    a, b = int(studies[0]), int(studies[1])
    t1 = desc[(desc.study_id == a) & (desc.series_description == "Sagittal T1")].series_id
    shutil.rmtree(data / "test_images" / str(a) / str(int(t1.iloc[0])))
    for f in (data / "test_images" / str(b)).rglob("*.dcm"):
        f.write_bytes(b"not a dicom")

    rep = predict(data, fitted / "runs", tmp_path / "out" / "submission.csv")
    assert validate_submission_file(rep.path, data / "test_series_descriptions.csv") == []
    assert rep.prior_only == [b]
    warned = pd.read_csv(rep.warnings_path)
    assert set(warned.study_id) == {a, b}
    assert "Sagittal T1" in " ".join(warned[warned.study_id == a].problem)
    sub = pd.read_csv(rep.path)
    assert len(sub) == 25 * len(studies)
    assert not list(Path(rep.path.parent).glob("*.tmp*"))
