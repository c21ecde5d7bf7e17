"""`lsdc train sr`: self-supervised training of the super-resolution network on a multitask
cache (no pretrained SR weights can be downloaded, so the cache's own slices are the truth).

HR images are the 2-D slices of every present crop (the `hires` window when the cache has one,
else the crop image); the LR input is an antialiased bicubic downsample by `scale` plus
Gaussian noise. The network learns LR -> HR on random patches with an L1 loss; held-out
*studies* (not slices: the 3 slices of a crop are nearly identical) measure PSNR/SSIM of the
network against plain bicubic upsampling of the same LR images.

Run folder:
  config.yaml        the resolved `SRTrainConfig`
  sr.json            SuperResolution keyword arguments (what `load_sr` rebuilds)
  model.safetensors  the trained weights (their SHA-256 in model.safetensors.sha256)
  report.json        PSNR/SSIM of SR and bicubic, image and study counts, seconds, history
  examples.png       held-out images: LR, bicubic, SR, HR side by side
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from lsdc.config import load_config, save_config
from lsdc.fileio import atomic_write_json, portable_text
from lsdc.models.superres import SR_JSON, SR_WEIGHTS, SuperResolution

T = TypeVar("T")

CONFIG_FILE = "config.yaml"
REPORT_FILE = "report.json"
EXAMPLES_FILE = "examples.png"
# Slices flatter than this (blank padding, an empty field of view) teach nothing and give
# unbounded PSNR that would dominate the mean.
MIN_STD = 1e-3
# skimage's SSIM uses a 7x7 window; smaller images cannot be scored.
MIN_EVAL_SIDE = 7


@dataclass
class SRTrainConfig:
    """`lsdc train sr` configuration (dotted overrides, e.g. `steps=500 channels=16`)."""

    scale: int = 2  # 2 or 4
    channels: int = 32
    num_blocks: int = 4
    res_scale: float = 1.0  # residual scaling inside the blocks (EDSR uses 0.1 for big nets)
    patch: int = 48  # HR patch side; a multiple of `scale`
    batch_size: int = 32
    steps: int = 1500
    lr: float = 1e-3  # Adam, cosine decay to zero over `steps`
    val_fraction: float = 0.2  # share of studies held out (chosen by `seed`)
    seed: int = 0
    noise: float = 0.01  # std of the Gaussian noise on the LR input
    # Caps on the slices held in memory (a seeded uniform subset, drawn in one pass over the
    # cache): a study's windows at 512 px hold 2.3 MB as float16, 3.7 GB for 1,600 training
    # studies; 8,000 slices (~0.8 GB) still give each slice a dozen patches over 3,000 steps
    # of 32. 0 = all.
    max_images: int = 8000  # training slices
    max_val_images: int = 2000  # held-out slices scored
    examples: int = 4  # held-out images drawn in examples.png
    device: str = "cpu"  # torch device for training and evaluation


@dataclass
class SRReport:
    run_dir: Path
    psnr_sr: float
    psnr_bicubic: float
    ssim_sr: float
    ssim_bicubic: float
    images_train: int
    images_val: int
    seconds: float


@dataclass
class SRMetrics:
    """Mean PSNR (dB) / SSIM over the same images for the network and bicubic upsampling."""

    psnr_sr: float
    psnr_bicubic: float
    ssim_sr: float
    ssim_bicubic: float
    images: int


# --------------------------------------------------------------------------- data


def _crop_slices(crop: Any) -> np.ndarray:
    """(3, H, W) float32: the highest-resolution window a cached crop has."""
    hires = getattr(crop, "hires", None)
    if isinstance(hires, np.ndarray) and hires.size > 0:
        return hires.astype(np.float32)
    return np.asarray(crop.image, np.float32)


def study_images(cache: Any, study_id: int) -> list[np.ndarray]:
    """The 2-D HR slices (H, W) float32 of every present crop of one study, in crop order;
    near-constant slices are left out."""
    from lsdc.preprocess.multitask import load_multitask_study

    out = []
    for crop in load_multitask_study(cache, study_id):
        if not crop.present:
            continue
        for img in _crop_slices(crop):
            if float(img.std()) >= MIN_STD:
                out.append(np.ascontiguousarray(img))
    return out


def split_studies(
    study_ids: Sequence[int], val_fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """(train, val) study ids: a seeded shuffle, at least one study on each side."""
    ids = sorted(int(s) for s in study_ids)
    if len(ids) < 2:
        raise ValueError(f"need at least 2 studies to hold some out, got {len(ids)}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), not {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = min(max(1, round(val_fraction * len(ids))), len(ids) - 1)
    val = sorted(ids[i] for i in order[:n_val])
    train = sorted(ids[i] for i in order[n_val:])
    return train, val


def reservoir(items: Iterable[T], cap: int, seed: int) -> list[T]:
    """A seeded uniform sample of at most `cap` items (all when `cap` <= 0), in stream order,
    drawn in one pass that never holds more than `cap` items (Algorithm R)."""
    if cap <= 0:
        return list(items)
    rng = np.random.default_rng(seed)
    kept: list[tuple[int, T]] = []
    for i, item in enumerate(items):
        if i < cap:
            kept.append((i, item))
        else:
            j = int(rng.integers(0, i + 1))
            if j < cap:
                kept[j] = (i, item)
    return [item for _, item in sorted(kept, key=lambda t: t[0])]


def _present_crops(cache: Any, study_id: int) -> int:
    """How many crops of a cached study are present, reading only their `present` flags."""
    from lsdc.fileio import reading

    path = cache.path(study_id)
    with reading(path), np.load(path, allow_pickle=False) as z:
        return sum(bool(z[name]) for name in z.files if name.endswith("__present"))


def degrade(
    hr: torch.Tensor, scale: int, noise: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """HR (N, C, H, W), H and W multiples of `scale` -> LR (N, C, H/scale, W/scale): an
    antialiased bicubic downsample (a stand-in for a coarser acquisition) plus Gaussian noise,
    clamped to [0, 1] like the cached images the network will see."""
    h, w = hr.shape[-2:]
    lr = F.interpolate(
        hr, size=(h // scale, w // scale), mode="bicubic", antialias=True, align_corners=False
    )
    if noise > 0:
        lr = lr + noise * torch.randn(lr.shape, generator=generator, dtype=lr.dtype).to(lr.device)
    return lr.clamp(0.0, 1.0)


def _sample_patches(
    images: list[np.ndarray], batch: int, patch: int, rng: np.random.Generator
) -> torch.Tensor:
    """(batch, 1, patch, patch) random HR patches, each from a random image, randomly flipped
    (MRI windows are roughly symmetric under flips, which cheaply multiplies the data)."""
    out = np.empty((batch, 1, patch, patch), np.float32)
    for b in range(batch):
        img = images[int(rng.integers(len(images)))]
        y = int(rng.integers(img.shape[0] - patch + 1))
        x = int(rng.integers(img.shape[1] - patch + 1))
        p = img[y : y + patch, x : x + patch]
        if rng.random() < 0.5:
            p = p[:, ::-1]
        if rng.random() < 0.5:
            p = p[::-1, :]
        out[b, 0] = p
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- train / evaluate


def fit_sr(
    images: Sequence[np.ndarray], cfg: SRTrainConfig, *, progress: bool = False
) -> tuple[SuperResolution, list[float]]:
    """Train a `SuperResolution` on 2-D HR images (H, W) in [0, 1] -> (model in eval mode,
    mean L1 loss per 50 steps). Deterministic for a given `cfg.seed` on CPU."""
    if cfg.patch % cfg.scale or cfg.patch < 2 * cfg.scale:
        raise ValueError(
            f"patch ({cfg.patch}) must be a multiple of scale ({cfg.scale}) and >= 2 * scale"
        )
    # Any float dtype is fine: patches are copied into a float32 batch.
    usable = [np.asarray(im) for im in images if min(im.shape) >= cfg.patch]
    if not usable:
        raise ValueError(f"no training image is at least {cfg.patch} px on each side (patch)")
    device = torch.device(cfg.device)
    with torch.random.fork_rng(devices=[]):
        # Seed only the initialisation, without touching the caller's global RNG state.
        torch.manual_seed(cfg.seed)
        model = SuperResolution(
            scale=cfg.scale,
            channels=cfg.channels,
            num_blocks=cfg.num_blocks,
            in_chans=1,
            res_scale=cfg.res_scale,
        )
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[float] = []
    running = 0.0
    bar = _progress_bar(progress)
    with bar:
        task = bar.add_task("train sr", total=cfg.steps)
        for step in range(cfg.steps):
            hr = _sample_patches(usable, cfg.batch_size, cfg.patch, rng)  # (B, 1, P, P)
            lr = degrade(hr, cfg.scale, cfg.noise, gen)  # (B, 1, P/s, P/s)
            hr, lr = hr.to(device), lr.to(device)
            loss = F.l1_loss(model(lr), hr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach())
            if (step + 1) % 50 == 0 or step + 1 == cfg.steps:
                history.append(running / ((step % 50) + 1))
                running = 0.0
            bar.advance(task)
    return model.eval(), history


def _progress_bar(enabled: bool) -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
    )


def _psnr(pred: np.ndarray, ref: np.ndarray) -> float:
    mse = float(np.mean((pred.astype(np.float64) - ref) ** 2))
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))  # data range 1


def _eval_pairs(
    model: SuperResolution, images: Sequence[np.ndarray], scale: int, noise: float, seed: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(LR, bicubic, SR, HR) numpy images for every scorable image, each HR cropped to a
    multiple of `scale`; the noise is seeded so every run scores the same inputs."""
    from lsdc.models.superres import upsample

    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for img in images:
        h, w = (img.shape[0] // scale) * scale, (img.shape[1] // scale) * scale
        if min(h, w) < max(MIN_EVAL_SIDE, 2 * scale):
            continue
        hr = torch.from_numpy(np.ascontiguousarray(img[:h, :w], np.float32))[None, None]
        lr = degrade(hr, scale, noise, gen)  # (1, 1, h/s, w/s)
        with torch.no_grad():
            bic = upsample(lr, scale, "bicubic")
            sr = upsample(lr.to(device), scale, "sr", model).cpu()
        out.append((lr[0, 0].numpy(), bic[0, 0].numpy(), sr[0, 0].numpy(), hr[0, 0].numpy()))
    return out


def evaluate_sr(
    model: SuperResolution,
    images: Sequence[np.ndarray],
    *,
    noise: float = 0.01,
    seed: int = 0,
) -> SRMetrics:
    """Held-out 2-D HR images (H, W) in [0, 1] -> mean PSNR/SSIM of the network and of bicubic
    upsampling against HR, from the same degraded inputs (`degrade` with `noise`)."""
    from skimage.metrics import structural_similarity

    pairs = _eval_pairs(model, images, model.scale, noise, seed)
    if not pairs:
        raise ValueError(f"no held-out image is large enough to score (>= {MIN_EVAL_SIDE} px)")
    psnr_sr, psnr_bic, ssim_sr, ssim_bic = [], [], [], []
    for _, bic, sr, hr in pairs:
        psnr_sr.append(_psnr(sr, hr))
        psnr_bic.append(_psnr(bic, hr))
        ssim_sr.append(structural_similarity(hr, sr, data_range=1.0))
        ssim_bic.append(structural_similarity(hr, bic, data_range=1.0))
    return SRMetrics(
        psnr_sr=float(np.mean(psnr_sr)),
        psnr_bicubic=float(np.mean(psnr_bic)),
        ssim_sr=float(np.mean(ssim_sr)),
        ssim_bicubic=float(np.mean(ssim_bic)),
        images=len(pairs),
    )


def plot_examples(
    model: SuperResolution,
    images: Sequence[np.ndarray],
    out: str | Path,
    *,
    noise: float = 0.01,
    seed: int = 0,
) -> Path:
    """PNG of a few images, one row each: LR, bicubic, SR, HR (with PSNR in the titles)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = _eval_pairs(model, images, model.scale, noise, seed)
    rows = max(len(pairs), 1)
    fig, axes = plt.subplots(rows, 4, figsize=(10, 2.6 * rows), squeeze=False)
    for r, (lr, bic, sr, hr) in enumerate(pairs):
        panels = [
            (lr, f"LR (1/{model.scale})"),
            (bic, f"bicubic {_psnr(bic, hr):.2f} dB"),
            (sr, f"SR {_psnr(sr, hr):.2f} dB"),
            (hr, "HR"),
        ]
        for ax, (img, title) in zip(axes[r], panels, strict=True):
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(title, fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out


def save_sr(model: SuperResolution, run_dir: str | Path) -> Path:
    """Write `sr.json` and `model.safetensors` (atomically, with its SHA-256) into `run_dir`;
    -> the weights."""
    from lsdc.models.weights import save_weights

    run_dir = Path(run_dir)
    atomic_write_json(run_dir / SR_JSON, model.kwargs)
    return save_weights(model, run_dir / SR_WEIGHTS)


# --------------------------------------------------------------------------- the command


def train_sr(
    cache_dir: str | Path,
    out: str | Path,
    *,
    overrides: Sequence[str] = (),
    config_path: str | Path | None = None,
    progress: bool = False,
) -> SRReport:
    """Train the super-resolution network on a multitask cache into the run folder `out`
    (see the module docstring for its files) -> the held-out PSNR/SSIM of SR and bicubic."""
    from lsdc.preprocess.cache import StudyCache

    start = time.perf_counter()
    cfg = load_config(SRTrainConfig, config_path, overrides)
    cache = StudyCache.open(cache_dir)
    if cache.pipeline != "multitask":
        raise ValueError(f"{cache_dir}: a {cache.pipeline!r} cache, not a 'multitask' cache")
    unreadable: dict[int, str] = {}

    def skip(sid: int, exc: Exception) -> None:  # one bad study file is reported, not fatal
        unreadable[sid] = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"{cache.path(sid)}: skipped ({unreadable[sid]})", stacklevel=3)

    def images(sids: list[int]) -> Iterator[np.ndarray]:
        for sid in sids:
            try:
                crops = study_images(cache, sid)
            except Exception as exc:  # noqa: BLE001
                skip(sid, exc)
                continue
            # float16 (the cache's own precision) halves what the kept slices hold.
            yield from (im.astype(np.float16) for im in crops)

    # The split needs the studies first; their presence flags are a few bytes each, so no
    # study's pixels are read twice, and the kept slices are capped (`reservoir`).
    with_crops = []
    for sid in cache.study_ids():
        try:
            if _present_crops(cache, sid):
                with_crops.append(sid)
        except Exception as exc:  # noqa: BLE001
            skip(sid, exc)
    if len(with_crops) < 2:
        raise ValueError(
            f"{cache_dir}: {len(with_crops)} studies with present crops; super-resolution "
            "training needs at least 2 (one is held out)"
        )
    train_ids, val_ids = split_studies(with_crops, cfg.val_fraction, cfg.seed)
    train_images = reservoir(images(train_ids), cfg.max_images, cfg.seed)
    val_images = reservoir(images(val_ids), cfg.max_val_images, cfg.seed)

    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    model, history = fit_sr(train_images, cfg, progress=progress)
    save_sr(model, run_dir)
    metrics = evaluate_sr(model, val_images, noise=cfg.noise, seed=cfg.seed)
    plot_examples(
        model,
        val_images[:: max(1, len(val_images) // max(cfg.examples, 1))][: cfg.examples],
        run_dir / EXAMPLES_FILE,
        noise=cfg.noise,
        seed=cfg.seed,
    )
    report = SRReport(
        run_dir=run_dir,
        psnr_sr=metrics.psnr_sr,
        psnr_bicubic=metrics.psnr_bicubic,
        ssim_sr=metrics.ssim_sr,
        ssim_bicubic=metrics.ssim_bicubic,
        images_train=len(train_images),
        images_val=metrics.images,
        seconds=time.perf_counter() - start,
    )
    # Relative, as every path of a run folder: it can move with the cache.
    cache_rel = os.path.relpath(Path(cache_dir).resolve(), run_dir.resolve())
    atomic_write_json(
        run_dir / REPORT_FILE,
        {
            **{k: v for k, v in asdict(report).items() if k != "run_dir"},
            "cache_dir": cache_rel,
            "studies_train": train_ids,
            "studies_val": val_ids,
            "studies_unreadable": {
                str(k): portable_text(v, {Path(cache_dir): cache_rel})
                for k, v in unreadable.items()
            },
            "loss_every_50_steps": history,
        },
    )
    return report
