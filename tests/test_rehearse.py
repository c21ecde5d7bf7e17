"""`lsdc fit --preset P --rehearse`: the preset's own code paths (loader workers, mixed
precision, several processes), on the CPU at a tiny size, then `predict` (issue 19)."""

from __future__ import annotations

import pytest

from lsdc.pipeline import _engine, make_plan, rehearsal


def test_a_rehearsal_keeps_the_code_paths_and_shrinks_only_sizes():
    plan = make_plan("gpu")
    r = rehearsal(plan)
    rehearsed = make_plan("gpu", overrides=r.overrides)
    for stage in ("multitask", "sequence"):
        before, after = _engine(plan, stage), _engine(rehearsed, stage)
        assert before.num_workers == 8 and after.num_workers == 2
        assert before.precision == "auto" and after.precision == "bf16-mixed"
        assert before.devices == "auto" and after.devices == 2 and after.strategy == "ddp"
        assert after.accelerator == "cpu" and after.epochs == 1 and after.folds == 2
    assert "sr.device=cpu" in r.overrides
    assert any("2 processes over gloo" in line for line in r.exercised)
    assert any("CUDA" in line for line in r.not_exercised)


def test_a_preset_of_one_process_rehearses_in_one_process():
    r = rehearsal(make_plan("cpu"))
    assert not any("devices" in o for o in r.overrides)
    assert all("one process" in line for line in r.exercised[:2])
    assert _engine(make_plan("cpu", overrides=r.overrides), "multitask").num_workers == 0


@pytest.mark.slow
def test_the_gpu_preset_rehearses_every_stage_then_predicts(tmp_path, capsys):
    """Both families with 2 persistent loader workers, bf16 autocast and 2 processes over gloo,
    then a valid submission from `predict` through the same paths."""
    from lsdc.cli import main
    from lsdc.inference.submission import validate_submission_file
    from lsdc.synth import generate_dataset

    data = generate_dataset(
        tmp_path / "data", train_studies=8, test_studies=2, size=64, seed=9, progress=False
    )
    runs = tmp_path / "runs"
    try:
        main(["fit", str(data), "--out", str(runs), "--preset", "gpu", "--rehearse"])
    except SystemExit as exc:
        assert not exc.code
    out = capsys.readouterr().out
    assert "exercised: multitask: 2 persistent loader workers" in out
    assert "2 processes over gloo" in out
    sub = runs / "rehearsal-submission.csv"
    assert validate_submission_file(sub, data / "test_series_descriptions.csv") == []
    log = (runs / "fit.log").read_text()
    assert "bfloat16 Automatic Mixed Precision" in log
