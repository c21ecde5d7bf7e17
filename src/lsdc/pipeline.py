"""`lsdc fit` and `lsdc predict DATA`: one pipeline from an RSNA-format folder to a submission.

`fit` trains every stage in order into a runs folder and resumes whatever is done:

  relevance        slice-relevance models                      RUNS/slice-relevance/
  multitask_cache  multitask crops of the training studies      WORK/multitask-train/
  sequence_cache   sequence stacks of the training studies      WORK/sequence-train/
  sr               super-resolution of the multitask windows    RUNS/sr/
  multitask        the multitask model, every fold              RUNS/multitask/
  sequence         the sequence model, every fold               RUNS/sequence/
  ensemble         weights and calibration on the OOF           RUNS/ensemble.json

Its plan (`RUNS/plan.json`: preset, models, every stage's overrides) is what `predict` re-reads,
as nnU-Net re-reads its plans: the test studies are preprocessed with the training caches'
settings and predicted by every fold of every model, then pooled by the ensemble. WORK (the
training caches, big at real scale) defaults to RUNS/cache; nothing in RUNS names an absolute
path, so a copied runs folder still predicts.

Overrides are `stage.key=value` (e.g. `multitask.engine.epochs=3`, `sequence_cache.size=96`).

A model stage may train on several devices of one node (`sequence.engine.devices=4`): Lightning
starts this command again in one more process per device when rank 0 reaches the stage; those
processes join the stages that train on several devices and do nothing else.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lsdc.fileio import (
    atomic_write_json,
    atomic_write_text,
    check_output_file,
    check_output_folder,
    check_unlocked,
    ensure_writable,
    exclusive_lock,
    load_npz_meta,
    portable_text,
    sibling_csv,
    work_folder,
)
from lsdc.interrupt import Interrupted
from lsdc.parallel import LOCAL, Executor

PLAN_FILE = "plan.json"
FIT_FILE = "fit.json"
LOG_FILE = "fit.log"
LOCK_FILE = ".lock"  # held by the fit writing the runs folder (`hold_runs`)
ENSEMBLE_FILE = "ensemble.json"
PLAN_FORMAT = 1
MODELS = ("multitask", "sequence")
STAGES = (
    "relevance",
    "multitask_cache",
    "sequence_cache",
    "sr",
    "multitask",
    "sequence",
    "ensemble",
)
RUN_DIRS = {
    "relevance": "slice-relevance",
    "sr": "sr",
    "multitask": "multitask",
    "sequence": "sequence",
}

# The multitask choices measured on the learning curve's phantom (bench/README.md, README's
# Learning curve), none tied to the input size, the data's size or the hardware: every preset
# that trains for quality takes them. They were chosen at the demo's scale (64-px input, 100-200
# studies); the cpu and gpu presets have not been measured with or without them.
_MULTITASK_READER: list[str] = [
    # Chosen on the out-of-fold studies of a 100-study training subset of the learning
    # curve's phantom (never its test studies): with these, the calibrated OOF score
    # was 0.86x the weighted prior against 0.96x without (bench/README.md); refinement
    # and the bilinear heatmap target took the median keypoint error from 1.4 to 0.8 mm
    # (axial) and 6.5 to 5.3 mm (Sagittal T1); the average of the weights (a 1-epoch
    # time constant) steadies the late epochs.
    "model.refine=true",
    "loss.heatmap_target=bilinear",
    "model.window_pool=grid",
    "model.window_pixels=16",
    "engine.ema_epochs=1",
    "data.augment.slice_shift_prob=0.3",
    # Half the studies' second pass on their true points all through training, each
    # window up to half its half side off: a reader trained on exactly centred windows
    # learns where its point sits in them (bench/bench_reader.py), and a refiner only
    # sees its point in the middle. On the curve's 200 training studies (out of fold)
    # the Sagittal T1 keypoints went from 3.7 / 8.7 to 2.0 / 5.1 mm (median / p90), T2
    # from 4.0 / 10.6 to 3.5 / 9.3, raw severity from 0.95x to 0.89x the weighted prior
    # and calibrated 0.84x both; at 100 studies 0.88x calibrated both.
    "data.augment.teacher_end=0.5",
    "data.augment.teacher_jitter=0.5",
    # The second pass reads where the refiner puts each point: the same 200-study
    # models, reading again at their refined points, went from 0.89x to 0.82x the
    # weighted prior out of fold (spinal 1.02x -> 0.90x); trained so, 0.79x calibrated
    # at 200 studies, but 0.95x at 100, where the Sagittal T2 points are still 6 mm off.
    "model.read_refined=true",
    # A keypoint head and refiner map per series type: on the curve's 200 training
    # studies (out of fold, two seeds) the Sagittal T2 keypoints went from 3.1 / 7.2 and
    # 3.1 / 7.1 mm (median / p90) to 1.6 / 5.0 and 1.8 / 5.2, at 100 from 5.1 / 11.6 to
    # 2.9 / 10.4; the calibrated severity score moved +0.042, -0.039 and -0.005 (a mean
    # of -0.001: unchanged within the fits' noise).
    "model.keypoint_heads=series",
    # Foraminal windows (Sagittal T1) of a 0.045 half side, the spinal ones (Sagittal
    # T2) kept at 0.06: on the curve's training studies (out of fold, calibrated) the
    # score went 0.509 -> 0.468 and 0.439 -> 0.432 at 200 studies (two seeds) and 0.659 ->
    # 0.645 at 100, foraminal in all three. 0.045 for every sagittal window helped
    # foraminal too but cost spinal (0.454 -> 0.568): a smaller T2 window keeps the
    # refiner from reaching the canal's centre (T2 p90 5.0 -> 6.7 mm).
    "model.window_sagittal_t1=0.045",
]

# What each preset sets per stage; user overrides come after and win. Model sizes and epochs
# are the levers: the data decides the rest.
PRESETS: dict[str, dict[str, list[str]]] = {
    # Minutes on 2 CPU cores, on a phantom of 80 training studies at 128 px.
    "demo": {
        "relevance": ["folds=3"],
        # Five slices a crop, so that training can shift the three it reads (slice shift;
        # every preset with `_MULTITASK_READER`).
        "multitask_cache": ["selection.neighbours=2"],
        "sequence_cache": ["size=64"],
        "sr": ["steps=300", "channels=16", "num_blocks=2", "batch_size=16", "patch=32"],
        # 64-px input and bicubic windows: on 40 training studies a fold, the 96-px input with
        # SR windows read nothing beyond the class balance (fold-0 score 0.759, the weighted
        # prior's) while 64 px, twice the epochs in the same time, reached 0.72-0.73. Stride-4
        # maps (16 x 16 cells, not 8 x 8) halve the keypoint error (sagittal 10.7 -> 6.3 mm).
        "multitask": [
            "engine.folds=2",
            # 22 epochs with a narrow window reader (`window_widths`) cost what 14 did with the
            # default one on the learning curve's fits (one thread; the demo's multitask stage,
            # two threads, went from 314 to 436 s). The reader is most of a step, and alone on
            # its windows it is still learning at 10 epochs (bench/bench_reader.py at 200
            # studies: 0.69x the weighted prior at the true points after 10 epochs, 0.57x after
            # 20). On the curve's 200 training studies (out of fold) the calibrated score went
            # from 0.79x to 0.59x the weighted prior, the Sagittal T1 keypoints from 2.1 / 5.3
            # to 1.5 / 3.9 mm; on the 100 from 0.95x to 0.86x, Sagittal T1 from 4.8 / 12.6 to
            # 2.5 / 7.0 mm.
            "engine.epochs=22",
            "model.window_widths=[16,32,64]",
            "model.backbone=resnet10t",
            "data.input.sagittal_size=64",
            "data.input.axial_size=64",
            "model.fine_stride=4",
            "model.window_px=24",
            "model.upsample=bicubic",
            *_MULTITASK_READER,
            "engine.progress_bar=false",
        ],
        # Its validation score is flat from the second epoch on (0.739 at epoch 2, 0.738 at 10)
        # and its test score the same after 4 epochs as after 10 (0.773 vs 0.770).
        "sequence": [
            "engine.folds=2",
            "engine.epochs=4",
            "model.backbone=resnet10t",
            "engine.progress_bar=false",
        ],
        "ensemble": [],
    },
    # Seconds a stage on a 64-px phantom of a dozen studies: proves the wiring (tests, smoke
    # runs), not the quality.
    "tiny": {
        "relevance": ["folds=2"],
        "multitask_cache": [],
        "sequence_cache": ["size=32"],
        "sr": ["steps=20", "channels=8", "num_blocks=1", "batch_size=8", "patch=16"],
        "multitask": [
            "engine.folds=2",
            "engine.epochs=3",
            "model.backbone=test_convnext",
            "data.input.sagittal_size=32",
            "data.input.axial_size=32",
            "model.window_px=16",
            "engine.progress_bar=false",
        ],
        "sequence": [
            "engine.folds=2",
            "engine.epochs=3",
            "model.backbone=test_convnext",
            "engine.progress_bar=false",
        ],
        "ensemble": [],
    },
    # A CPU machine on a real-size dataset: small backbones, moderate inputs.
    "cpu": {
        "relevance": [],
        "multitask_cache": ["selection.neighbours=2"],
        "sequence_cache": ["size=96"],
        "sr": ["steps=1000"],
        "multitask": [
            "engine.folds=5",
            "engine.epochs=15",
            "model.backbone=resnet10t",
            "data.input.sagittal_size=128",
            "data.input.axial_size=128",
            "model.window_px=32",
            "model.upsample=sr",
            *_MULTITASK_READER,
            "engine.progress_bar=false",
        ],
        "sequence": [
            "engine.folds=5",
            "engine.epochs=15",
            "model.backbone=resnet10t",
            "engine.progress_bar=false",
        ],
        "ensemble": [],
    },
    # One or more GPUs on the real data (about 2,000 studies).
    "gpu": {
        "relevance": [],
        # Crops at the model's 256-px input (the default 128-px crops were upsampled: four
        # times the compute, no new pixels); the second pass reads windows from copies of up
        # to 512 px, the real sagittal slices' size.
        "multitask_cache": ["crop_size=256", "hires_max=512", "selection.neighbours=2"],
        "sequence_cache": ["size=128"],
        "sr": ["steps=3000", "device=cuda"],
        "multitask": [
            "engine.folds=5",
            "engine.epochs=30",
            "engine.batch_size=16",
            "engine.num_workers=8",
            # Every GPU of the node, one process each (Lightning's DDP launcher).
            "engine.devices=auto",
            "model.backbone=resnet34",
            "data.input.sagittal_size=256",
            "data.input.axial_size=256",
            "model.window_px=48",
            "model.upsample=sr",
            *_MULTITASK_READER,
            "engine.progress_bar=false",
        ],
        "sequence": [
            "engine.folds=5",
            "engine.epochs=25",
            "engine.batch_size=16",
            "engine.num_workers=8",
            # Every GPU of the node, one process each (Lightning's DDP launcher).
            "engine.devices=auto",
            "model.backbone=resnet18",
            "engine.progress_bar=false",
        ],
        "ensemble": [],
    },
}
_STAGE_KEYS = tuple(PRESETS["demo"])
# The model families a preset trains unless told (`--models`). On the learning curve's phantom
# at 40 and 100 training studies (demo scale) the sequence model scored 1.06x and 1.01x the
# weighted prior on the test studies, and the ensemble with it 1.09x and 0.95x against 1.05x
# and 0.90x for the multitask model alone (bench/bench_learning_curve.py): the demo trains
# the multitask model alone, and saves the sequence stages' time.
PRESET_MODELS: dict[str, tuple[str, ...]] = {
    "demo": ("multitask",),
    "tiny": MODELS,
    "cpu": MODELS,
    "gpu": MODELS,
}


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    preset: str
    models: list[str]
    overrides: dict[str, list[str]]  # stage -> dotted overrides (preset, then the user's)
    ensemble_folds: int = 5
    # What it was fitted on (`data_fingerprint`); None in plans written before it was recorded.
    data: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "preset": self.preset,
            "models": self.models,
            "overrides": self.overrides,
            "ensemble_folds": self.ensemble_folds,
            "data": self.data,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = PLAN_FILE) -> Plan:
        if raw.get("format") != PLAN_FORMAT:
            raise ValueError(f"{where}: plan format {raw.get('format')!r}, expected {PLAN_FORMAT}")
        return cls(
            raw["preset"],
            list(raw["models"]),
            dict(raw["overrides"]),
            int(raw.get("ensemble_folds", 5)),
            raw.get("data"),
        )

    def fingerprint(self, stage: str) -> str:
        return hashlib.sha1(json.dumps(self.overrides.get(stage, [])).encode()).hexdigest()[:12]


def make_plan(
    preset: str = "cpu", models: Sequence[str] | None = None, overrides: Sequence[str] = ()
) -> Plan:
    """The preset's per-stage overrides followed by the user's `stage.key=value` ones; the
    preset's model families (`PRESET_MODELS`) unless `models` names them."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    models = [m.strip() for m in (models or PRESET_MODELS[preset]) if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise ValueError(f"models must be among {', '.join(MODELS)}, got {list(models)}")
    per_stage = {k: list(v) for k, v in PRESETS[preset].items()}
    for item in overrides:
        stage, _, rest = item.partition(".")
        if stage not in per_stage or "=" not in rest:
            raise ValueError(
                f"override {item!r}: expected STAGE.key=value with STAGE one of "
                f"{', '.join(_STAGE_KEYS)}"
            )
        per_stage[stage].append(rest)
    return Plan(preset, [m for m in MODELS if m in models], per_stage)


def load_plan(runs_dir: str | Path) -> Plan:
    path = Path(runs_dir) / PLAN_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a runs folder made by `lsdc fit` (no {PLAN_FILE})")
    return Plan.from_dict(json.loads(path.read_text()), str(path))


def _uses_sr(plan: Plan) -> bool:
    from lsdc.config import load_config
    from lsdc.training.multitask import MultitaskTrainConfig

    if "multitask" not in plan.models:
        return False
    cfg = load_config(MultitaskTrainConfig, None, plan.overrides["multitask"])
    return cfg.model.upsample == "sr"


def _engine(plan: Plan, stage: str) -> Any:
    """The `EngineConfig` the model stage `stage` trains with."""
    from lsdc.config import load_config
    from lsdc.training.multitask import MultitaskTrainConfig
    from lsdc.training.sequence import SequenceTrainConfig

    schema = MultitaskTrainConfig if stage == "multitask" else SequenceTrainConfig
    return load_config(schema, None, plan.overrides[stage]).engine


def _processes(plan: Plan, stage: str) -> int:
    """How many processes the model stage `stage` trains with (its engine settings)."""
    from lsdc.training.engine import world_size

    return world_size(_engine(plan, stage))


def stages_of(plan: Plan) -> list[str]:
    out = ["relevance"]
    if "multitask" in plan.models:
        out += ["multitask_cache"]
    if "sequence" in plan.models:
        out += ["sequence_cache"]
    if _uses_sr(plan):
        out += ["sr"]
    return out + list(plan.models) + ["ensemble"]


def sequence_cache_overrides(plan: Plan, runs_dir: Path) -> list[str]:
    """The sequence cache's overrides with the axial window of the slice-relevance run as
    values (not a path), so the cache's settings do not depend on where the runs folder is."""
    from lsdc.preprocess.crops import AxialRoi

    roi = AxialRoi.load(runs_dir / RUN_DIRS["relevance"] / "axial_roi.json")
    window = [
        f"axial_roi.{k}={getattr(roi, k)!r}"
        for k in ("center_x", "center_y", "half_width", "half_height")
    ]
    return [*window, *plan.overrides["sequence_cache"]]


def build_cache(
    model: str,
    plan: Plan,
    data: Path,
    runs: Path,
    cache: Path,
    *,
    split: str,
    workers: int = 1,
    progress: bool = True,
    study_ids: Sequence[int] | None = None,
    executor: Executor = LOCAL,
) -> Any:
    """`model`'s cache of `split` with the plan's settings: the one place that decides how a
    family's input is made, so test studies are preprocessed exactly like training ones.
    `workers` processes of `executor` (a local pool or Dask) build it.
    -> the cache's `CacheRunReport`."""
    from lsdc.preprocess import multitask as mt_pre
    from lsdc.preprocess import sequence as seq_pre

    if model == "multitask":
        return mt_pre.preprocess_dataset(
            data,
            cache,
            split=split,
            workers=workers,
            study_ids=study_ids,
            overrides=plan.overrides["multitask_cache"],
            relevance_run=runs / RUN_DIRS["relevance"],
            progress=progress,
            executor=executor,
        )
    return seq_pre.preprocess_dataset(
        data,
        cache,
        split=split,
        workers=workers,
        study_ids=study_ids,
        overrides=sequence_cache_overrides(plan, runs),
        progress=progress,
        executor=executor,
    )


# --------------------------------------------------------------------------- quiet Lightning


class _PortableFormatter(logging.Formatter):
    """Log lines with the absolute paths of `places` written relative (`portable_text`), and
    those of the Python libraries as module paths ("lightning/pytorch/..."), so that a log in
    the runs folder names no absolute path either."""

    def __init__(self, places: dict[Path, str]) -> None:
        super().__init__("%(asctime)s %(name)s %(levelname)s %(message)s")
        import sys

        self.places = dict(places)
        # A warning names its source file. The longest path matches first, so a runs folder
        # inside a library folder is still written as itself.
        for p in sys.path:
            if os.path.isabs(p) and os.path.isdir(p):
                self.places.setdefault(Path(p), ".")

    def format(self, record: logging.LogRecord) -> str:
        return portable_text(super().format(record), self.places)


@contextlib.contextmanager
def _log_to(path: Path, places: dict[Path, str] | None = None) -> Iterator[None]:
    """Lightning's banners, tips and every Python warning go to `path`, not the terminal;
    `places` (folder -> relative path) as in `_PortableFormatter`."""
    import lightning.pytorch  # noqa: F401 - on import it adds its own terminal handler

    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(_PortableFormatter(places or {}))
    names = (
        FIT_LOGGER,
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "pytorch_lightning",
        "py.warnings",
    )
    saved = []
    for name in names:
        log = logging.getLogger(name)
        saved.append((log, list(log.handlers), log.propagate, log.level))
        log.handlers, log.propagate = [handler], False
        log.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        logging.captureWarnings(False)
        for log, handlers, propagate, level in saved:
            log.handlers, log.propagate = handlers, propagate
            log.setLevel(level)
        handler.close()


FIT_LOGGER = "lsdc.fit"


def _also_to_log(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log`, with every line also written to fit.log with a timestamp (inside `_log_to`), so
    a run on a cluster can be followed from its log."""

    def both(line: str) -> None:
        log(line)
        logging.getLogger(FIT_LOGGER).info(line)

    return both


def _log_places(data: Path, runs: Path, work: Path) -> dict[Path, str]:
    """fit.log is in the runs folder: the places Lightning's messages name are written
    relative to it (Lightning logs the resume checkpoint's path)."""
    places = {p: os.path.relpath(os.path.realpath(p), os.path.realpath(runs)) for p in (data, work)}
    return {**places, runs: "."}


@contextlib.contextmanager
def _fold_process_view(family: str, runs: Path, places: dict[Path, str]) -> Iterator[list[Any]]:
    """A fold's own process (folds side by side): Lightning's chatter to fit.log as in the
    main process, and its epoch lines printed and logged there too."""
    with _log_to(runs / LOG_FILE, places):
        yield [_epoch_printer(family, _also_to_log(functools.partial(print, flush=True)))]


def _silent(line: str) -> None:
    """The progress view of a process other than rank 0: nothing, rank 0 shows it."""


def _eta(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _epoch_printer(name: str, log: Callable[[str], None], folds: Sequence[int] = ()) -> Any:
    """A Lightning callback printing one line per finished epoch (the progress view), with the
    stage's ETA: the mean epoch time so far times the epochs left in this fold and in the
    `folds` after it."""
    from lightning.pytorch.callbacks import Callback

    class EpochLine(Callback):
        def __init__(self) -> None:
            self.t0 = time.perf_counter()
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.t0 = time.perf_counter()

        # After validation (Lightning 2 validates inside the training epoch), so every
        # epoch metric is there.
        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            m = trainer.callback_metrics
            parts = [
                f"{k} {float(m[k]):.4f}" for k in ("train_loss", "val_loss", "val_score") if k in m
            ]
            self.seconds.append(time.perf_counter() - self.t0)
            fold = Path(trainer.default_root_dir).name
            digits = fold.removeprefix("fold")
            after = [k for k in folds if k > int(digits)] if digits.isdigit() else []
            left = trainer.max_epochs - trainer.current_epoch - 1 + len(after) * trainer.max_epochs
            eta = f", {name} ETA {_eta(left * float(np.mean(self.seconds)))}" if left else ""
            log(
                f"  {name} {fold} epoch "
                f"{trainer.current_epoch + 1}/{trainer.max_epochs}: {', '.join(parts)} "
                f"({self.seconds[-1]:.0f} s{eta})"
            )

    return EpochLine()


# --------------------------------------------------------------------------- fit


@dataclass
class FitReport:
    runs_dir: Path
    seconds: dict[str, float] = field(default_factory=dict)
    oof: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> OOF score
    ensemble: dict[str, Any] = field(default_factory=dict)  # EnsembleReport.to_dict()


def data_fingerprint(data: Path) -> dict[str, Any]:
    """What a fit's training data is, cheaply: each training table's SHA-256 and which of the
    studies the tables name have a folder (a stray unlisted, unlabelled folder trains nothing).
    Files inside a study are left to the caches' own fingerprints, which rebuild a study whose
    files changed."""
    import csv

    tables, named = {}, set()
    for name in ("train.csv", "train_label_coordinates.csv", "train_series_descriptions.csv"):
        path = data / name
        if path.is_file():
            blob = path.read_bytes()
            tables[name] = hashlib.sha256(blob).hexdigest()[:16]
            rows = csv.DictReader(blob.decode("utf-8-sig", errors="replace").splitlines())
            named |= {str(r.get("study_id", "")).strip() for r in rows}
    images = data / "train_images"
    on_disk = {p.name for p in images.iterdir() if p.is_dir()} if images.is_dir() else set()
    studies = sorted(on_disk & named)
    return {
        "tables": tables,
        "studies": len(studies),
        "study_list": hashlib.sha256("\n".join(studies).encode()).hexdigest()[:16],
    }


def _data_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for name in sorted(set(old.get("tables", {})) | set(new.get("tables", {}))):
        a, b = old.get("tables", {}).get(name), new.get("tables", {}).get(name)
        if a != b:
            out.append(f"{name} {'differs' if a and b else 'added' if b else 'missing'}")
    if old.get("study_list") != new.get("study_list"):
        out.append(f"study folders: {old.get('studies')} then, {new.get('studies')} now")
    return out


def hold_runs(runs: Path) -> contextlib.AbstractContextManager[None]:
    """The lock of one writer per runs folder, which `fit` holds for its whole run: a second fit
    of the same folder fails at once, naming the holder's pid (two fits writing one folder left
    it unable to predict, its stages made with different relevance runs)."""
    return exclusive_lock(
        runs / LOCK_FILE,
        f"{runs}: another lsdc fit (pid {{pid}}) is writing this runs folder; wait for it or "
        "use another --out",
    )


def check_data(data: Path, split: str, *, labels: bool, descriptions: bool = True) -> None:
    """Stop a command before any work on what would stop it later, with one line naming the
    folder or the file, line, column and value: the data folder and its `<split>_images`
    folder must exist, and every table the command reads is read whole by its `io.tables`
    reader (every row, column and value; a bad cell found after an hour of training costs the
    hour). `labels`: train.csv and train_label_coordinates.csv too. The descriptions table is
    required with `descriptions`, else read when present (the multitask pipeline can type
    series from their headers). One study's missing folder is not checked: that study is
    degraded and reported, the others are predicted."""
    from lsdc.io.tables import read_coordinates, read_series_descriptions, read_train_labels

    if not data.is_dir():
        raise FileNotFoundError(f"{data}: no such data folder")
    table = data / f"{split}_series_descriptions.csv"
    if descriptions or table.exists():
        read_series_descriptions(table)
    if labels:
        read_train_labels(data / "train.csv")
        read_coordinates(data / "train_label_coordinates.csv")
    images = data / f"{split}_images"
    if not images.is_dir():
        raise FileNotFoundError(
            f"{images}: no such folder; the {split} studies' DICOM files belong there "
            "(<study>/<series>/<instance>.dcm)"
        )


def _check_plan(runs: Path, plan: Plan) -> None:
    """A runs folder keeps one plan and one dataset: refuse other settings for stages already
    started, or other training data once any stage started."""
    path = runs / PLAN_FILE
    if not path.exists():
        return
    old = Plan.from_dict(json.loads(path.read_text()), str(path))
    started = (
        set(json.loads((runs / FIT_FILE).read_text()).get("started", []))
        if (runs / FIT_FILE).exists()
        else set()
    )
    differ = [s for s in STAGES if s in started and old.fingerprint(s) != plan.fingerprint(s)]
    if differ:
        raise ValueError(
            f"{runs}: fitted with other settings for {', '.join(differ)} (see {path}); use "
            "another --out folder, or the same preset and overrides to resume"
        )
    if started and old.data is not None and plan.data is not None:
        changed = _data_differences(old.data, plan.data)
        if changed:
            raise ValueError(
                f"{runs}: fitted on other training data ({'; '.join(changed)}; see {path}); "
                "use another --out folder, or the same data to resume"
            )


def fit(
    data_dir: str | Path,
    runs_dir: str | Path,
    *,
    preset: str = "cpu",
    models: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    work_dir: str | Path | None = None,
    workers: int = 1,
    log: Callable[[str], None] = print,
    progress: bool = True,
    executor: Executor = LOCAL,
) -> FitReport:
    """Train every stage on `data_dir` into `runs_dir` (resuming what is done); writes
    plan.json, fit.json (per-stage seconds and scores) and fit.log (library chatter).
    The model caches are built by `workers` processes of `executor` (a local pool or Dask);
    slice relevance (features, CV folds) runs in a local pool of `workers`.

    Before any work: the runs and work folders must lie outside the data folder, the data must
    pass `check_data`, and the runs folder's lock (`hold_runs`) is taken for the whole run, so a
    second fit of the same folder fails at once. Interrupted (`lsdc.interrupt`), it names the
    stage it stopped in."""
    from lsdc.training.engine import is_global_zero

    if "TORCHELASTIC_RUN_ID" in os.environ:  # torch's own sign of a torchrun process
        raise ValueError(
            "lsdc fit runs its other processes itself (STAGE.engine.devices=N, one node); "
            "under torchrun, train with `lsdc train multitask|sequence` instead"
        )
    data, runs = Path(data_dir), Path(runs_dir)
    work = Path(work_dir) if work_dir is not None else runs / "cache"
    plan = make_plan(preset, models, overrides)
    plan.data = data_fingerprint(data)
    run_stages = functools.partial(
        _fit_stages, data, runs, work, plan, workers=workers, progress=progress, executor=executor
    )
    # The processes Lightning starts for a model stage on several devices run this again while
    # rank 0, which checked the inputs, holds the lock: they join that stage and write nothing.
    if not is_global_zero():
        return run_stages(writer=False, log=_silent)
    for folder in (runs, work):
        check_output_folder(folder, [("data folder", data)])
    check_data(data, "train", labels=True, descriptions="sequence" in plan.models)
    ensure_writable(runs)
    with hold_runs(runs):
        _check_plan(runs, plan)
        atomic_write_json(runs / PLAN_FILE, plan.to_dict())
        return run_stages(writer=True, log=_also_to_log(log))


@dataclass
class FitContext:
    """What every stage of a fit reads: the folders, the plan, how to run, where to report."""

    data: Path
    runs: Path
    work: Path
    plan: Plan
    workers: int
    progress: bool
    executor: Executor
    log: Callable[[str], None]
    report: FitReport

    def run_dir(self, stage: str) -> Path:
        return self.runs / RUN_DIRS[stage]


def stage_relevance(ctx: FitContext) -> None:
    """Slice relevance: the models that find each condition's slice (skipped when done)."""
    from lsdc.preprocess.slice_relevance import train_slice_relevance

    if not (ctx.run_dir("relevance") / "report.md").exists():
        train_slice_relevance(
            ctx.data,
            ctx.run_dir("relevance"),
            workers=ctx.workers,
            overrides=ctx.plan.overrides["relevance"],
            progress=ctx.progress,
        )


def stage_cache(ctx: FitContext, model: str) -> None:
    """`model`'s training cache (resumed study by study; changed studies rebuilt)."""
    stage = f"{model}_cache"
    rep = build_cache(
        model,
        ctx.plan,
        ctx.data,
        ctx.runs,
        ctx.work / f"{model}-train",
        split="train",
        workers=ctx.workers,
        progress=ctx.progress,
        executor=ctx.executor,
    )
    if rep.failed:
        ctx.log(f"  {len(rep.failed)} studies failed ({stage}); listed in its errors.jsonl")
    if rep.warnings:
        ctx.log(f"  {len(rep.warnings)} studies degraded ({stage}); listed in its warnings.jsonl")
    if rep.left_out:
        shown = ", ".join(f"{s} ({why})" for s, why in list(rep.left_out.items())[:3])
        more = f" and {len(rep.left_out) - 3} more" if len(rep.left_out) > 3 else ""
        ctx.log(f"  {len(rep.left_out)} studies left out ({stage}): {shown}{more}")


def stage_sr(ctx: FitContext) -> None:
    """Super-resolution of the multitask windows (skipped when done)."""
    from lsdc.training.superres import train_sr

    if not (ctx.run_dir("sr") / "report.json").exists():
        r = train_sr(
            ctx.work / "multitask-train", ctx.run_dir("sr"), overrides=ctx.plan.overrides["sr"]
        )
        ctx.log(f"  SR PSNR {r.psnr_sr:.2f} dB vs bicubic {r.psnr_bicubic:.2f} dB")


def stage_model(ctx: FitContext, family: str) -> None:
    """One model family on every fold (each fold resumed), with one line per epoch."""
    from lsdc.training.multitask import train_multitask
    from lsdc.training.sequence import train_sequence

    engine = _engine(ctx.plan, family)
    folds = engine.train_folds if engine.train_folds is not None else range(engine.folds)
    cb = [_epoch_printer(family, ctx.log, list(folds))]
    # On CPU the folds train side by side, `workers` at a time (the engine decides).
    side = {
        "fold_workers": ctx.workers,
        "fold_context": functools.partial(
            _fold_process_view, family, ctx.runs, _log_places(ctx.data, ctx.runs, ctx.work)
        ),
    }
    if family == "multitask":
        # Relative to the run folder, so the runs folder can move.
        extra = [f"sr_run=../{RUN_DIRS['sr']}"] if "sr" in stages_of(ctx.plan) else []
        result = train_multitask(
            ctx.work / "multitask-train",
            ctx.run_dir(family),
            overrides=[*ctx.plan.overrides[family], *extra],
            callbacks=cb,
            **side,
        )
    else:
        result = train_sequence(
            ctx.work / "sequence-train",
            ctx.run_dir(family),
            overrides=ctx.plan.overrides[family],
            callbacks=cb,
            **side,
        )
    ctx.report.oof[family] = result.score
    ctx.log(
        f"  {family} OOF {result.score['score']:.4f} (weighted prior "
        f"{result.weighted_prior_score['score']:.4f}, class prior "
        f"{result.prior_score['score']:.4f})"
    )


def stage_ensemble(ctx: FitContext) -> None:
    """Per-group weights and calibration over the families' OOF predictions."""
    from lsdc.inference.ensemble import POOL, fit_ensemble, save_ensemble

    runs = {m: ctx.run_dir(m) for m in ctx.plan.models}
    ens, rep = fit_ensemble(runs, folds=ctx.plan.ensemble_folds)
    ctx.report.ensemble = rep.to_dict()
    save_ensemble(ens, ctx.runs / ENSEMBLE_FILE, ctx.report.ensemble)
    kept = "the pool" if rep.chosen == POOL else f"{rep.chosen} alone"
    ctx.log(
        f"  ensemble OOF {rep.score['score']:.4f} (cross-fitted; kept {kept}; class prior "
        f"{rep.class_prior['score']:.4f}; "
        + ", ".join(f"{m} {s['score']:.4f}" for m, s in rep.models.items())
        + ")"
    )


# Stage name -> its unit, in STAGES order; `fit` runs those of `stages_of(plan)`.
STAGE_ACTIONS: dict[str, Callable[[FitContext], None]] = {
    "relevance": stage_relevance,
    "multitask_cache": functools.partial(stage_cache, model="multitask"),
    "sequence_cache": functools.partial(stage_cache, model="sequence"),
    "sr": stage_sr,
    "multitask": functools.partial(stage_model, family="multitask"),
    "sequence": functools.partial(stage_model, family="sequence"),
    "ensemble": stage_ensemble,
}


def _fit_stages(
    data: Path,
    runs: Path,
    work: Path,
    plan: Plan,
    *,
    writer: bool,
    workers: int,
    log: Callable[[str], None],
    progress: bool,
    executor: Executor,
) -> FitReport:
    """`fit`'s stages in order, each resumed, with their times and scores in fit.json;
    `writer`: this process writes the runs folder (the others join the stages that train on
    several devices)."""
    report = FitReport(runs)
    ctx = FitContext(data, runs, work, plan, workers, progress, executor, log, report)
    state: dict[str, Any] = {"started": [], "seconds": {}}
    if (runs / FIT_FILE).exists():
        state = {**state, **json.loads((runs / FIT_FILE).read_text())}
    stages = stages_of(plan)
    with _log_to(runs / LOG_FILE, _log_places(data, runs, work)):
        for i, stage in enumerate(stages, 1):
            if not writer:
                # Rank 0 did every earlier stage before it started this process.
                if stage in MODELS and _processes(plan, stage) > 1:
                    STAGE_ACTIONS[stage](ctx)
                continue
            log(f"[lsdc fit] {i}/{len(stages)} {stage}")
            if stage not in state["started"]:
                state["started"].append(stage)
            atomic_write_json(runs / FIT_FILE, state)
            t0 = time.perf_counter()
            try:
                STAGE_ACTIONS[stage](ctx)
            except Interrupted as exc:
                raise Interrupted(
                    f"interrupted during stage {stage}; run the same command to resume"
                ) from exc
            report.seconds[stage] = round(time.perf_counter() - t0, 1)
            state["seconds"][stage] = report.seconds[stage]
            log(f"[lsdc fit] {stage} done in {report.seconds[stage]:.0f} s")
            state.update(oof=report.oof, ensemble=report.ensemble)
            atomic_write_json(runs / FIT_FILE, state)
    return report


# --------------------------------------------------------------------------- rehearsal

# What a rehearsal shrinks, per stage: sizes, epochs and steps, never a code path.
_REHEARSAL_SIZES = {
    "relevance": ["folds=2"],
    "multitask_cache": ["crop_size=64", "hires_max=128"],
    "sequence_cache": ["size=32"],
    "sr": ["steps=5", "device=cpu"],
    "multitask": ["data.input.sagittal_size=64", "data.input.axial_size=64", "model.window_px=16"],
    "sequence": [],
    "ensemble": [],
}
REHEARSAL_PROCESSES = 2
REHEARSAL_WORKERS = 2


@dataclass
class Rehearsal:
    """A plan's rehearsal: the overrides appended to it, and what it exercises or cannot."""

    overrides: list[str]
    exercised: list[str]
    not_exercised: list[str]


def rehearsal(plan: Plan) -> Rehearsal:
    """The overrides that run `plan`'s own code paths on the CPU at a tiny size: the same loader
    settings (persistent workers, at most 2), mixed precision (bf16 autocast on the CPU) where
    the preset would autocast on a GPU, several processes over gloo where it would use several
    devices, every stage; only sizes, epochs, folds and steps shrink."""
    out, did = [], []
    for stage in plan.overrides:
        out += [f"{stage}.{o}" for o in _REHEARSAL_SIZES.get(stage, [])]
    for stage in (m for m in MODELS if m in plan.models):
        engine = _engine(plan, stage)
        several = str(engine.devices) in ("auto", "-1") or int(engine.devices) > 1
        workers = min(int(engine.num_workers), REHEARSAL_WORKERS)
        mixed = engine.precision == "auto" or "mixed" in str(engine.precision)
        out += [
            f"{stage}.engine.epochs=1",
            f"{stage}.engine.folds=2",
            f"{stage}.engine.train_folds=null",
            f"{stage}.engine.batch_size=2",
            f"{stage}.engine.num_workers={workers}",
            f"{stage}.engine.accelerator=cpu",
            f"{stage}.engine.precision={'bf16-mixed' if mixed else engine.precision}",
        ]
        if several:
            out += [
                f"{stage}.engine.devices={REHEARSAL_PROCESSES}",
                f"{stage}.engine.num_nodes=1",
                f"{stage}.engine.strategy=ddp",
            ]
        loaders = f"{workers} persistent loader workers" if workers else "no loader workers"
        did.append(
            f"{stage}: {loaders}"
            + (f" (the preset's {engine.num_workers})" if workers != engine.num_workers else "")
            + (", bf16 autocast" if mixed else f", precision {engine.precision}")
            + ", channels-last weights"
            + (
                f", {REHEARSAL_PROCESSES} processes over gloo (the preset: devices="
                f"{engine.devices}, NCCL on GPUs)"
                if several
                else ", one process"
            )
        )
    did.append(
        "predict: bf16 autocast, the fold models' loader with workers, flip TTA, the ensemble"
    )
    return Rehearsal(
        out,
        did,
        [
            "CUDA kernels and NCCL (no GPU here)",
            "pinned memory and non-blocking copies (they need a GPU)",
            "the preset's sizes, epochs and folds (shrunk: input 64 px, 1 epoch, 2 folds)",
        ],
    )


@dataclass
class RehearsalReport:
    fit: FitReport
    predict: PredictReport | None  # None in the extra processes of a multi-process stage
    rehearsal: Rehearsal


def rehearse(
    data_dir: str | Path,
    runs_dir: str | Path,
    *,
    preset: str = "gpu",
    models: Sequence[str] | None = None,
    overrides: Sequence[str] = (),
    workers: int = REHEARSAL_WORKERS,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> RehearsalReport:
    """`fit` with `rehearsal`'s overrides into `runs_dir`, then `predict` the data's test
    studies through the same paths (`RUNS/rehearsal-submission.csv`), and say what was run: a
    configuration tried on a laptop before renting a GPU."""
    from lsdc.training.engine import is_global_zero

    plan = make_plan(preset, models, overrides)
    rehearsed = rehearsal(plan)
    runs = Path(runs_dir)
    fitted = fit(
        data_dir,
        runs,
        preset=preset,
        models=plan.models,
        overrides=[*overrides, *rehearsed.overrides],
        workers=workers,
        log=log,
        progress=progress,
    )
    if not is_global_zero():
        return RehearsalReport(fitted, None, rehearsed)
    out = runs / "rehearsal-submission.csv"
    for path in predict_outputs(out):  # a rehearsal's own, from an earlier run of it
        path.unlink(missing_ok=True)
    predicted = predict(
        data_dir,
        runs,
        out,
        workers=workers,
        device="cpu",
        amp=True,
        batch_size=2,
        log=log,
        progress=progress,
    )
    log(f"[lsdc fit --rehearse] {preset}: every stage ran, and predict wrote {predicted.path}")
    for line in rehearsed.exercised:
        log(f"  exercised: {line}")
    for line in rehearsed.not_exercised:
        log(f"  not exercised: {line}")
    return RehearsalReport(fitted, predicted, rehearsed)


# --------------------------------------------------------------------------- predict


@dataclass
class PredictReport:
    path: Path
    studies: int  # rows / 25
    seen_by: dict[str, int]  # model -> studies it predicted
    prior_only: list[int]  # studies no model could see (weighted prior)
    warnings_path: Path
    warnings: list[dict[str, Any]]
    study_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 25, 3)))  # as written
    # Each model's own fold-mean probabilities (uncalibrated), NaN where it could not see the
    # study: what the model says alone, beside the pool.
    model_probs: dict[str, np.ndarray] = field(default_factory=dict)
    coordinates: Path | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def predict_outputs(out_csv: str | Path) -> tuple[Path, Path, Path]:
    """The files `predict` writes: the submission, and beside it `<stem>_warnings.csv` and
    `<stem>_coordinates.csv` (the predicted keypoints)."""
    return Path(out_csv), sibling_csv(out_csv, "warnings"), sibling_csv(out_csv, "coordinates")


def input_problems(data: Path, split: str) -> tuple[list[int], dict[int, list[str]]]:
    """(every study the split's descriptions list, study -> what its input lacks: a series
    type not listed, a listed series whose folder is missing or holds no file)."""
    from lsdc.constants import SERIES_TYPES
    from lsdc.io.dicom import series_files
    from lsdc.io.tables import read_series_descriptions

    desc = read_series_descriptions(data / f"{split}_series_descriptions.csv")
    problems: dict[int, list[str]] = {}
    for sid, rows in desc.groupby("study_id"):
        found = problems.setdefault(int(sid), [])
        types = set(rows["series_description"])
        found += [f"no {t} series listed" for t in SERIES_TYPES if t not in types]
        for ser, text in rows[["series_id", "series_description"]].itertuples(index=False):
            folder = data / f"{split}_images" / str(sid) / str(ser)
            if not folder.is_dir():
                found.append(f"{text} series {ser}: folder {folder} missing")
            elif not series_files(folder):  # files are DICOM by content, not by name
                found.append(f"{text} series {ser}: no file in {folder}")
    return sorted(problems), {k: v for k, v in problems.items() if v}


def predict(
    data_dir: str | Path,
    runs_dir: str | Path,
    out_csv: str | Path,
    *,
    split: str = "test",
    work_dir: str | Path | None = None,
    workers: int = 1,
    tta_flip: bool = True,
    device: str = "auto",
    amp: bool | None = None,
    batch_size: int = 8,
    log: Callable[[str], None] = print,
    progress: bool = True,
    executor: Executor = LOCAL,
) -> PredictReport:
    """Raw DICOM folders -> a complete, valid submission at `out_csv`.

    Every study listed in `<split>_series_descriptions.csv` gets its 25 rows: from the models
    that could see it, else the weighted prior. Each study a model could not see is written, with
    why, to `<out stem>_warnings.csv`. The caches live in `work_dir` (kept and reused when
    given; a temporary folder otherwise), built by `workers` processes of `executor`; on a
    Dask cluster `work_dir` must be a folder every worker sees at the same path. The models
    run on `device` ("auto": CUDA when present, with autocast; `amp` forces it on or off) in
    batches of `batch_size`, fed by `workers` loader processes when `workers` > 1. Refused
    before any work: an output over an existing file of the data, runs or work folder, the data
    failing `check_data`, a runs folder a fit is writing now."""
    from lsdc.inference.ensemble import load_ensemble
    from lsdc.inference.predictor import Predictor, coordinates_table
    from lsdc.inference.submission import (
        build_submission,
        validate_submission_file,
        write_submission,
    )

    data, runs, out = Path(data_dir), Path(runs_dir), Path(out_csv)
    if executor.scheduler is not None and work_dir is None:
        raise ValueError(
            "with a Dask scheduler, give a work folder (--work) that every worker sees at the "
            "same path: the default is a temporary folder on this machine"
        )
    # Before any work: no output over an input, every input there and well formed, no fit
    # writing the runs folder now.
    inputs = [("data folder", data), ("runs folder", runs), ("work folder", work_dir)]
    for path in predict_outputs(out):
        check_output_file(path, inputs, beside=out if path != out else None)
    if work_dir is not None:
        check_output_folder(work_dir, [("data folder", data)])
    check_data(data, split, labels=False)
    check_unlocked(
        runs / LOCK_FILE,
        f"{runs}: an lsdc fit (pid {{pid}}) is writing this runs folder; wait for it to end "
        "before predicting",
    )
    ensure_writable(out.parent if str(out.parent) else Path("."))
    plan = load_plan(runs)
    if not (runs / ENSEMBLE_FILE).is_file():
        raise FileNotFoundError(
            f"{runs / ENSEMBLE_FILE}: no ensemble in this runs folder (lsdc fit stopped before "
            "its ensemble stage; run the same lsdc fit again to finish it)"
        )
    ens = load_ensemble(runs / ENSEMBLE_FILE)
    # Every model's weights are loaded before any preprocessing, so a damaged or missing
    # weights file is named at once, not after minutes of work.
    predictors = {
        name: Predictor.from_run(run, device=device, tta_flip=tta_flip, calibrate=False, amp=amp)
        for name, run in zip(ens.models, ens.run_dirs(runs), strict=True)
    }
    listed, lacking = input_problems(data, split)
    report_warnings = [
        {"study_id": sid, "model": "input", "problem": p}
        for sid, found in lacking.items()
        for p in found
    ]
    seconds: dict[str, float] = {}
    with contextlib.ExitStack() as stack:
        work = work_folder(stack, work_dir, "lsdc-predict-")
        probs, available, coords = [], [], None
        for name in ens.models:
            t0 = time.perf_counter()
            cache = work / f"{name}-{split}"
            log(f"[lsdc predict] {name}: preprocessing {len(listed)} studies")
            rep = build_cache(
                name,
                plan,
                data,
                runs,
                cache,
                split=split,
                workers=workers,
                progress=progress,
                study_ids=listed,
                executor=executor,
            )
            for sid, err in sorted(rep.failed.items()):
                report_warnings.append({"study_id": sid, "model": name, "problem": err})
            cached = [s for s in listed if s not in rep.failed and (cache / f"{s}.npz").exists()]
            for sid in cached:
                meta = load_npz_meta(cache / f"{sid}.npz")
                for err in meta.get("warnings", meta.get("series_errors", [])):
                    report_warnings.append({"study_id": sid, "model": name, "problem": err})
            seconds[f"{name} preprocess"] = round(time.perf_counter() - t0, 1)
            t0 = time.perf_counter()
            log(f"[lsdc predict] {name}: predicting")
            predictor = predictors[name]
            p = np.full((len(listed), 25, 3), np.nan)
            seen = np.zeros(len(listed), bool)
            if cached:
                preds = predictor.predict_cache(
                    cache, cached, batch_size=batch_size, num_workers=workers if workers > 1 else 0
                )
                pos = {s: i for i, s in enumerate(listed)}
                rows = [pos[int(s)] for s in preds.study_ids]
                p[rows], seen[rows] = preds.probs, True
                if preds.keypoints is not None:
                    coords = coordinates_table(cache, preds)
            probs.append(p)
            available.append(seen)
            seconds[f"{name} inference"] = round(time.perf_counter() - t0, 1)
        avail = np.stack(available, axis=1)
        pooled = ens.combine(probs, avail)
    prior_only = [s for s, a in zip(listed, avail.any(axis=1), strict=True) if not a]
    for s in prior_only:
        report_warnings.append(
            {"study_id": s, "model": "all", "problem": "given the weighted prior"}
        )
    path = write_submission(build_submission(listed, pooled), out)
    _, warnings_path, coords_path = predict_outputs(out)
    import pandas as pd

    table = pd.DataFrame(report_warnings, columns=["study_id", "model", "problem"])
    atomic_write_text(warnings_path, table.to_csv(index=False))
    if coords is not None:
        atomic_write_text(coords_path, coords.to_csv(index=False))
    problems = validate_submission_file(path, data / f"{split}_series_descriptions.csv")
    if problems:  # a bug in lsdc, never the user's input: every listed study has its rows
        raise RuntimeError(f"{path}: the submission fails validation: {problems[:3]}")
    seen_by = {n: int(a.sum()) for n, a in zip(ens.models, available, strict=True)}
    return PredictReport(
        path=Path(path),
        studies=len(listed),
        seen_by=seen_by,
        prior_only=prior_only,
        warnings_path=warnings_path,
        warnings=report_warnings,
        study_ids=np.asarray(listed, np.int64),
        probs=pooled,
        model_probs=dict(zip(ens.models, probs, strict=True)),
        coordinates=coords_path if coords is not None else None,
        seconds=seconds,
    )
