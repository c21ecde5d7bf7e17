"""`lsdc train multitask`: the multitask model on a multitask cache, through the shared engine.

Loss (`multitask_loss`): the metric-shaped severity loss (`losses.metric_loss`) on the combined
logits, plus the same loss on each pass alone (auxiliary, so neither pass leans on the other),
plus the keypoint terms: L1 between predicted and true normalised crop coordinates, a
cross-entropy of the heatmap against the true point's cell (heatmap head; CenterNet-like), and a
binary visibility loss. Missing crops, keypoints and labels are masked in every term; the
visibility term counts only studies that have coordinates at all.

Teacher forcing: a training study's second pass is centred on the true keypoints (offset by up
to `data.augment.teacher_jitter` of the window's half side) with a probability that moves
linearly from `data.augment.teacher_start` to `teacher_end` over `teacher_epochs` epochs
(`lsdc.data.multitask`), otherwise on the predicted ones; at validation and inference always on
the predicted ones.

summary.json adds `keypoint_error_mm` (median, p90 and count per series type) of the
out-of-fold keypoints, measured in-plane on the series grid where the study has coordinates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lsdc.config import config_to_dict, save_config
from lsdc.data.multitask import (
    GROUPS,
    MultitaskDataConfig,
    MultitaskDataset,
    collate_multitask,
    mirror_batch,
)
from lsdc.fileio import atomic_write_json
from lsdc.preprocess.cache import StudyCache
from lsdc.training.engine import (
    SUMMARY_FILE,
    CVResult,
    EngineConfig,
    FoldContext,
    FoldProcesses,
    TrainTask,
    is_global_zero,
    resolve_run_config,
    run_cross_validation,
    weighted_class_prior,
)
from lsdc.training.losses import LossConfig, device_constant, masked_mean, metric_loss


@dataclass
class MultitaskModelConfig:
    """Keyword arguments of `lsdc.models.multitask.MultitaskModel`."""

    backbone: str = "resnet18"
    pretrained: bool = False
    pretrained_path: str | None = None
    drop_path_rate: float = 0.0
    feature_dim: int = 128
    hidden_dim: int = 256
    dropout: float = 0.2
    keypoint_head: str = "heatmap"  # heatmap | regression
    # One keypoint head (and refiner map) per crop group, or per series type ("series").
    keypoint_heads: str = "group"
    second_pass: bool = True
    second_backbone: str = "window"  # window (compact CNN) | shared | a timm model name
    # Half side of a second-pass window, fraction of the crop: about 17 mm on a 280-mm sagittal
    # crop, 14 mm on a 100-mm axial one (a canal, a foramen, a recess and their borders).
    window_sagittal: float = 0.06
    window_axial: float = 0.14
    # > 0: the half side of the Sagittal T1 (foraminal) windows instead of `window_sagittal`.
    window_sagittal_t1: float = 0.0
    window_px: int = 32  # window sampled at this size, then upsampled x sr_scale
    upsample: str = "bicubic"  # sr | bicubic | none
    sr_scale: int = 2
    combine: str = "second"  # second | average | learned
    heads: str = "condition"  # condition | side | target: which targets share a classifier
    # Stride of the map the keypoint heatmaps and first-pass features come from (8 or 4).
    fine_stride: int = 8
    # How the window encoder pools ("mean" | "grid": also a coarse map, so it knows where).
    window_pool: str = "mean"
    # > 0: the window encoder also passes on the window's standardised pixels at this size.
    window_pixels: int = 0
    # Channels of the window encoder's stages (each ends by halving the resolution). The reader
    # costs most of a training step (25 windows a study, the first stage at their full
    # resolution); 16/32/64 costs about a third of the default's time (bench/bench_reader.py).
    window_widths: list[int] = field(default_factory=lambda: [32, 64, 128])
    # Refine each keypoint inside its second-pass window (`WindowRefiner`).
    refine: bool = False
    read_refined: bool = False  # the second pass reads at the refined points (with refine)


@dataclass
class MultitaskLossConfig:
    first_weight: float = 0.5  # metric loss of the first pass alone
    second_weight: float = 0.5  # metric loss of the second pass alone
    keypoint_weight: float = 5.0  # L1 of normalised coordinates (errors are ~0.01-0.1)
    heatmap_weight: float = 1.0  # cross-entropy of the heatmap against the true point
    # The heatmap's target: "cell" (all mass on the cell holding the true point) or
    # "bilinear" (the point's bilinear weights on the four nearest cell centres, so the
    # soft-argmax of the target is the point itself, not its cell's centre: with 16 x 16 cells
    # on a sagittal crop a cell is about 17 mm).
    heatmap_target: str = "cell"
    visibility_weight: float = 0.1
    refine_weight: float = 5.0  # L1 of the refined points (model.refine), as keypoint_weight
    # Cross-entropy of the refiner's heatmap against the true point's place in its window
    # (bilinear target; points outside the window do not count). 0: the refiner learns only
    # from the L1 of its soft-argmax, whose nearly flat maps hardly move the points.
    refine_heatmap_weight: float = 0.0


@dataclass
class MultitaskTrainConfig:
    model: MultitaskModelConfig = field(default_factory=MultitaskModelConfig)
    data: MultitaskDataConfig = field(default_factory=MultitaskDataConfig)
    loss: MultitaskLossConfig = field(default_factory=MultitaskLossConfig)
    # From scratch, small batches and a higher rate train the keypoint heads in fewer epochs.
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(lr=1e-3, batch_size=4))
    # A `lsdc train sr` run folder (or a .safetensors file with its sr.json); required when
    # model.upsample=sr. A relative path is looked up beside the run folder's parent first
    # (`../sr` from runs/multitask: what `lsdc fit` writes, so a copied runs folder needs no
    # absolute path), then from the working directory.
    sr_run: str | None = None
    # Start each fold's prior logits (what the targets of an absent crop get) at the metric-
    # weighted class prior of its training studies: left at zero they stayed near 1/3 each,
    # since few training studies lack a crop. (Adding them to every target's logits, as the
    # sequence model's target bias, measured worse on the demo phantom: OOF 0.951 vs 0.850.)
    prior_init: bool = True


# --------------------------------------------------------------------------- loss


def bilinear_cell_weights(points: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Normalised points (M, 2) x/y -> (M, h * w) weights on the cell centres ((j + 0.5) / w)
    whose weighted mean is the point (clamped to the outer centres) and which sum to 1."""
    m = points.shape[0]
    gx = (points[:, 0] * w - 0.5).clamp(0, w - 1)  # in cell-centre units
    gy = (points[:, 1] * h - 0.5).clamp(0, h - 1)
    x0, y0 = gx.floor().long().clamp(max=max(w - 2, 0)), gy.floor().long().clamp(max=max(h - 2, 0))
    fx, fy = gx - x0, gy - y0
    out = points.new_zeros(m, h * w)
    rows = torch.arange(m, device=points.device)
    for dy, wy in ((0, 1 - fy), (1, fy)):
        for dx, wx in ((0, 1 - fx), (1, fx)):
            yy, xx = (y0 + dy).clamp(max=h - 1), (x0 + dx).clamp(max=w - 1)
            out.index_put_((rows, yy * w + xx), wy * wx, accumulate=True)
    return out


def keypoint_losses(
    out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], heatmap_target: str = "cell"
) -> dict[str, torch.Tensor]:
    """Masked keypoint terms: `keypoint_l1` (first pass), `refine_l1` (refined points, when the
    model refines), `heatmap_ce` (heatmap head), `visibility`; each with `n_<term>`, the number
    of keypoints (visibility: of crops' keypoints in studies with coordinates) it averages. A
    term with none in the batch is 0 and still in the graph (`masked_mean`)."""
    pred, true = out.get("keypoints_first", out["keypoints"]).float(), batch["points"].float()
    valid = batch["point_mask"] & out["crop_present"]  # (B, 25)
    terms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    terms["keypoint_l1"] = masked_mean((pred - true).abs().sum(-1), valid.float())
    if "keypoints_first" in out:
        refined = out["keypoints"].float()
        terms["refine_l1"] = masked_mean((refined - true).abs().sum(-1), valid.float())
    nlls, masks = [], []  # per keypoint of every crop with a heatmap
    for g in GROUPS:
        hm = out.get(f"heatmaps_{g.name}")
        if hm is None:
            continue
        targets = device_constant(g.targets, hm.device, torch.long)  # (n, K)
        points = true[:, targets].flatten(0, 2)  # (B*n*K, 2)
        masks.append(valid[:, targets].flatten().float())  # (B*n*K,)
        h, w = hm.shape[-2:]
        logits = hm.float().flatten(0, 1).flatten(1)  # (B*n*K, h*w)
        if heatmap_target == "bilinear":
            target = bilinear_cell_weights(points, h, w)
            nlls.append(-(target * logits.log_softmax(-1)).sum(-1))
        else:
            col = (points[:, 0] * w).long().clamp(0, w - 1)
            row = (points[:, 1] * h).long().clamp(0, h - 1)
            nlls.append(F.cross_entropy(logits, row * w + col, reduction="none"))
    if nlls:
        terms["heatmap_ce"] = masked_mean(torch.cat(nlls), torch.cat(masks))
    nlls, masks = [], []  # per refined keypoint whose true point lies in its window
    for g in GROUPS:
        hm = out.get(f"refine_heatmaps_{g.name}")
        if hm is None:
            continue
        targets = device_constant(g.targets, hm.device, torch.long)
        points = true[:, targets].flatten(0, 2)  # (B*n*K, 2) crop units
        place = out[f"refine_windows_{g.name}"]
        inside = (points - place[:, :2]) / (2 * place[:, 2:]) + 0.5  # window units
        within = ((inside >= 0) & (inside <= 1)).all(-1)
        masks.append((valid[:, targets].flatten() & within).float())
        h, w = hm.shape[-2:]
        target = bilinear_cell_weights(inside.clamp(0, 1), h, w)
        nlls.append(-(target * hm.float().flatten(1).log_softmax(-1)).sum(-1))
    if nlls:
        terms["refine_ce"] = masked_mean(torch.cat(nlls), torch.cat(masks))
    # Visibility is learnt only where the study has coordinates: elsewhere an unknown point is
    # not an invisible one.
    known = (batch["has_coords"][:, None] & out["crop_present"]).float()
    bce = F.binary_cross_entropy_with_logits(
        out["visibility"].float(), batch["point_mask"].float(), reduction="none"
    )
    terms["visibility"] = masked_mean(bce, known)
    return {
        **{name: v for name, (v, _) in terms.items()},
        **{f"n_{name}": n.detach() for name, (_, n) in terms.items()},
    }


def multitask_loss(
    out: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    cfg: MultitaskLossConfig,
    severity: LossConfig,
) -> dict[str, torch.Tensor]:
    """The training loss (module docstring): dict with `loss`, every term (detached) and the
    keypoint terms' `n_<term>`. Every term enters the graph whatever the batch holds (a zero
    weight or an empty term adds 0): under DDP each parameter behind a term must take part in
    every step's backward pass."""
    labels = batch["labels"]
    main = metric_loss(out["logits"], labels, severity)
    total = main["loss"]
    terms = {"severity": main["loss"].detach()}
    # Each pass alone, even at weight 0: with combine="second" the first pass's heads reach
    # the loss only through this term.
    for name, weight in (("first", cfg.first_weight), ("second", cfg.second_weight)):
        if f"logits_{name}" in out:
            value = metric_loss(out[f"logits_{name}"], labels, severity)["loss"]
            total = total + weight * value
            terms[f"severity_{name}"] = value.detach()
    weights = {
        "keypoint_l1": cfg.keypoint_weight,
        "heatmap_ce": cfg.heatmap_weight,
        "visibility": cfg.visibility_weight,
        "refine_l1": cfg.refine_weight,
        "refine_ce": cfg.refine_heatmap_weight,
    }
    for name, value in keypoint_losses(out, batch, cfg.heatmap_target).items():
        if name in weights:
            total = total + weights[name] * value
        terms[name] = value.detach()
    return {"loss": total, **terms}


# --------------------------------------------------------------------------- task


def _make_dataset(
    cache_dir: str, data: MultitaskDataConfig, seed: int, ids: list[int], train: bool
) -> MultitaskDataset:
    return MultitaskDataset(cache_dir, ids, config=data, train=train, seed=seed)


def resolve_sr_run(sr_run: str, run_dir: str | Path | None) -> Path:
    """Where `sr_run` points (see `MultitaskTrainConfig.sr_run`)."""
    path = Path(sr_run)
    if not path.is_absolute() and run_dir is not None and (Path(run_dir) / path).exists():
        return (Path(run_dir) / path).resolve()
    return path.resolve()


def _model_kwargs(cfg: MultitaskTrainConfig, run_dir: str | Path | None) -> dict[str, Any]:
    kwargs = config_to_dict(cfg.model)
    if cfg.model.upsample == "sr":
        if not cfg.sr_run:
            raise ValueError("model.upsample=sr needs sr_run=<a `lsdc train sr` run folder>")
        from lsdc.models.superres import load_sr

        path = resolve_sr_run(cfg.sr_run, run_dir)
        sr = load_sr(path)  # fails here, naming the file, before any training
        kwargs.update(sr_path=str(path), sr_kwargs=sr.kwargs)
    return kwargs


def multitask_task(
    cache_dir: str | Path, cfg: MultitaskTrainConfig, run_dir: str | Path | None = None
) -> TrainTask:
    """A `TrainTask` over the labelled studies of a multitask train cache."""
    if cfg.loss.heatmap_target not in ("cell", "bilinear"):
        raise ValueError(
            f"loss.heatmap_target must be 'cell' or 'bilinear', not {cfg.loss.heatmap_target!r}"
        )
    cache = StudyCache.open(cache_dir)
    if cache.pipeline != "multitask":
        raise ValueError(f"{cache_dir}: a {cache.pipeline!r} cache, not a 'multitask' cache")
    if cache.config.get("split") != "train":
        raise ValueError(f"{cache_dir}: training needs a train-split cache")
    all_ids = cache.study_ids()
    if not all_ids:
        raise ValueError(f"{cache_dir}: the cache holds no studies")
    MultitaskDataset(cache, all_ids[:1])  # refuses an old cache format before anything runs
    labels = cache.labels(all_ids)
    labelled = (labels >= 0).any(axis=1)
    ids = [s for s, ok in zip(all_ids, labelled, strict=True) if ok]
    root = str(Path(cache_dir).resolve())
    return TrainTask(
        name="multitask",
        model_name="multitask",
        model_kwargs=_model_kwargs(cfg, run_dir),
        study_ids=ids,
        labels=labels[labelled],
        make_dataset=partial(_make_dataset, root, cfg.data, cfg.engine.seed),
        collate=collate_multitask,
        mirror_batch=mirror_batch,
        loss_fn=partial(multitask_loss, cfg=cfg.loss, severity=cfg.engine.loss),
        extra={
            "cache_dir": root,
            "cache_config": cache.config,
            "data_config": config_to_dict(cfg.data),
        },
        oof_outputs=("keypoints", "visibility"),
        init_model=_init_prior if cfg.prior_init else None,
    )


def _init_prior(model: Any, labels: np.ndarray) -> None:
    model.init_prior(torch.as_tensor(np.log(weighted_class_prior(labels)), dtype=torch.float32))


# --------------------------------------------------------------------------- keypoint error


def keypoint_errors_mm(
    cache: StudyCache | str | Path, study_ids: Sequence[int], keypoints: np.ndarray
) -> dict[str, np.ndarray]:
    """In-plane error (mm) of predicted keypoints (n, 25, 2), normalised crop x/y in target
    order, against the cache's true keypoints, per series type (only known, present points)."""
    from lsdc.preprocess.multitask import load_multitask_study

    if not isinstance(cache, StudyCache):
        cache = StudyCache.open(cache)
    out: dict[str, list[float]] = {}
    group_targets = {k: t for g in GROUPS for k, t in zip(g.keys, g.targets, strict=True)}
    for sid, pred in zip(study_ids, keypoints, strict=True):
        for c in load_multitask_study(cache, int(sid)):
            if not c.present or not c.keypoint_mask.any():
                continue
            y0, y1, x0, x1 = c.window
            h, w = c.image.shape[-2:]
            true = (c.keypoints + 0.5) / np.array([w, h])  # normalised
            p = pred[list(group_targets[c.key])]
            d = (p - true) * np.array([x1 - x0, y1 - y0])  # series-grid pixels
            row_mm, col_mm = c.pixel_spacing
            mm = np.hypot(d[:, 0] * col_mm, d[:, 1] * row_mm)[c.keypoint_mask]
            out.setdefault(c.series_type, []).extend(mm.tolist())
    return {k: np.asarray(v) for k, v in out.items()}


def summarise_errors(errors: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Median, p90 and count of each series type's errors (and of all of them)."""
    every = np.concatenate(list(errors.values())) if errors else np.empty(0)
    out = {}
    for name, e in {**errors, "all": every}.items():
        if len(e):
            out[name] = {
                "median": float(np.median(e)),
                "p90": float(np.quantile(e, 0.9)),
                "n": len(e),
            }
    return out


# --------------------------------------------------------------------------- entry point


def train_multitask(
    cache_dir: str | Path,
    run_dir: str | Path,
    *,
    folds: int | None = None,
    epochs: int | None = None,
    overrides: Sequence[str] = (),
    config_path: str | Path | None = None,
    callbacks: Sequence[Any] = (),
    fold_workers: int = 1,
    fold_context: FoldContext | None = None,
) -> CVResult:
    """Cross-validate the multitask model on `cache_dir` into `run_dir` (resumable); on CPU,
    `fold_workers` folds side by side (`FoldProcesses`, with `fold_context`)."""
    import json

    cfg, saved = resolve_run_config(
        MultitaskTrainConfig, run_dir, folds=folds, epochs=epochs, overrides=overrides,
        config_path=config_path,
    )  # fmt: skip
    make_task = partial(multitask_task, cache_dir, cfg, saved.parent)
    task = make_task()
    if is_global_zero():
        save_config(cfg, saved)
    parallel = FoldProcesses(fold_workers, make_task, fold_context)
    result = run_cross_validation(saved.parent, task, cfg.engine, callbacks, parallel)
    if not is_global_zero():
        return result  # the same result; rank 0 writes its keypoint error
    errors = keypoint_errors_mm(cache_dir, result.study_ids, result.outputs["keypoints"])
    summary_path = saved.parent / SUMMARY_FILE
    summary = json.loads(summary_path.read_text())
    summary["keypoint_error_mm"] = summarise_errors(errors)
    atomic_write_json(summary_path, summary)
    return result
