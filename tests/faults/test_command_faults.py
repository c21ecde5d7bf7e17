"""Command faults: what a whole command must refuse, or how it must stop, before it harms its
inputs or wastes work. An output path that would overwrite an input, a second writer on a runs
folder, a malformed table, a missing images folder: one line naming the path and why, before
anything is read at length or written. Ctrl-C: one line, exit status 130, no partial file, and
`lsdc fit` resumes when run again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pandas as pd
import pytest

from lsdc.cli import main
from lsdc.constants import TARGETS


def _run(args: list[str | Path], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    """`lsdc ARGS` in this process: its exit status and its non-blank stderr lines."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, [x for x in capsys.readouterr().err.splitlines() if x.strip()]


def _refused(args: list[str | Path], capsys: pytest.CaptureFixture[str], *named: str | Path) -> str:
    """Run `lsdc ARGS`, expect an expected error: one line (and the --debug hint) naming every
    one of `named`; return that line."""
    code, err = _run(args, capsys)
    assert code == 1, err
    assert len(err) == 2 and "--debug" in err[1], err
    for name in named:
        assert str(name) in err[0], err[0]
    return err[0]


def _files(*folders: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


def _fake_runs(tmp_path: Path) -> Path:
    """A folder holding one file (as a runs folder does): the commands must refuse before they
    read it."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "plan.json").write_text("{}")
    return runs


# --------------------------------------------------------------------------- outputs vs inputs


def _first_dcm(data: Path) -> Path:
    return sorted((data / "test_images").rglob("*.dcm"))[0]


# --out of `lsdc predict DATA --runs RUNS --work WORK` -> the path the refusal must name and why.
PREDICT_OUT = {
    "descriptions_table": lambda d, r, w: (d / "test_series_descriptions.csv",) * 2,
    "dicom_file": lambda d, r, w: (_first_dcm(d),) * 2,
    "runs_file": lambda d, r, w: (r / "plan.json",) * 2,
    "work_file": lambda d, r, w: (w / "kept.npz",) * 2,
    # The coordinates beside the submission would land on the coordinates table.
    "beside_an_input": lambda d, r, w: (d / "train_label.csv", d / "train_label_coordinates.csv"),
    "existing_folder": lambda d, r, w: (w,) * 2,
}


@pytest.mark.parametrize("kind", sorted([*PREDICT_OUT, "link_to_input"]))
def test_predict_never_writes_over_an_input(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    runs, work = _fake_runs(tmp_path), tmp_path / "work"
    work.mkdir()
    (work / "kept.npz").write_bytes(b"a cache file")
    if kind == "link_to_input":
        out = named = tmp_path / "link.csv"
        out.symlink_to(data / "train.csv")
    else:
        out, named = PREDICT_OUT[kind](data, runs, work)
    before = _files(data, runs, work)
    args = ["predict", data, "--runs", runs, "--out", out, "--work", work]
    line = _refused(args, capsys, named)
    assert ("is a folder" if kind == "existing_folder" else "would overwrite") in line, line
    assert _files(data, runs, work) == before  # not a byte changed, nothing added


@pytest.mark.parametrize("where", ["data", "inside", "around", "work_inside"])
def test_fit_refuses_a_runs_or_work_folder_mixed_with_the_data(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    runs = {"data": data, "inside": data / "runs", "around": tmp_path}.get(where, tmp_path / "r")
    extra = ["--work", data / "cache"] if where == "work_inside" else []
    before = sorted(tmp_path.rglob("*"))
    line = _refused(["fit", data, "--out", runs, "--preset", "tiny", *extra], capsys, data)
    assert "data folder" in line, line
    assert sorted(tmp_path.rglob("*")) == before  # nothing created


def test_every_command_writing_a_path_refuses_one_over_its_input(
    fx: ModuleType, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = fx.studies(data)[0]
    run = tmp_path / "run"
    run.mkdir()
    (run / "oof.npz").write_bytes(b"a run's file")
    table = data / "train.csv"
    cases = [
        (["preprocess", data, "--pipeline", "sequence", "--cache", data / "cache"], data),
        (["index", data, "--out", table], table),
        (["viz", "phantom", data, study, "--out", table], table),
        (["train", "slice-relevance", data, "--out", data], data),
        (["train", "sequence", data, "--out", data / "run"], data),
        (["ensemble", "fit", "--runs", run, "--out", run / "oof.npz"], run / "oof.npz"),
        (["predict", run, data, "--out", table], table),
    ]
    before = _files(data, run)
    for args, named in cases:
        line = _refused(args, capsys, named)
        assert "would overwrite" in line or "inside" in line or "is the" in line, line
    assert _files(data, run) == before
    assert not (data / "cache").exists() and not (data / "run").exists()


# --------------------------------------------------------------------------- one writer

HOLDER = """
import sys, time
from pathlib import Path
from lsdc.pipeline import hold_runs
with hold_runs(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(600)
"""


def _hold(runs: Path) -> subprocess.Popen[str]:
    """Another process holding `runs` as a running `lsdc fit` does."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(runs)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _other_plan(runs: Path) -> None:
    """plan.json and fit.json of a fit with other settings, so a fit that gets past the lock
    stops at once, naming them."""
    from lsdc.pipeline import make_plan

    (runs / "plan.json").write_text(
        json.dumps(make_plan("tiny", overrides=["relevance.folds=3"]).to_dict())
    )
    (runs / "fit.json").write_text(json.dumps({"started": ["relevance"]}))


def test_one_writer_per_runs_folder_and_a_dead_writer_blocks_nothing(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs, sub = tmp_path / "runs", tmp_path / "sub.csv"
    holder = _hold(runs)
    try:
        fit = ["fit", data, "--out", runs, "--preset", "tiny"]
        line = _refused(fit, capsys, runs, f"pid {holder.pid}", "another lsdc fit")
        assert "--out" in line
        assert [p.name for p in runs.iterdir()] == [".lock"]  # nothing written
        line = _refused(["predict", data, "--runs", runs, "--out", sub], capsys, runs)
        assert f"pid {holder.pid}" in line and not sub.exists()
    finally:
        holder.kill()
        holder.wait()
    # Killed, the holder left its lock file behind, naming a dead process: fit takes it over
    # (and meets the next check, the settings of this runs folder).
    assert (runs / ".lock").read_text().strip() == str(holder.pid)
    _other_plan(runs)
    _refused(fit, capsys, "other settings for relevance")
    assert (runs / ".lock").read_text().strip() == str(os.getpid())
    # A lock file that no process holds, naming a live process (pid 1), blocks nothing either.
    (runs / ".lock").write_text("1\n")
    _refused(["predict", data, "--runs", runs, "--out", sub], capsys, "no ensemble")


def test_the_extra_processes_of_a_multi_device_stage_never_take_the_lock(
    data: Path, tmp_path: Path
) -> None:
    # Lightning starts `lsdc fit` again for each extra device while rank 0 holds the lock: they
    # must neither wait for it nor fail on it.
    runs = tmp_path / "runs"
    holder = _hold(runs)
    code = (
        "import sys\nfrom lsdc.pipeline import fit\n"
        "fit(sys.argv[1], sys.argv[2], preset='tiny', log=print, progress=False)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID")}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(data), str(runs)],
            env={**env, "LOCAL_RANK": "1"},
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 0, done.stderr[-2000:]


# --------------------------------------------------------------------------- tables and folders


def _lower_case_severities(data: Path) -> tuple[str, str, str]:
    """Every severity of train.csv in lower case, as some exports write them -> the line,
    column and value read first."""
    labels = pd.read_csv(data / "train.csv", dtype=str, keep_default_na=False)
    for col in TARGETS:
        labels[col] = labels[col].str.lower()
    labels.to_csv(data / "train.csv", index=False)
    col = next(c for c in TARGETS if (labels[c] != "").any())
    row = int((labels[col] != "").to_numpy().argmax())
    return f"line {row + 2}", f"'{col}'", f"'{labels[col].iloc[row]}'"


def test_fit_checks_every_table_before_any_work(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where = _lower_case_severities(data)
    runs = tmp_path / "runs"
    fit = ["fit", data, "--out", runs, "--preset", "tiny"]
    _refused(fit, capsys, data / "train.csv", *where, "unknown severity")
    assert not runs.exists()  # nothing trained, nothing written


def test_predict_checks_the_descriptions_table_before_loading_anything(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = data / "test_series_descriptions.csv"
    desc = pd.read_csv(table, dtype=str)
    desc.loc[1, "series_description"] = "Coronal T1"
    desc.to_csv(table, index=False)
    args = ["predict", data, "--runs", _fake_runs(tmp_path), "--out", tmp_path / "s.csv"]
    _refused(args, capsys, table, "line 3", "Coronal T1")


def test_a_missing_images_folder_stops_predict_and_fit_before_any_work(
    fx: ModuleType, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    runs, out, work = tmp_path / "runs", tmp_path / "out" / "sub.csv", tmp_path / "work"
    runs.mkdir()
    predict = ["predict", data, "--runs", runs, "--out", out, "--work", work]
    # One study's folder missing is that study's problem (degraded, named in the warnings):
    # predict goes on, here to the runs folder, which is empty.
    shutil.rmtree(data / "test_images" / str(fx.studies(data, "test")[0]))
    _refused([*predict[:5], tmp_path / "sub.csv"], capsys, "not a runs folder")
    # The whole folder missing is a missing input, not 2 degraded studies.
    shutil.rmtree(data / "test_images")
    _refused(predict, capsys, data / "test_images")
    assert not out.parent.exists() and not work.exists()
    shutil.rmtree(data / "train_images")
    _refused(
        ["fit", data, "--out", tmp_path / "r", "--preset", "tiny"], capsys, data / "train_images"
    )
    assert not (tmp_path / "r").exists()


# --------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_while_preprocessing_is_one_line_exit_130_and_no_partial_file(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real SIGINT to this process at the worst moment: a study's file written, not renamed.
    cache = tmp_path / "cache"
    replace = os.replace

    def interrupted_replace(src: str, dst: str) -> None:
        if str(dst).endswith(".npz"):
            os.kill(os.getpid(), signal.SIGINT)
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    args = ["preprocess", data, "--pipeline", "sequence", "--cache", cache, "size=32"]
    code, err = _run(args, capsys)
    assert code == 130 and err == ["lsdc preprocess: interrupted"], (code, err)
    assert not list(cache.glob("*.npz")) and not list(cache.glob(".*.tmp"))


def _until(proc: subprocess.Popen[str], text: str) -> list[str]:
    """stdout lines of `proc` up to the first containing `text` (all of them if it ends)."""
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            break
    return lines


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])  # 2: the folds train side by side
def test_ctrl_c_during_fit_says_where_exits_130_and_the_same_command_resumes(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    workers: str,
) -> None:
    import lsdc.training.engine  # noqa: F401 - imported now, so the checks below are quick
    from lsdc.synth import generate_dataset

    data = generate_dataset(
        tmp_path / "data", train_studies=6, test_studies=2, size=64, seed=21,
        coords_fraction=1.0, progress=False,
    )  # fmt: skip
    runs = tmp_path / "runs"
    fit = ["fit", str(data), "--out", str(runs), "--preset", "tiny", "--models", "multitask",
           "multitask.engine.epochs=3", "--workers", workers]  # fmt: skip
    with (tmp_path / "stderr").open("w") as err:
        # Its own process group, as a terminal's foreground job: Ctrl-C reaches every process.
        proc = subprocess.Popen(
            [sys.executable, "-m", "lsdc", *fit],
            stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True,
        )  # fmt: skip
        try:
            seen = _until(proc, "multitask fold0 epoch 1/3")
            assert "epoch 1/3" in seen[-1], seen
            # While it trains, a second fit and a predict of the same folder are refused.
            _refused(fit, capsys, runs, f"pid {proc.pid}")
            sub = tmp_path / "sub.csv"
            _refused(["predict", data, "--runs", runs, "--out", sub], capsys, f"pid {proc.pid}")
            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(timeout=120) == 130
        finally:
            proc.kill()
    lines = [x for x in (tmp_path / "stderr").read_text().splitlines() if x.strip()]
    assert lines == [
        "lsdc fit: interrupted during stage multitask; run the same command to resume"
    ], lines
    assert not [p for p in runs.rglob("*") if ".tmp" in p.name]

    again = subprocess.run([sys.executable, "-m", "lsdc", *fit], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "slice relevance CV" not in again.stdout  # a finished stage is not done again
    state = json.loads((runs / "fit.json").read_text())
    assert set(state["seconds"]) == {"relevance", "multitask_cache", "multitask", "ensemble"}
    assert (runs / "ensemble.json").exists()

    # Ctrl-C while predicting (a real SIGINT, sent to this process as the first model predicts):
    # one line, 130, and neither a submission nor its warnings.
    from lsdc.inference.predictor import Predictor

    def interrupted(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Predictor, "predict_cache", interrupted)
    out = tmp_path / "out" / "sub.csv"
    code, err = _run(["predict", data, "--runs", runs, "--out", out], capsys)
    assert code == 130 and err == ["lsdc predict: interrupted"], (code, err)
    assert not out.parent.exists() or not list(out.parent.iterdir())
