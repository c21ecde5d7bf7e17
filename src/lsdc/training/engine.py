"""The one training engine (Lightning), shared by every model family.

A model family hands over a `TrainTask`: study ids and labels, a model builder (registry name and
keyword config), a dataset factory and collate function, and optionally its own loss. The
engine does the rest, identically for every family:

run folder
  config.yaml          the resolved configuration of the task (written by the caller)
  run.json             task name, model name and kwargs, folds, cache: what inference needs
  folds.csv            study-wise stratified folds
  fold<k>/checkpoints/ last.ckpt (resume) and best.ckpt (lowest val_loss), Lightning format,
                       loadable with weights_only=True
  fold<k>/model.safetensors  the kept weights of the fold (`keep`; what `Predictor` loads),
                       with its SHA-256 in model.safetensors.sha256 (checked at load)
  fold<k>/history.json per-epoch train/val loss, val score, learning rate
  fold<k>/result.json  written last: the fold is complete (a rerun skips it)
  oof.csv, oof.npz     out-of-fold probabilities as a submission table / arrays
  summary.json         OOF score with its four terms, the class-prior score on the same rows,
                       and the OOF score calibrated by cross-fitting (`calibrate`)
  calibration.json     temperature and any-severe scale fitted on the OOF (`Predictor` applies it)
  curves.png           training curves of every fold

An interrupted run resumes: finished folds are skipped, an unfinished fold continues from its
`last.ckpt` (model, optimiser, scheduler and loop state).

Folds side by side (`FoldProcesses`): on CPU, with one training process per fold, the folds
left train at the same time, each in a process of its own with its share of the cores. The small
convolutions of the CPU presets gain less from a second thread than from a second fold (one fold
on two threads kept 1.7 cores busy, yet two folds side by side on one thread each took 0.88x its
time: bench/bench_folds.py).

Several processes (`engine.devices`, `engine.num_nodes`, `engine.strategy`; Lightning's DDP, started
by Lightning itself, torchrun or SLURM): every process runs this code, only global rank 0 writes the
run folder, which must be on a file system all nodes share. Validation and the OOF prediction are
split across processes by Lightning's distributed samplers; their rows are gathered, the studies the
validation sampler repeats to even out the shares are dropped, and the rest put back in the
validation studies' order, so the OOF equals that of one process (up to floating-point noise).

Model contract: `model(batch) -> {"logits": (B, 25, 3), ...}`; batches are dicts holding at
least `labels` (B, 25) int (-1 = unlabelled) and `study_id` (B,).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lsdc.constants import SEVERITIES, TARGETS
from lsdc.fileio import atomic_write_json, atomic_write_text, save_npz
from lsdc.parallel import loader_context
from lsdc.training.folds import FOLDS_FILE, load_folds, make_folds, save_folds
from lsdc.training.losses import LossConfig, metric_loss

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.safetensors"
CHANNELS_LAST = torch.channels_last

LossFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class EngineConfig:
    epochs: int = 10
    batch_size: int = 8
    folds: int = 5
    # Train only these folds (None = all); OOF covers the trained folds' validation studies.
    train_folds: list[int] | None = None
    seed: int = 42
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_frac: float = 0.1  # linear warm-up share of all steps, then cosine decay to 0
    grad_clip: float = 1.0
    accumulate_grad_batches: int = 1
    num_workers: int = 0
    accelerator: str = "auto"  # auto | cpu | gpu
    # Processes per node ("auto": every GPU, one process on CPU), nodes, Lightning strategy
    # ("ddp" for several processes; "auto" picks it when devices > 1). Under torchrun or srun
    # they must match the launched processes.
    devices: int | str = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"  # auto: bf16-mixed (or 16-mixed) on GPU, 32-true on CPU
    # BatchNorm statistics over every process's batch, not each process's own (torch's
    # SyncBatchNorm: GPUs only); worth it when a process's batch is small.
    sync_batchnorm: bool = False
    # torch.compile the model in place (nn.Module.compile: the weights keep their names, so
    # checkpoints and saved weights are the same as without). Tested on CPU (inductor, gcc).
    compile: bool = False
    progress_bar: bool = True
    # Which weights a fold keeps (and predicts its OOF with): "last" = the final epoch (an
    # unbiased OOF for a fixed schedule, the default); "best" = the epoch of lowest val_loss,
    # chosen on the fold's own validation studies, so its OOF flatters the model.
    keep: str = "last"
    # Fit a temperature and an any-severe scale on the OOF predictions (`calibration.json`,
    # applied by `Predictor`); summary.json reports the OOF score calibrated by cross-fitting.
    calibrate: bool = True
    # Predict the OOF as `lsdc predict` predicts new studies: the mean of each study and its
    # left/right mirror (when the family has one), so that the calibration and the ensemble
    # are fitted on what they are applied to.
    oof_tta_flip: bool = True
    # Weight averaging: an exponential moving average of the weights with this time constant
    # in epochs (0 = off). Validation, the checkpoints and the kept weights are the average's.
    ema_epochs: float = 0.0
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class TrainTask:
    """What a model family gives the engine."""

    name: str  # e.g. "sequence"; stored in run.json so inference knows the family
    model_name: str  # registry name
    model_kwargs: dict[str, Any]
    study_ids: list[int]
    labels: np.ndarray  # (n, 25) int, -1 = unlabelled, aligned with study_ids
    make_dataset: Callable[[list[int], bool], Dataset]  # (study ids, train?) -> dataset
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    loss_fn: LossFn | None = None  # default: metric_loss on outputs["logits"]
    extra: dict[str, Any] = field(default_factory=dict)  # stored in run.json (e.g. cache path)
    # Further model outputs kept with the OOF predictions (e.g. "keypoints"): float arrays
    # (B, ...) per batch, saved in oof.npz as `out_<name>` and returned in CVResult.outputs.
    oof_outputs: tuple[str, ...] = ()
    # Called on a fresh model with the labels (n_train, 25) of the fold's training studies
    # (e.g. to start the output at their class prior); never sees validation labels.
    init_model: Callable[[nn.Module, np.ndarray], None] | None = None
    # The batch of the left/right-mirrored patients (targets map back with `mirror_targets`);
    # the OOF is predicted on both views with `EngineConfig.oof_tta_flip`.
    mirror_batch: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None


@dataclass
class CVResult:
    run_dir: Path
    study_ids: np.ndarray  # (n,) studies with OOF predictions
    probs: np.ndarray  # (n, 25, 3)
    labels: np.ndarray  # (n, 25)
    score: dict[str, float]
    prior_score: dict[str, float]
    fold_seconds: dict[int, float]
    epoch_seconds: float  # mean wall time of one training epoch (train + validation)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)  # TrainTask.oof_outputs
    # The metric-optimal constant of each fold's training rows on the same rows: the bar.
    weighted_prior_score: dict[str, float] = field(default_factory=dict)
    # OOF score after calibration fitted on the other folds (None: not calibrated)
    calibrated_score: dict[str, float] | None = None


# Entered in a fold's process around its training, giving the fold's Lightning callbacks (a
# progress line, the log file).
FoldContext = Callable[[], contextlib.AbstractContextManager[Sequence[Any]]]


@dataclass
class FoldProcesses:
    """How to train the folds left in up to `workers` processes at once. Everything here
    travels by pickle (module-level functions or `functools.partial`s of them)."""

    workers: int
    task: Callable[[], TrainTask]  # builds the same task in the fold's process
    context: FoldContext | None = None  # None: no callbacks there


# --------------------------------------------------------------------------- Lightning module


def _lightning():
    import lightning as L

    return L


def build_lit_module(
    model: nn.Module,
    cfg: EngineConfig,
    loss_fn: LossFn | None,
    outputs: Sequence[str] = (),
    mirror: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> Any:
    """A LightningModule around `model` (created lazily so importing this module stays light)."""
    from lsdc.data.sequence import mirror_targets

    L = _lightning()

    class LitModel(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self._val: list[dict[str, np.ndarray]] = []

        def _loss(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]):
            if loss_fn is not None:
                return loss_fn(out, batch)
            return metric_loss(out["logits"], batch["labels"], cfg.loss)

        def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return self.model(batch)

        def on_train_epoch_start(self) -> None:
            # New random augmentation each epoch, reproducibly.
            ds = self.trainer.train_dataloader.dataset
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(self.current_epoch)

        def training_step(self, batch, batch_idx):
            losses = self._loss(self.model(batch), batch)
            bs = batch["labels"].shape[0]
            # sync_dist: the mean over every process (a no-op on one), so that the history
            # and the checkpoint's val_loss are the same number on every rank.
            self.log(
                "train_loss",
                losses["loss"],
                on_step=False,
                on_epoch=True,
                batch_size=bs,
                sync_dist=True,
            )
            return losses["loss"]

        def validation_step(self, batch, batch_idx):
            out = self.model(batch)
            losses = self._loss(out, batch)
            bs = batch["labels"].shape[0]
            # Under DDP this counts the few studies the sampler repeats (fewer than the number
            # of processes) twice; val_score below does not.
            self.log(
                "val_loss",
                losses["loss"],
                on_epoch=True,
                batch_size=bs,
                prog_bar=True,
                sync_dist=True,
            )
            probs = out["logits"].float().softmax(-1)
            self._val.append(
                {
                    "study_id": batch["study_id"].detach().cpu().numpy(),
                    "probs": probs.detach().cpu().numpy(),
                    "labels": batch["labels"].detach().cpu().numpy(),
                }
            )

        def on_validation_epoch_end(self) -> None:
            # The whole validation set, each study once, whatever the number of processes.
            batches, self._val = gather_rows(self._val), []
            if not batches:
                return
            rows = merge_rows(batches)
            score = _safe_score(rows["labels"], rows["probs"])["score"]
            # Already the same on every rank; sync_dist only spares Lightning's warning.
            self.log("val_score", score, prog_bar=True, sync_dist=True)

        def predict_step(self, batch, batch_idx):
            out = self.model(batch)
            probs = out["logits"].float().softmax(-1)
            if mirror is not None and cfg.oof_tta_flip:
                flipped = self.model(mirror(batch))["logits"].float().softmax(-1)
                probs = 0.5 * (probs + mirror_targets(flipped, dim=1))
            return {
                "study_id": batch["study_id"].cpu().numpy(),
                "probs": probs.cpu().numpy(),
                **{f"out_{k}": out[k].float().cpu().numpy() for k in outputs},
            }

        def configure_optimizers(self):
            decay, no_decay = [], []
            for name, p in self.model.named_parameters():
                if not p.requires_grad:
                    continue
                # norms, biases and embeddings are not weight-decayed
                (no_decay if p.ndim <= 1 or "embed" in name or "token" in name else decay).append(p)
            opt = torch.optim.AdamW(
                [
                    {"params": decay, "weight_decay": cfg.weight_decay},
                    {"params": no_decay, "weight_decay": 0.0},
                ],
                lr=cfg.lr,
            )
            total = max(1, int(self.trainer.estimated_stepping_batches))
            warm = int(cfg.warmup_frac * total)

            def schedule(step: int) -> float:
                if step < warm:
                    return (step + 1) / (warm + 1)
                t = (step - warm) / max(1, total - warm)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return LitModel()


def _ema_callback() -> Any:
    """Lightning's weight averaging with an exponential average whose `decay` is set once the
    number of steps per epoch is known (before `fit`). The checkpoints' `state_dict` holds the
    average (the raw weights ride along for resuming), so what is kept is the average."""
    from lightning.pytorch.callbacks import WeightAveraging

    class EMA(WeightAveraging):
        def __init__(self) -> None:
            self.decay = 0.9

            def avg_fn(avg: torch.Tensor, new: torch.Tensor, num: torch.Tensor) -> torch.Tensor:
                # Integer buffers (index tables, BatchNorm's step count) are copied, never
                # averaged: 0.9 * 3 + 0.1 * 3 rounds to 2.99..., which the copy back into an
                # integer tensor truncates to 2, and an index table then points elsewhere.
                if not avg.is_floating_point():
                    return new
                return self.decay * avg + (1.0 - self.decay) * new

            super().__init__(use_buffers=True, avg_fn=avg_fn)

    return EMA()


# The ModelCheckpoint state entries that name its files.
_CHECKPOINT_PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")


def _rebase_checkpoint_state(state: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    """A ModelCheckpoint state whose file paths, under its folder `old`, are written under `new`
    instead (either may be "."): relative in the checkpoints, absolute again in memory."""

    def move(path: str) -> str:
        if not path:  # "" = no such file yet
            return path
        return os.path.normpath(os.path.join(new, os.path.relpath(os.path.join(old, path), old)))

    out = {**state, "dirpath": new}
    out.update({k: move(state[k]) for k in _CHECKPOINT_PATHS if state.get(k) is not None})
    if state.get("best_k_models") is not None:
        out["best_k_models"] = {move(k): v for k, v in state["best_k_models"].items()}
    return out


def _checkpoint_callback(ckpt_dir: Path) -> Any:
    """Lightning's ModelCheckpoint (best by val_loss, and last), whose state in the checkpoints
    names its files relative to its folder. Lightning stores them absolute: the runs folder
    then named the place it was made in, and once moved, a resume dropped the callback's state
    (it does when the stored folder differs) and logged both absolute paths."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    class PortableCheckpoint(ModelCheckpoint):
        @property
        def state_key(self) -> str:
            # Lightning files a callback's state under its class name: ModelCheckpoint's, so
            # that checkpoints written before this class still resume with their state.
            return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__name__)

        def state_dict(self) -> dict[str, Any]:
            return _rebase_checkpoint_state(super().state_dict(), self.dirpath, ".")

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            # A checkpoint written before this class stores its folder absolute: its files are
            # moved from there, as a relative one's from ".".
            old = state_dict.get("dirpath") or "."
            super().load_state_dict(_rebase_checkpoint_state(state_dict, old, self.dirpath))

    return PortableCheckpoint(
        dirpath=ckpt_dir,
        filename="best",
        monitor="val_loss",
        mode="min",
        save_top_k=1,
        save_last=True,
        enable_version_counter=False,
    )


def _history_callback(path: Path) -> Any:
    """Writes fold history (one entry per epoch, replaced on resume) and epoch wall times."""
    L = _lightning()

    class History(L.Callback):
        def __init__(self) -> None:
            self.entries: list[dict[str, float]] = (
                json.loads(path.read_text()) if path.exists() else []
            )
            self.t0 = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self.t0 = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            # Runs after the epoch's validation in Lightning 2.x, so val metrics are present.
            if trainer.sanity_checking:
                return
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
            epoch = int(trainer.current_epoch)
            entry = {
                "epoch": epoch,
                "train_loss": m.get("train_loss", float("nan")),
                "val_loss": m.get("val_loss", float("nan")),
                "val_score": m.get("val_score", float("nan")),
                "lr": float(trainer.optimizers[0].param_groups[0]["lr"]),
                "seconds": time.perf_counter() - self.t0,
            }
            self.entries = [e for e in self.entries if e["epoch"] != epoch] + [entry]
            if trainer.is_global_zero:
                atomic_write_text(path, json.dumps(self.entries, indent=1) + "\n")

    return History()


# --------------------------------------------------------------------------- helpers


def is_global_zero() -> bool:
    """Whether this process writes files: the only process, or global rank 0 of several.
    Read from the launcher's environment until Lightning has set up the process group,
    because the run folder is written before the first fold trains (and, under Lightning's own
    launcher, before the other processes exist)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    # Lightning's order: torchrun's RANK, its own launcher's LOCAL_RANK (NODE_RANK on the
    # other nodes), then SLURM's task id, which SLURM sets for an unmanaged process too.
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if key in os.environ:
            rank = int(os.environ[key])
            break
    else:
        rank = 0
    return rank == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def gather_rows(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Every process's batches of rows, in rank order, on every process (a collective: all
    ranks call it together); this process's own batches when it runs alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(batches)  # a new list: the caller may clear its own
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, batches)
    return [b for part in parts for b in part]


def merge_rows(
    batches: Sequence[dict[str, np.ndarray]], order: Sequence[int] | None = None
) -> dict[str, np.ndarray]:
    """Batches of study rows (`study_id` (B,) and arrays (B, ...)) -> one array per key with
    each study once, in the order of `order` (default: first appearance). A study seen twice is
    one the validation sampler repeated so that every process gets as many: the same inputs
    through the same weights, so the first copy is kept. ValueError for a study not in
    `order`: rows from elsewhere would silently enter the OOF."""
    if not batches:
        raise ValueError("no rows to merge")
    ids = np.concatenate([b["study_id"] for b in batches]).astype(np.int64)
    _, first = np.unique(ids, return_index=True)
    if order is None:
        keep = np.sort(first)
    else:
        pos = {int(s): i for i, s in enumerate(order)}
        unknown = sorted({int(ids[i]) for i in first} - pos.keys())
        if unknown:
            raise ValueError(f"rows of {len(unknown)} unexpected studies, e.g. {unknown[:5]}")
        keep = first[np.argsort([pos[int(ids[i])] for i in first], kind="stable")]
    return {k: np.concatenate([b[k] for b in batches])[keep] for k in batches[0]}


def world_size(cfg: EngineConfig) -> int:
    """The number of processes a Trainer of `cfg` runs ("auto" devices: every GPU, or one
    process on CPU, as Lightning counts them)."""
    devices = cfg.devices
    if devices in ("auto", -1, "-1"):
        accel, _ = resolve_precision(cfg)
        devices = max(1, torch.cuda.device_count()) if accel == "gpu" else 1
    try:
        return int(devices) * int(cfg.num_nodes)
    except ValueError:
        raise ValueError(
            f"engine.devices must be a number of processes or 'auto', got {cfg.devices!r}"
        ) from None


def _safe_score(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """The official score; NaN terms where a group has no labelled rows."""
    from lsdc.metrics import score_arrays

    return score_arrays(labels, probs)


def class_prior(labels: np.ndarray) -> np.ndarray:
    """Per-target class frequencies (25, 3) of labelled rows (uniform where none)."""
    labels = np.asarray(labels)
    prior = np.ones((len(TARGETS), len(SEVERITIES)))  # +1 smoothing: never a zero probability
    for c in range(len(SEVERITIES)):
        prior[:, c] += (labels == c).sum(axis=0)
    return prior / prior.sum(axis=1, keepdims=True)


def weighted_class_prior(labels: np.ndarray) -> np.ndarray:
    """`class_prior` times the metric's severity weights, renormalised (25, 3): the constant
    prediction that minimises the weighted log loss (the metric), which the plain frequencies do
    not. A model that has learnt nothing from its images converges to this, not to
    `class_prior`, so it is the bar that shows whether images were used."""
    from lsdc.constants import SEVERITY_WEIGHTS

    prior = class_prior(labels) * np.asarray(SEVERITY_WEIGHTS, dtype=np.float64)
    return prior / prior.sum(axis=1, keepdims=True)


def resolve_precision(cfg: EngineConfig) -> tuple[str, str]:
    """(accelerator, precision) from 'auto' settings and the hardware present."""
    accel = cfg.accelerator
    if accel == "auto":
        accel = "gpu" if torch.cuda.is_available() else "cpu"
    precision = cfg.precision
    if precision == "auto":
        if accel == "gpu":
            precision = "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
        else:
            precision = "32-true"
    return accel, precision


def load_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of a Lightning checkpoint, read with weights_only=True (no pickle of
    arbitrary objects); keys without the wrapper's `model.` prefix."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items()}


def _checkpoint_readable(path: Path) -> bool:
    """Whether a resume checkpoint loads; a damaged one (a copy cut short, a full disk) is
    named and deleted, and the fold starts again rather than dying in the unpickler."""
    import sys

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to load means the same: unusable
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if is_global_zero():  # the others reach the same verdict on the same file
            print(
                f"{path}: damaged checkpoint ({type(exc).__name__}: {first}); "
                "deleted, the fold trains from its start",
                file=sys.stderr,
            )
            path.unlink(missing_ok=True)
        return False
    return True


def remove_truncated_kernels(
    root: str | Path | None = None, *, min_age_s: float = 30
) -> list[Path]:
    """Delete the compiled kernels (`*.so`) in inductor's cache (`root`, default the one torch
    uses) that are not shared libraries. A compile stopped mid-link (Ctrl-C in a fit with
    engine.compile=true) leaves an empty one, and inductor, which trusts its cache, then fails
    every later compile of that kernel with "file too short"; deleted, it is compiled again.
    Files younger than `min_age_s` are left: another process (a fold side by side) may be
    linking them now."""
    import sys

    if root is None:
        try:
            from torch._inductor.runtime.cache_dir_utils import cache_dir
        except ImportError:  # torch moved it: the same default, by hand
            import getpass
            import tempfile

            def cache_dir() -> str:
                default = Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}"
                return os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(default))

        root = cache_dir()
    removed = []
    for path in Path(root).rglob("*.so") if Path(root).is_dir() else ():
        try:
            if time.time() - path.stat().st_mtime < min_age_s:
                continue
            with path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    continue
            path.unlink()
        except OSError:  # another process's, or already gone: not ours to judge
            continue
        removed.append(path)
    if removed:
        print(
            f"{root}: removed {len(removed)} truncated compiled kernel(s) that an interrupted "
            "compile left (they are compiled again)",
            file=sys.stderr,
        )
    return removed


def save_model_weights(model: nn.Module, path: str | Path) -> Path:
    """`model`'s weights at `path`, with their SHA-256 beside them (`lsdc.models.weights`)."""
    from lsdc.models.weights import save_weights

    return save_weights(model, path)


def load_model_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """`model` with the weights of `path`, checked (hash, names and shapes, finiteness)."""
    from lsdc.models.weights import load_weights

    return load_weights(model, path)


# --------------------------------------------------------------------------- cross-validation


def resolve_run_config(
    schema: type,
    run_dir: str | Path,
    *,
    folds: int | None = None,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
    config_path: str | Path | None = None,
) -> tuple[Any, Path]:
    """A family's training config (`schema` with an `engine: EngineConfig`), with `folds` and
    `epochs` applied, and the path to save it in `run_dir` (created). Refuses a run folder
    started with another configuration: resuming it would mix two experiments."""
    import dataclasses

    from lsdc.config import load_config

    cfg = load_config(schema, config_path, overrides)
    if folds is not None:
        cfg.engine = dataclasses.replace(cfg.engine, folds=int(folds))
    if epochs is not None:
        cfg.engine = dataclasses.replace(cfg.engine, epochs=int(epochs))
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    saved = run_dir / CONFIG_FILE
    if saved.exists() and load_config(schema, saved) != cfg:
        if _trained_anything(run_dir):
            raise ValueError(
                f"{saved}: this run folder was started with another configuration; "
                "resume with the same settings or use a new --out folder"
            )
        # An attempt that failed before any fold trained (too many folds for the studies, a
        # bad cache) left only its settings: nothing to mix, so a retry may change them.
        if is_global_zero():
            for name in (CONFIG_FILE, FOLDS_FILE, RUN_FILE):
                (run_dir / name).unlink(missing_ok=True)
    return cfg, saved


def portable_paths(tree: Any, base: Path) -> Any:
    """`tree` with every absolute path string rewritten relative to `base`, so that a run
    folder names no place outside itself: copied elsewhere, it says the same thing."""
    if isinstance(tree, dict):
        return {k: portable_paths(v, base) for k, v in tree.items()}
    if isinstance(tree, list):
        return [portable_paths(v, base) for v in tree]
    if isinstance(tree, str) and os.path.isabs(tree):
        return Path(os.path.relpath(tree, Path(base).resolve())).as_posix()
    return tree


def _trained_anything(run_dir: Path) -> bool:
    """Whether some fold of the run has a checkpoint or a result."""
    return any(run_dir.glob("fold*/checkpoints/*.ckpt")) or any(run_dir.glob("fold*/result.json"))


def _loader(
    ds: Dataset, cfg: EngineConfig, collate, *, train: bool, processes: int = 1
) -> DataLoader:
    gen = torch.Generator().manual_seed(cfg.seed)
    # Each of `processes` gets its share of the studies (Lightning's distributed sampler);
    # dropping a share's last partial batch must not leave it none.
    share = -(-len(ds) // processes)
    return DataLoader(
        ds,
        batch_size=cfg.batch_size,
        shuffle=train,
        drop_last=train and share > cfg.batch_size,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        multiprocessing_context=loader_context(cfg.num_workers),
        collate_fn=collate,
        generator=gen if train else None,
        pin_memory=torch.cuda.is_available(),
    )


def _train_fold(
    task: TrainTask,
    cfg: EngineConfig,
    fold_dir: Path,
    train_ids: list[int],
    val_ids: list[int],
    callbacks: Sequence[Any] = (),
) -> tuple[np.ndarray, np.ndarray, float, dict[str, np.ndarray]]:
    """Train (or resume) one fold; returns (val study ids, val probs (n, 25, 3), mean epoch s,
    the task's `oof_outputs` of the val studies)."""
    L = _lightning()
    from lsdc.models.registry import build_model

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_dir = fold_dir / "checkpoints"
    # NHWC convolutions: about 12% faster training steps on CPU for both families (oneDNN),
    # the layout tensor cores prefer on GPU; the weights saved are made contiguous.
    model = build_model(task.model_name, **task.model_kwargs).to(memory_format=CHANNELS_LAST)
    if task.init_model is not None:
        row = {int(s): i for i, s in enumerate(task.study_ids)}
        task.init_model(model, task.labels[[row[int(s)] for s in train_ids]])
    if cfg.compile:
        if is_global_zero():
            remove_truncated_kernels()
        model.compile()
    lit = build_lit_module(model, cfg, task.loss_fn, task.oof_outputs, task.mirror_batch)
    accel, precision = resolve_precision(cfg)
    checkpoint = _checkpoint_callback(ckpt_dir)
    history = _history_callback(fold_dir / "history.json")
    ema = _ema_callback() if cfg.ema_epochs > 0 else None
    trainer = L.Trainer(
        max_epochs=cfg.epochs,
        accelerator=accel,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=precision,
        sync_batchnorm=cfg.sync_batchnorm,
        gradient_clip_val=cfg.grad_clip or None,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        callbacks=[checkpoint, history, *([ema] if ema else []), *callbacks],
        logger=False,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=fold_dir,
        deterministic=False,
    )
    processes = trainer.num_devices * trainer.num_nodes
    train_dl = _loader(
        task.make_dataset(train_ids, True), cfg, task.collate, train=True, processes=processes
    )
    val_dl = _loader(task.make_dataset(val_ids, False), cfg, task.collate, train=False)
    if ema is not None:
        steps = max(1, math.ceil(len(train_dl) / cfg.accumulate_grad_batches))
        ema.decay = 1.0 - 1.0 / max(1.0, cfg.ema_epochs * steps)
    last = ckpt_dir / "last.ckpt"
    resume = last if last.exists() and _checkpoint_readable(last) else None
    trainer.fit(lit, train_dl, val_dl, ckpt_path=resume, weights_only=True)

    best = ckpt_dir / "best.ckpt"
    chosen = best if cfg.keep == "best" and best.exists() else last
    # Every process loads the kept weights (written by rank 0 before `fit` returned).
    model.load_state_dict(load_checkpoint_state(chosen))
    if trainer.is_global_zero:
        save_model_weights(model, fold_dir / MODEL_FILE)
    # The OOF of this fold: each process predicts its share of the validation studies
    # (Lightning's predict sampler repeats none), then every process gets all of them.
    rows = merge_rows(gather_rows(trainer.predict(lit, val_dl)), val_ids)
    ids = rows["study_id"]
    probs = rows["probs"].astype(np.float64)
    extra = {k: rows[f"out_{k}"] for k in task.oof_outputs}
    entries = history.entries
    epoch_s = float(np.mean([e["seconds"] for e in entries])) if entries else float("nan")
    return ids, probs, epoch_s, extra


# A fold's (val study ids, val probs (n, 25, 3), mean epoch s, the task's `oof_outputs` of the
# val studies, the fold's s).
FoldResult = tuple[np.ndarray, np.ndarray, float, dict[str, np.ndarray], float]


def _run_fold(
    task: TrainTask,
    cfg: EngineConfig,
    run_dir: Path,
    k: int,
    train_ids: list[int],
    val_ids: list[int],
    callbacks: Sequence[Any],
    writer: bool,
) -> FoldResult:
    """Train fold `k`; the writer writes its oof.npz, then its result.json (the fold is
    complete)."""
    fold_dir = run_dir / f"fold{k}"
    fold_dir.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    vids, vprobs, secs, extra = _train_fold(task, cfg, fold_dir, train_ids, val_ids, callbacks)
    seconds = time.perf_counter() - t0
    if writer:
        save_npz(
            fold_dir / "oof.npz",
            {"study_ids": vids, "probs": vprobs, **{f"out_{n}": v for n, v in extra.items()}},
            {"epoch_seconds": secs},
        )
        atomic_write_json(
            fold_dir / "result.json", {"fold": k, "seconds": seconds, "val_studies": len(vids)}
        )
    return vids, vprobs, secs, extra, seconds


def _side_by_side(fn: Callable[[int], Any], folds: list[int], workers: int, run_dir: Path) -> None:
    """`fn(k)` for every fold in its own process, `workers` at a time. Ctrl-C (or any error
    here) interrupts the folds running, which stop at once and resume from their last epoch on
    the next run; a failed fold does not stop the others."""
    # forkserver: a child forked from a process whose OpenMP runtime ran can hang (parallel.py)
    ctx = multiprocessing.get_context("forkserver")
    waiting, failed = list(folds), []
    running: dict[int, tuple[Any, Any]] = {}  # fold -> (process, the end its error comes on)
    try:
        while waiting or running:
            while waiting and len(running) < workers:
                k = waiting.pop(0)
                receive, send = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_fold_child, args=(fn, k, send), name=f"lsdc fold{k}")
                proc.start()
                send.close()
                running[k] = (proc, receive)
            multiprocessing.connection.wait([proc.sentinel for proc, _ in running.values()])
            for k, (proc, receive) in list(running.items()):
                if proc.exitcode is None:
                    continue
                del running[k]
                error = _received(receive)
                if proc.exitcode != 0 or error:
                    failed.append(f"fold {k}: {error or f'its process ended with {proc.exitcode}'}")
    except BaseException:
        for proc, _ in running.values():
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGINT)
        for proc, _ in running.values():
            proc.join()
        raise
    if failed:
        raise RuntimeError(f"{run_dir}: " + "; ".join(failed))


def _received(end: Any) -> str | None:
    """What a fold's process sent: its error, or None (none sent: it died before it could)."""
    try:
        return end.recv()
    except EOFError:
        return None


def _fold_child(fn: Callable[[int], Any], k: int, errors: Any) -> None:
    """A fold process: Ctrl-C stops its training (as in the main process); its error, if any,
    goes back to the parent as text."""
    from lsdc.interrupt import Interrupted, sigint_raises

    try:
        with sigint_raises():
            fn(k)
        errors.send(None)
    except Interrupted:
        errors.send("interrupted")
        raise SystemExit(130) from None
    except Exception as exc:  # reported by the parent, with the fold
        errors.send(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from None


def _fold_process(
    make_task: Callable[[], TrainTask],
    context: FoldContext | None,
    cfg: EngineConfig,
    run_dir: Path,
    split: dict[int, tuple[list[int], list[int]]],
    workers: int,
    k: int,
) -> int:
    """One fold in a worker process of `run_cross_validation` (its share of the cores)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    with context() if context is not None else contextlib.nullcontext(()) as callbacks:
        _run_fold(make_task(), cfg, run_dir, k, *split[k], list(callbacks), True)
    return k


def _fold_result(run_dir: Path, k: int, outputs: Sequence[str]) -> FoldResult:
    """A finished fold's (val ids, val probs, mean epoch s, oof outputs, fold s), from disk."""
    from lsdc.fileio import load_npz

    fold_dir = run_dir / f"fold{k}"
    arrays, meta = load_npz(fold_dir / "oof.npz")
    extra = {n: arrays[f"out_{n}"] for n in outputs}
    seconds = float(json.loads((fold_dir / "result.json").read_text())["seconds"])
    return arrays["study_ids"], arrays["probs"], meta["epoch_seconds"], extra, seconds


def run_cross_validation(
    run_dir: str | Path,
    task: TrainTask,
    cfg: EngineConfig,
    callbacks: Sequence[Any] = (),
    parallel: FoldProcesses | None = None,
) -> CVResult:
    """Train every (selected) fold of `task` into `run_dir`, resuming what was done; write OOF
    predictions, their score, the class-prior score on the same rows and the curves.
    `callbacks`: extra Lightning callbacks for every fold's Trainer (in this process).
    `parallel`: train the folds left side by side (on CPU, one process per fold; see the
    module docstring). With several processes, each returns the same result and only global
    rank 0 writes."""
    if cfg.keep not in ("best", "last"):
        raise ValueError(f"engine.keep must be 'best' or 'last', got {cfg.keep!r}")
    processes = world_size(cfg)  # a mistyped engine.devices fails here, not after the first folds
    if cfg.sync_batchnorm and processes > 1 and resolve_precision(cfg)[0] == "cpu":
        raise ValueError(
            "engine.sync_batchnorm needs GPUs: torch's SyncBatchNorm does not run on CPU"
        )
    writer = is_global_zero()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(task.study_ids, np.int64)
    labels = np.asarray(task.labels, np.int64)
    if labels.shape != (len(ids), len(TARGETS)):
        raise ValueError(f"labels must be ({len(ids)}, {len(TARGETS)}), got {labels.shape}")

    folds_path = run_dir / FOLDS_FILE
    if folds_path.exists():
        saved = load_folds(folds_path)
        if set(saved) != set(ids.tolist()):
            raise ValueError(
                f"{folds_path}: folds were made for other studies; use a new run folder"
            )
        folds = np.asarray([saved[int(s)] for s in ids])
    else:
        folds = make_folds(ids.tolist(), labels, cfg.folds, cfg.seed)  # the same on every rank
        if writer:
            save_folds(folds_path, ids.tolist(), folds)
    n_folds = int(folds.max()) + 1
    selected = list(range(n_folds)) if cfg.train_folds is None else list(cfg.train_folds)
    bad = [k for k in selected if not 0 <= k < n_folds]
    if bad:
        raise ValueError(f"train_folds {bad} outside 0..{n_folds - 1}")

    if writer:
        atomic_write_json(
            run_dir / RUN_FILE,
            portable_paths(
                {
                    "task": task.name,
                    "model_name": task.model_name,
                    "model_kwargs": task.model_kwargs,
                    "folds": selected,
                    "n_folds": n_folds,
                    "model_file": MODEL_FILE,
                    **task.extra,
                },
                run_dir,
            ),
        )

    # Decided once, before any fold trains, so that every process skips the same folds: no
    # fold can finish before all processes have joined its training (Lightning's launcher
    # starts the others only when rank 0 begins the first fold left, torchrun all at once).
    finished = {
        k
        for k in selected
        if (run_dir / f"fold{k}" / "result.json").exists()
        and (run_dir / f"fold{k}" / "oof.npz").exists()
    }
    todo = [k for k in selected if k not in finished]
    split = {k: (ids[folds != k].tolist(), ids[folds == k].tolist()) for k in todo}
    side_by_side = (
        parallel is not None
        and parallel.workers > 1
        and len(todo) > 1
        and processes == 1
        and resolve_precision(cfg)[0] == "cpu"
    )
    trained: dict[int, FoldResult] = {}
    if side_by_side:
        assert parallel is not None
        workers = min(parallel.workers, len(todo))
        fn = functools.partial(
            _fold_process, parallel.task, parallel.context, cfg, run_dir, split, workers
        )
        _side_by_side(fn, todo, workers, run_dir)
    else:
        # Kept in memory: under DDP the other ranks must not read what rank 0 may still write.
        for k in todo:
            trained[k] = _run_fold(task, cfg, run_dir, k, *split[k], callbacks, writer)

    oof_ids, oof_probs, fold_seconds, epoch_seconds = [], [], {}, []
    oof_extra: dict[str, list[np.ndarray]] = {k: [] for k in task.oof_outputs}
    for k in selected:
        vids, vprobs, secs, extra, fold_seconds[k] = trained.get(k) or _fold_result(
            run_dir, k, task.oof_outputs
        )
        oof_ids.append(vids)
        oof_probs.append(vprobs)
        for name, value in extra.items():
            oof_extra[name].append(value)
        epoch_seconds.append(secs)

    all_ids = np.concatenate(oof_ids)
    probs = np.concatenate(oof_probs)
    pos = {int(s): i for i, s in enumerate(ids)}
    oof_labels = labels[[pos[int(s)] for s in all_ids]]

    # Class prior of each fold's training rows, applied to its validation rows: the baseline
    # that the model must beat on exactly the same rows.
    def fold_constant(fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
        return np.concatenate(
            [
                np.broadcast_to(fn(labels[folds != k]), (int((folds == k).sum()), 25, 3))
                for k in selected
            ]
        )

    score = _safe_score(oof_labels, probs)
    prior_score = _safe_score(oof_labels, fold_constant(class_prior))
    weighted_prior_score = _safe_score(oof_labels, fold_constant(weighted_class_prior))
    calibrated = None
    from lsdc.inference.calibration import CALIBRATION_FILE, cross_fitted, fit_calibration

    # A calibration left by an earlier attempt must not outlive the settings that made it.
    if writer:
        (run_dir / CALIBRATION_FILE).unlink(missing_ok=True)
    if cfg.calibrate and (oof_labels >= 0).any():
        calibration = fit_calibration(oof_labels, probs)
        if writer:
            calibration.save(run_dir / CALIBRATION_FILE)
        if len(selected) > 1:
            row_folds = folds[[pos[int(s)] for s in all_ids]]
            calibrated = _safe_score(oof_labels, cross_fitted(oof_labels, probs, row_folds))
    outputs = {k: np.concatenate(v) for k, v in oof_extra.items()}
    result = CVResult(
        run_dir=run_dir,
        study_ids=all_ids,
        probs=probs,
        labels=oof_labels,
        score=score,
        prior_score=prior_score,
        weighted_prior_score=weighted_prior_score,
        fold_seconds=fold_seconds,
        epoch_seconds=float(np.nanmean(epoch_seconds)) if epoch_seconds else float("nan"),
        outputs=outputs,
        calibrated_score=calibrated,
    )
    if writer:
        _write_oof(result, selected)
    return result


def _write_oof(result: CVResult, folds: Sequence[int]) -> None:
    """oof.csv, oof.npz, summary.json and curves.png of a cross-validation."""
    from lsdc.inference.submission import build_submission, write_submission

    run_dir = result.run_dir
    write_submission(build_submission(result.study_ids, result.probs), run_dir / "oof.csv")
    save_npz(
        run_dir / "oof.npz",
        {
            "study_ids": result.study_ids,
            "probs": result.probs,
            "labels": result.labels,
            **{f"out_{k}": v for k, v in result.outputs.items()},
        },
        {},
    )
    calibrated = result.calibrated_score
    atomic_write_json(
        run_dir / SUMMARY_FILE,
        {
            "oof_score": result.score,
            **({"oof_score_calibrated": calibrated} if calibrated is not None else {}),
            "prior_score": result.prior_score,
            "weighted_prior_score": result.weighted_prior_score,
            "studies": len(result.study_ids),
            "folds": list(folds),
            "fold_seconds": {str(k): v for k, v in result.fold_seconds.items()},
            "epoch_seconds": result.epoch_seconds,
        },
    )
    plot_curves(run_dir, folds)


def plot_curves(run_dir: str | Path, folds: Sequence[int]) -> Path:
    """curves.png: train/val loss and val score per epoch, one colour per fold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for k in folds:
        path = run_dir / f"fold{k}" / "history.json"
        if not path.exists():
            continue
        hist = json.loads(path.read_text())
        ep = [e["epoch"] + 1 for e in hist]
        color = f"C{k % 10}"
        ax_loss.plot(
            ep, [e["train_loss"] for e in hist], "-o", color=color, label=f"fold {k} train"
        )
        ax_loss.plot(ep, [e["val_loss"] for e in hist], "--s", color=color, label=f"fold {k} val")
        ax_score.plot(ep, [e["val_score"] for e in hist], "-o", color=color, label=f"fold {k}")
    ax_loss.set(xlabel="epoch", ylabel="metric-weighted loss", title="loss")
    ax_score.set(
        xlabel="epoch", ylabel="official score (lower is better)", title="validation score"
    )
    for ax in (ax_loss, ax_score):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    out = run_dir / "curves.png"
    tmp = out.with_name(".curves.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
