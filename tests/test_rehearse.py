"""`lsdc fit --preset P --rehearse`: the preset's own code paths (loader workers, mixed
precision, several processes), on the CPU at a tiny size, then `predict` (issue 19)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
    assert r.exercised[0].startswith("multitask: no loader workers, bf16 autocast")
    assert _engine(make_plan("cpu", overrides=r.overrides), "multitask").num_workers == 0


@pytest.mark.slow
def test_the_gpu_preset_rehearses_every_stage_then_predicts(tmp_path):
    """Both families with 2 persistent loader workers, bf16 autocast and 2 processes over gloo,
    then a valid submission from `predict` through the same paths. A real command line:
    Lightning's launcher starts the second process by running it again."""
    from lsdc.inference.submission import validate_submission_file
    from lsdc.synth import generate_dataset

    data = generate_dataset(
        tmp_path / "data", train_studies=10, test_studies=2, size=64, seed=3,
        coords_fraction=1.0, progress=False,
    )  # fmt: skip
    runs = tmp_path / "runs"
    src = Path(__file__).resolve().parents[1] / "src"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "lsdc", "fit", str(data), "--out", str(runs), "--preset", "gpu",
         "--rehearse"],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "exercised: multitask: 2 persistent loader workers" in proc.stdout
    assert proc.stdout.count("2 processes over gloo") == 2  # both families
    sub = runs / "rehearsal-submission.csv"
    assert validate_submission_file(sub, data / "test_series_descriptions.csv") == []
    log = (runs / "fit.log").read_text()
    assert "bfloat16 Automatic Mixed Precision" in log
    # The second process joins once; both families train in the one process group.
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in log
