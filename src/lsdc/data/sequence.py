"""Torch dataset over a sequence cache, with random augmentation after the cache.

Item: `images` (3, N, H, W) float32 standardised, `series_mask` (3,) bool, `labels` (25,) int64
(-1 = unlabelled, also for test caches), `study_id` int64 scalar.

The left/right mirror relies on the canonical frame of `lsdc.preprocess.sequence`: sagittal
slices are ordered along +x (patient right -> left) and axial columns run along +x, so mirroring
the patient reverses the sagittal slice order, flips axial columns and swaps every left label
with its right counterpart (`constants.mirror_target`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lsdc.constants import AXIAL_T2, SERIES_TYPES, TARGETS, mirror_target
from lsdc.data.epoch import SharedEpoch
from lsdc.preprocess.cache import StudyCache

# MIRROR_INDEX[j] = index of the target that target j becomes under a left/right flip.
MIRROR_INDEX: tuple[int, ...] = tuple(TARGETS.index(mirror_target(t)) for t in TARGETS)
_AXIAL = SERIES_TYPES.index(AXIAL_T2)

# Cache pixels are uint8 0..255; the model sees (x / 255 - MEAN) / STD.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


@dataclass
class AugmentConfig:
    """Random augmentation (training only). One geometric transform per series, shared by its
    slices, so a stack stays a stack."""

    enabled: bool = True
    flip_prob: float = 0.5  # left/right mirror of the whole study, labels swapped
    rotate_deg: float = 10.0
    scale: float = 0.1  # zoom in 1 +- scale
    shift: float = 0.06  # translation, fraction of the image
    contrast: float = 0.2  # intensity * (1 +- contrast)
    brightness: float = 0.1  # intensity + (+- brightness), in [0, 1] units
    gamma: float = 0.2  # intensity ** exp(+- gamma)


def mirror_images(images: torch.Tensor) -> torch.Tensor:
    """Left/right mirror of study images (..., 3, N, H, W): reverse the slice order of the
    sagittal types, flip the columns of axial."""
    out = images.clone()
    for ti in range(len(SERIES_TYPES)):
        if ti == _AXIAL:
            out[..., ti, :, :, :] = images[..., ti, :, :, :].flip(-1)
        else:
            out[..., ti, :, :, :] = images[..., ti, :, :, :].flip(-3)
    return out


def mirror_sequence_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch of the left/right-mirrored patients (images only; targets map back with
    `mirror_targets`)."""
    return {**batch, "images": mirror_images(batch["images"])}


def mirror_targets(values: torch.Tensor | np.ndarray, dim: int = -1):
    """Swap left/right entries along the 25-target dimension `dim` (labels or probabilities)."""
    index = list(MIRROR_INDEX)
    if isinstance(values, np.ndarray):
        return np.take(values, index, axis=dim)
    return values.index_select(dim, torch.as_tensor(index, device=values.device))


def _random_affine(stack: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """One random rotation/zoom/shift applied to every slice of a stack (N, H, W)."""

    def u(a: float) -> float:
        return (torch.rand((), generator=gen).item() * 2 - 1) * a

    angle = math.radians(u(cfg.rotate_deg))
    zoom = 1.0 + u(cfg.scale)
    tx, ty = u(cfg.shift) * 2, u(cfg.shift) * 2  # affine_grid works in [-1, 1] units
    cos, sin = math.cos(angle) / zoom, math.sin(angle) / zoom
    theta = torch.tensor([[cos, -sin, tx], [sin, cos, ty]], dtype=stack.dtype)
    n, h, w = stack.shape
    grid = F.affine_grid(theta[None].expand(n, 2, 3), [n, 1, h, w], align_corners=False)
    return F.grid_sample(stack[:, None], grid, align_corners=False, padding_mode="zeros")[:, 0]


def _random_intensity(
    stack: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator
) -> torch.Tensor:
    """Contrast, brightness and gamma on [0, 1] pixels."""
    r = torch.rand(3, generator=gen) * 2 - 1
    x = stack.clamp(0, 1) ** math.exp(float(r[0]) * cfg.gamma)
    x = x * (1 + float(r[1]) * cfg.contrast) + float(r[2]) * cfg.brightness
    return x.clamp(0, 1)


def augment_study(
    images: torch.Tensor,
    series_mask: torch.Tensor,
    labels: torch.Tensor,
    cfg: AugmentConfig,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random augmentation of one study: images (3, N, H, W) in [0, 1], labels (25,)."""
    if not cfg.enabled:
        return images, labels
    if torch.rand((), generator=gen).item() < cfg.flip_prob:
        images, labels = mirror_images(images), mirror_targets(labels)
    out = images.clone()
    for ti in range(images.shape[0]):
        if not bool(series_mask[ti]):
            continue  # hidden from the model anyway
        stack = _random_affine(images[ti], cfg, gen)
        out[ti] = _random_intensity(stack, cfg, gen)
    return out, labels


class SequenceDataset(Dataset):
    """Studies of a sequence cache. `augment` (None = off) is applied per item with a generator
    seeded by (seed, epoch, index), so runs are reproducible; call `set_epoch` each epoch."""

    def __init__(
        self,
        cache: StudyCache | str | Path,
        study_ids: Sequence[int] | None = None,
        *,
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.cache = cache if isinstance(cache, StudyCache) else StudyCache.open(cache)
        if self.cache.pipeline != "sequence":
            raise ValueError(f"{self.cache.root}: a {self.cache.pipeline!r} cache, not 'sequence'")
        self.study_ids = self.cache.select(study_ids)
        self.augment = augment
        self.seed = seed
        self._epoch = SharedEpoch()

    @property
    def epoch(self) -> int:
        return self._epoch.get()

    def set_epoch(self, epoch: int) -> None:
        """Seen by loader workers too, persistent ones included (`SharedEpoch`)."""
        self._epoch.set(epoch)

    def __len__(self) -> int:
        return len(self.study_ids)

    def labels(self) -> np.ndarray:
        """(n, 25) int label codes of every study, -1 where unlabelled (labels only)."""
        return self.cache.labels(self.study_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sid = self.study_ids[index]
        try:
            arrays, _ = self.cache.load(sid)
        except Exception as exc:
            raise RuntimeError(f"{self.cache.path(sid)}: cannot read study {sid}: {exc}") from exc
        images = torch.from_numpy(arrays["images"].astype(np.float32) / 255.0)  # (3, N, H, W)
        mask = torch.from_numpy(arrays["series_mask"].astype(bool))
        if "labels" in arrays:
            labels = torch.from_numpy(arrays["labels"].astype(np.int64))
        else:
            labels = torch.full((len(TARGETS),), -1, dtype=torch.int64)
        if self.augment is not None and self.augment.enabled:
            gen = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.epoch * 10_007 + index) % (2**63)
            )
            images, labels = augment_study(images, mask, labels, self.augment, gen)
        images = (images - PIXEL_MEAN) / PIXEL_STD
        images = images * mask[:, None, None, None]  # missing series: exact zeros
        return {
            "images": images,
            "series_mask": mask,
            "labels": labels,
            "study_id": torch.tensor(sid, dtype=torch.int64),
        }


def collate_sequence(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack items: images (B, 3, N, H, W), series_mask (B, 3), labels (B, 25), study_id (B,)."""
    return {key: torch.stack([it[key] for it in items]) for key in items[0]}
