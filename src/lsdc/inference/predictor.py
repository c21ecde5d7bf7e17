"""Inference from a run folder: fold models -> per-study probabilities (n, 25, 3).

`Predictor.from_run(run_dir)` reads only the run folder (run.json for the family, model name and
keyword config; fold<k>/model.safetensors for the weights) and averages the fold models'
probabilities. With `tta_flip`, each study is also predicted mirrored left/right and the
mirrored prediction mapped back, which makes the result exactly left/right equivariant. Where a
family predicts keypoints (multitask), their fold mean (unmirrored view) comes along and
`coordinates_table` turns them into the competition's coordinate format. A run's
`calibration.json` (fitted on its OOF by the engine) is applied to the fold mean.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lsdc.inference.calibration import CALIBRATION_FILE, Calibration, apply_calibration
from lsdc.parallel import loader_context


@dataclass
class Predictions:
    study_ids: np.ndarray  # (n,) int64
    probs: np.ndarray  # (n, 25, 3) float64, rows sum to 1
    keypoints: np.ndarray | None = None  # (n, 25, 2) normalised crop x/y, target order
    visibility: np.ndarray | None = None  # (n, 25) probability that the point is visible

    def to_submission(self):
        from lsdc.inference.submission import build_submission

        return build_submission(self.study_ids.tolist(), self.probs)


@dataclass
class _Family:
    """How inference feeds one model family from a cache folder."""

    # (cache, study ids, run.json) -> dataset
    dataset: Callable[[str | Path, Sequence[int] | None, dict[str, Any]], Dataset]
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    mirror_batch: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None
    study_ids: Callable[[Dataset], list[int]]
    # run.json model kwargs -> the kwargs to build the model for inference
    inference_kwargs: Callable[[dict[str, Any]], dict[str, Any]] = dict


def _sequence_family() -> _Family:
    from lsdc.data.sequence import SequenceDataset, collate_sequence, mirror_sequence_batch

    return _Family(
        dataset=lambda cache, ids, info: SequenceDataset(cache, ids),
        collate=collate_sequence,
        mirror_batch=mirror_sequence_batch,
        study_ids=lambda ds: list(ds.study_ids),
    )


def _multitask_family() -> _Family:
    from lsdc.config import load_config
    from lsdc.data.multitask import (
        MultitaskDataConfig,
        MultitaskDataset,
        collate_multitask,
        mirror_batch,
    )

    def dataset(cache, ids, info):
        # The run's input sizes; augmentation is off outside training.
        cfg = load_config(MultitaskDataConfig, None, _dotted(info.get("data_config", {})))
        return MultitaskDataset(cache, ids, config=cfg)

    def kwargs(model_kwargs: dict[str, Any]) -> dict[str, Any]:
        # SR weights are restored from the fold checkpoint, not from the SR run's folder.
        return {**model_kwargs, "sr_path": None}

    return _Family(
        dataset=dataset,
        collate=collate_multitask,
        # Exact: axial crops mirrored and Sagittal T1 sides exchanged (lsdc.data.multitask).
        mirror_batch=mirror_batch,
        study_ids=lambda ds: list(ds.study_ids),
        inference_kwargs=kwargs,
    )


def _dotted(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """A nested config dict as dotted `key=value` overrides."""
    out = []
    for k, v in tree.items():
        if isinstance(v, dict):
            out.extend(_dotted(v, f"{prefix}{k}."))
        else:
            out.append(f"{prefix}{k}={'null' if v is None else v}")
    return out


# Family name (run.json "task") -> how to feed it.
FAMILIES: dict[str, Callable[[], _Family]] = {
    "sequence": _sequence_family,
    "multitask": _multitask_family,
}


_FROM_SCRATCH = {"pretrained": False, "pretrained_path": None}


def _strip_split(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "split"}


class Predictor:
    """Fold-averaged predictions of one run folder."""

    def __init__(
        self,
        run_dir: Path,
        info: dict[str, Any],
        models: list[nn.Module],
        device: torch.device,
        tta_flip: bool = False,
        calibration: Calibration | None = None,
        amp: bool | None = None,
    ) -> None:
        self.run_dir = run_dir
        # Autocast where it pays (CUDA) unless told; bf16 where the device has it, else fp16.
        self.amp = device.type == "cuda" if amp is None else amp
        self.amp_dtype = (
            torch.float16
            if device.type == "cuda" and not torch.cuda.is_bf16_supported()
            else torch.bfloat16
        )
        self.calibration = calibration
        self.info = info
        self.models = models
        self.device = device
        self.family = FAMILIES[info["task"]]()
        if tta_flip and self.family.mirror_batch is None:
            raise ValueError(f"{run_dir}: family {info['task']!r} has no left/right mirror")
        self.tta_flip = tta_flip

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        *,
        folds: Sequence[int] | None = None,
        device: str = "auto",
        tta_flip: bool = False,
        calibrate: bool = True,
        amp: bool | None = None,
    ) -> Predictor:
        """The fold models of `run_dir` on `device` ("auto": CUDA when present); `amp`:
        autocast (default: on CUDA only)."""
        from lsdc.models.registry import build_model
        from lsdc.training.engine import CHANNELS_LAST, RUN_FILE, load_model_weights

        run_dir = Path(run_dir)
        info_path = run_dir / RUN_FILE
        if not info_path.exists():
            raise FileNotFoundError(f"{info_path}: not a run folder (no {RUN_FILE})")
        info = json.loads(info_path.read_text())
        if info.get("task") not in FAMILIES:
            raise ValueError(f"{info_path}: unknown model family {info.get('task')!r}")
        wanted = list(info["folds"]) if folds is None else [int(k) for k in folds]
        dev = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        kwargs = FAMILIES[info["task"]]().inference_kwargs(info["model_kwargs"])
        # The fold weights replace every pretrained one: rebuilding from the run's pretrained
        # settings would need the hub (offline: an error) or a file that may be gone, at a path
        # relative to wherever training ran.
        kwargs.update({k: v for k, v in _FROM_SCRATCH.items() if k in kwargs})
        models = []
        for k in wanted:
            path = run_dir / f"fold{k}" / info.get("model_file", "model.safetensors")
            if not path.exists():
                raise FileNotFoundError(f"{path}: fold {k} has no trained weights")
            model = build_model(info["model_name"], **kwargs).to(memory_format=CHANNELS_LAST)
            models.append(load_model_weights(model, path).to(dev).eval())
        if not models:
            raise ValueError(f"{run_dir}: no folds to predict with")
        cal_path = run_dir / CALIBRATION_FILE
        cal = Calibration.load(cal_path) if calibrate and cal_path.exists() else None
        return cls(run_dir, info, models, dev, tta_flip=tta_flip, calibration=cal, amp=amp)

    @torch.no_grad()
    def predict_batch(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """A collated batch -> probabilities (B, 25, 3), mean over folds (and the mirror)."""
        return self.predict_outputs(batch)["probs"]

    @torch.no_grad()
    def predict_outputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A collated batch -> `probs` (B, 25, 3), mean over folds (and the mirror), plus the
        fold means of `keypoints` (B, 25, 2) and `visibility` (B, 25, probabilities) on the
        unmirrored view where the model gives them."""
        from lsdc.data.sequence import mirror_targets

        # Non-blocking from pinned memory (the loader pins it on CUDA): the copy overlaps.
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        views = [(batch, False)]
        if self.tta_flip:
            views.append((self.family.mirror_batch(batch), True))
        total = None
        extra: dict[str, torch.Tensor] = {}
        for model in self.models:
            for view, mirrored in views:
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                    out = model(view)
                probs = out["logits"].float().softmax(-1)  # (B, 25, 3)
                if mirrored:
                    probs = mirror_targets(probs, dim=1)
                total = probs if total is None else total + probs
                if mirrored:
                    continue
                for key, fn in (("keypoints", None), ("visibility", torch.sigmoid)):
                    if key in out:
                        v = out[key].float() if fn is None else fn(out[key].float())
                        extra[key] = extra[key] + v if key in extra else v
        result = {"probs": (total / (len(self.models) * len(views))).cpu()}
        result.update({k: (v / len(self.models)).cpu() for k, v in extra.items()})
        return result

    def check_cache(self, cache_dir: str | Path) -> None:
        """Refuse a cache made with other preprocessing settings than the training cache."""
        from lsdc.preprocess.cache import StudyCache

        trained = self.info.get("cache_config")
        if trained is None:
            return
        found = StudyCache.open(cache_dir).config
        if _strip_split(found) != _strip_split(trained):
            diff = sorted(
                k
                for k in set(found) | set(trained)
                if k != "split" and found.get(k) != trained.get(k)
            )
            raise ValueError(
                f"{cache_dir}: preprocessed with other settings than the run's training cache "
                f"(differs in {', '.join(diff)}); preprocess with the same configuration"
            )

    def predict_cache(
        self,
        cache_dir: str | Path,
        study_ids: Sequence[int] | None = None,
        *,
        batch_size: int = 8,
        num_workers: int = 0,
    ) -> Predictions:
        """Probabilities for every study of a cache (or `study_ids`), read by `num_workers`
        loader processes."""
        self.check_cache(cache_dir)
        ds = self.family.dataset(cache_dir, study_ids, self.info)
        loader = DataLoader(
            ds,
            batch_size=batch_size,
            collate_fn=self.family.collate,
            num_workers=num_workers,
            multiprocessing_context=loader_context(num_workers),
            pin_memory=self.device.type == "cuda",
        )
        ids, outs = [], []
        for batch in loader:
            ids.append(batch["study_id"].numpy())
            outs.append({k: v.numpy() for k, v in self.predict_outputs(batch).items()})
        all_probs = np.concatenate([o["probs"] for o in outs]).astype(np.float64)
        all_probs /= all_probs.sum(axis=-1, keepdims=True)
        if self.calibration is not None:
            all_probs = apply_calibration(all_probs, self.calibration)
        extra = {k: np.concatenate([o[k] for o in outs]) for k in outs[0] if k != "probs"}
        return Predictions(np.concatenate(ids).astype(np.int64), all_probs, **extra)


def coordinates_table(cache_dir: str | Path, preds: Predictions) -> Any:
    """Predicted keypoints in the competition's coordinate format (`study_id, series_id,
    instance_number, condition, level, x, y`): x/y on the series grid of the crop's centre
    slice, which is the native image unless the reader resampled that slice. One row per target
    whose crop exists."""
    import pandas as pd

    from lsdc.constants import CONDITIONS, LEVELS, condition_to_title, level_to_title
    from lsdc.data.multitask import GROUPS
    from lsdc.preprocess.cache import StudyCache
    from lsdc.preprocess.multitask import load_multitask_study

    if preds.keypoints is None:
        raise ValueError("these predictions carry no keypoints (not a multitask run)")
    cache = StudyCache.open(cache_dir)
    targets_of = {k: t for g in GROUPS for k, t in zip(g.keys, g.targets, strict=True)}
    rows = []
    for sid, points in zip(preds.study_ids, preds.keypoints, strict=True):
        for c in load_multitask_study(cache, int(sid)):
            if not c.present:
                continue
            h, w = c.image.shape[-2:]
            idx = list(targets_of[c.key])
            native = c.to_native(points[idx] * np.array([w, h]) - 0.5)
            centre = int(c.instance_numbers[len(c.instance_numbers) // 2])
            for j, (x, y) in zip(idx, native, strict=True):
                cond, level = CONDITIONS[j // len(LEVELS)], LEVELS[j % len(LEVELS)]
                rows.append(
                    (int(sid), int(c.series_id), centre, condition_to_title(cond),
                     level_to_title(level), round(float(x), 2), round(float(y), 2))
                )  # fmt: skip
    columns = ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]
    return pd.DataFrame(rows, columns=columns)


@dataclass
class SubmissionReport:
    path: Path
    predicted: int  # studies predicted by the model
    filled: list[int]  # listed studies absent from the cache, given the training class prior
    coordinates: Path | None = None  # predicted keypoints (multitask runs)


def predict_submission(
    run_dir: str | Path,
    cache_dir: str | Path,
    out_csv: str | Path,
    *,
    series_descriptions: str | Path | None = None,
    tta_flip: bool = False,
    device: str = "auto",
    batch_size: int = 8,
    coordinates_out: str | Path | None = None,
) -> SubmissionReport:
    """Run folder + preprocessed cache -> a complete submission CSV (written atomically).

    A run that predicts keypoints also writes them in the competition's coordinate format to
    `coordinates_out` (default: `<submission stem>_coordinates.csv` beside the submission).

    With `series_descriptions`, every study it lists gets 25 rows: a study the cache lacks
    (its preprocessing failed, see the cache's errors.jsonl) gets the class prior of the run's
    training labels and is named in the report, so the submission stays valid and nothing is
    hidden.
    """
    from lsdc.fileio import ensure_writable, load_npz
    from lsdc.inference.submission import build_submission, write_submission
    from lsdc.io.tables import read_series_descriptions
    from lsdc.training.engine import class_prior

    ensure_writable(Path(out_csv).parent)  # before the inference, not after it
    if coordinates_out is not None:
        ensure_writable(Path(coordinates_out).parent)
    predictor = Predictor.from_run(run_dir, device=device, tta_flip=tta_flip)
    preds = predictor.predict_cache(cache_dir, batch_size=batch_size)
    ids, probs = preds.study_ids.tolist(), preds.probs
    filled: list[int] = []
    if series_descriptions is not None:
        listed = sorted(set(read_series_descriptions(series_descriptions)["study_id"].tolist()))
        cached = set(ids)
        filled = [s for s in listed if s not in cached]
        if filled:
            arrays, _ = load_npz(Path(run_dir) / "oof.npz")
            prior = class_prior(arrays["labels"])
            ids = ids + filled
            probs = np.concatenate([probs, np.broadcast_to(prior, (len(filled), *prior.shape))])
    path = write_submission(build_submission(ids, probs), out_csv)
    coords = None
    if preds.keypoints is not None:
        from lsdc.fileio import atomic_write_text, sibling_csv

        coords = Path(coordinates_out or sibling_csv(out_csv, "coordinates"))
        atomic_write_text(coords, coordinates_table(cache_dir, preds).to_csv(index=False))
    return SubmissionReport(Path(path), len(preds.study_ids), filled, coords)
