"""Torch dataset over a multitask cache: per study its 8 three-slice crops, keypoints and labels.

Layout. The 8 crops of a study form two groups whose crops share one shape:
  sagittal: Sagittal T1 left and right foraminal, Sagittal T2/STIR spinal (5 keypoints each)
  axial:    Axial T2 at each of the 5 levels (left and right subarticular keypoints)
Each of the 25 targets has exactly one keypoint in exactly one crop (`GROUPS[g].targets`), so
keypoints, masks and per-keypoint outputs are kept in target order (25 = `TARGETS`).

Batching: each group is one dense tensor (B, n_crops, 3, H, W); sagittal and axial inputs may
differ in size (`InputConfig`). Dense per-group tensors were chosen over `torch.nested`, which
timm's convolutions do not accept, and over padding both groups to one shape, which spends
compute on padding. The *fine* sources of the second pass (the native-resolution copies of the
windows, whose size varies by study) are zero-padded to the largest in the batch, with their true
size in `<group>_fine_hw`. Missing crops (`<group>_present` False), keypoints (`point_mask`) and
labels (-1) are masked by the model and the losses.

Item (`MultitaskDataset[i]`), pixels in [0, 1]:
  sagittal_images (3, 3, Hs, Ws)   sagittal_present (3,)   sagittal_fine (3, 3, h, w)
  axial_images (5, 3, Ha, Wa)      axial_present (5,)      axial_fine (5, 3, h, w)
  points (25, 2) x/y normalised to the crop ([0, 1] edge to edge)   point_mask (25,) bool
  has_coords () bool (the study has any keypoint)   teacher () bool (second pass on true points)
  teacher_jitter (25, 2) offsets of the teacher-forced windows, fractions of their half side
  labels (25,) int64 (-1 = unlabelled)   study_id () int64

Augmentation (training only, after the cache): per crop one random affine (rotation, zoom,
shift) and intensity change applied to its first-pass image and its fine source alike, with the
keypoints moved by the same transform. Flips respect anatomy: an in-plane horizontal flip of an
axial crop swaps patient left and right, so its two keypoints and labels swap; the same flip of a
sagittal crop mirrors anterior and posterior and changes no side (off by default: real sagittal
series all face one way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from lsdc.constants import AXIAL_T2, SERIES_TYPES, TARGETS, mirror_target
from lsdc.data.epoch import SharedEpoch
from lsdc.preprocess.cache import StudyCache


@dataclass(frozen=True)
class CropGroup:
    """Crops of one shape: their cache keys and, per crop, the target index of each keypoint."""

    name: str
    keys: tuple[str, ...]
    targets: tuple[tuple[int, ...], ...]  # (n_crops, K) indices into TARGETS
    series: tuple[str, ...]  # series type of each crop


def _groups() -> tuple[CropGroup, CropGroup]:
    from lsdc.preprocess.multitask import crop_key, keypoint_names
    from lsdc.preprocess.slice_relevance import tasks_for

    out = {"sagittal": ([], [], []), "axial": ([], [], [])}
    for st in SERIES_TYPES:
        for task in tasks_for(st):
            keys, targets, series = out["axial" if st == AXIAL_T2 else "sagittal"]
            keys.append(crop_key(st, task))
            targets.append(tuple(TARGETS.index(f"{c}_{lv}") for c, lv in keypoint_names(st, task)))
            series.append(st)
    return tuple(CropGroup(g, tuple(k), tuple(t), tuple(s)) for g, (k, t, s) in out.items())  # type: ignore[return-value]


GROUPS: tuple[CropGroup, ...] = _groups()
SLICES = 3  # slices a crop gives the model (its channels); the cache may hold more
# MIRROR_INDEX[j]: the target that target j becomes when the patient is mirrored left/right.
MIRROR_INDEX: tuple[int, ...] = tuple(TARGETS.index(mirror_target(t)) for t in TARGETS)
_AXIAL_TARGETS = tuple(j for crop in GROUPS[1].targets for j in crop)


@dataclass
class InputConfig:
    """First-pass input size per group (0 = the cache's crop size)."""

    sagittal_size: int = 0
    axial_size: int = 0


@dataclass
class MultitaskAugmentConfig:
    enabled: bool = True
    rotate_deg: float = 10.0
    scale: float = 0.1  # zoom 1 +- scale
    shift: float = 0.05  # translation, fraction of the crop
    contrast: float = 0.2
    brightness: float = 0.1
    gamma: float = 0.2
    axial_flip_prob: float = 0.5  # horizontal flip of an axial crop (swaps left and right)
    sagittal_flip_prob: float = 0.0  # horizontal flip of a sagittal crop (anterior <-> posterior)
    # Second pass on the true keypoints (where known) with this probability at epoch 0, changing
    # linearly to `teacher_end` at `teacher_epochs` and staying there: the second-pass heads
    # learn from well-placed windows, then (teacher_end < 1) also from the predicted ones they
    # will see at inference.
    teacher_start: float = 1.0
    teacher_epochs: int = 3
    teacher_end: float = 0.0
    # A teacher-forced window is centred this far (at most, uniform per axis, a fraction of the
    # window's half side) off the true point: the reader learns to read windows as misplaced as
    # the predicted ones, and the refiner (model.refine) where in a window its point lies.
    teacher_jitter: float = 0.0
    # Slice shift: with this probability a crop's three slices are taken one or more slices
    # off the selected one (up to `slice_shift_max`, as far as the cache holds: a cache made
    # with `selection.neighbours=2` keeps 5 slices), the error slice relevance makes on new
    # studies. The keypoints keep their in-plane position.
    slice_shift_prob: float = 0.0
    slice_shift_max: int = 1


@dataclass
class MultitaskDataConfig:
    input: InputConfig = field(default_factory=InputConfig)
    augment: MultitaskAugmentConfig = field(default_factory=MultitaskAugmentConfig)


# --------------------------------------------------------------------------- geometry helpers


def flip_points_x(points: torch.Tensor) -> torch.Tensor:
    """Normalised (..., 2) x/y points under a horizontal flip of their crop."""
    out = points.clone()
    out[..., 0] = 1.0 - points[..., 0]
    return out


def _random_theta(cfg: MultitaskAugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """A random (2, 3) affine in affine_grid's convention: output point p -> input A p + t."""

    def u(a: float) -> float:
        return (torch.rand((), generator=gen).item() * 2 - 1) * a

    angle = math.radians(u(cfg.rotate_deg))
    zoom = 1.0 + u(cfg.scale)
    c, s = math.cos(angle) / zoom, math.sin(angle) / zoom
    return torch.tensor([[c, -s, u(cfg.shift) * 2], [s, c, u(cfg.shift) * 2]])


def warp(stack: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample (C, H, W) with affine `theta`; outside reads 0."""
    if stack.shape[-1] == 0:
        return stack
    grid = F.affine_grid(theta[None], [1, *stack.shape], align_corners=False)
    return F.grid_sample(stack[None], grid, align_corners=False, padding_mode="zeros")[0]


def warp_points(points: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Normalised (K, 2) points in [0, 1] -> where `warp` with the same `theta` moves them."""
    q = points * 2 - 1  # affine_grid's [-1, 1] frame (align_corners=False)
    a, t = theta[:, :2], theta[:, 2]
    out = torch.linalg.solve(a, (q - t).T).T
    return (out + 1) / 2


def _intensity(x: list[torch.Tensor], cfg: MultitaskAugmentConfig, gen: torch.Generator):
    r = torch.rand(3, generator=gen) * 2 - 1
    g, c, b = math.exp(float(r[0]) * cfg.gamma), 1 + float(r[1]) * cfg.contrast, float(r[2])
    return [((t.clamp(0, 1) ** g) * c + b * cfg.brightness).clamp(0, 1) for t in x]


def _resize(stack: torch.Tensor, size: int) -> torch.Tensor:
    if size <= 0 or stack.shape[-1] == size and stack.shape[-2] == size:
        return stack
    return F.interpolate(stack[None], size=(size, size), mode="bilinear", antialias=True)[0]


# --------------------------------------------------------------------------- dataset


class MultitaskDataset(Dataset):
    """Studies of a multitask cache (see the module docstring). With `train`, augmentation and
    teacher forcing are drawn from a generator seeded by (seed, epoch, index); call `set_epoch`
    each epoch. `teacher=True` forces the second pass onto the true points (where known) without
    augmentation: the ceiling that perfect localisation would reach."""

    def __init__(
        self,
        cache: StudyCache | str | Path,
        study_ids: Sequence[int] | None = None,
        *,
        config: MultitaskDataConfig | None = None,
        train: bool = False,
        seed: int = 0,
        teacher: bool = False,
    ) -> None:
        self.cache = cache if isinstance(cache, StudyCache) else StudyCache.open(cache)
        if self.cache.pipeline != "multitask":
            raise ValueError(f"{self.cache.root}: a {self.cache.pipeline!r} cache, not 'multitask'")
        if int(self.cache.config.get("format", 0)) < 2:
            raise ValueError(
                f"{self.cache.root}: multitask cache format {self.cache.config.get('format')} "
                "predates the model (no labels or native windows); preprocess it again"
            )
        self.study_ids = self.cache.select(study_ids)
        self.cfg = config or MultitaskDataConfig()
        self.train = train
        self.seed = seed
        self.teacher = teacher
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

    def _teacher_prob(self) -> float:
        a = self.cfg.augment
        if a.teacher_epochs <= 0:
            return a.teacher_end
        t = min(1.0, self.epoch / a.teacher_epochs)
        return a.teacher_start + (a.teacher_end - a.teacher_start) * t

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from lsdc.preprocess.multitask import study_crops

        sid = self.study_ids[index]
        try:
            arrays, meta = self.cache.load(sid)  # once: crops and labels from the same read
            crops = {c.key: c for c in study_crops(arrays, meta)}
        except Exception as exc:
            raise RuntimeError(f"{self.cache.path(sid)}: cannot read study {sid}: {exc}") from exc
        gen = None
        if self.train:
            gen = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.epoch * 10_007 + index) % (2**63)
            )
        aug = self.cfg.augment if (self.train and self.cfg.augment.enabled) else None
        points = torch.full((len(TARGETS), 2), float("nan"))
        point_mask = torch.zeros(len(TARGETS), dtype=torch.bool)
        labels = torch.from_numpy(arrays["labels"].astype(np.int64))
        item: dict[str, torch.Tensor] = {}
        for group in GROUPS:
            size = getattr(self.cfg.input, f"{group.name}_size")
            images, fines, present = [], [], []
            for key, targets in zip(group.keys, group.targets, strict=True):
                c = crops[key]
                first = self._first_slice(len(c.image), aug, gen)
                image = torch.from_numpy(c.image[first : first + SLICES])  # (3, S, S)
                fine = (
                    torch.from_numpy(c.hires[first : first + SLICES])
                    if c.hires.shape[-1] > c.image.shape[-1]
                    else image
                )
                h, w = c.image.shape[-2:]
                pts = torch.from_numpy(c.keypoints.astype(np.float32))  # crop pixels
                pts = (pts + 0.5) / torch.tensor([w, h], dtype=torch.float32)
                mask = torch.from_numpy(c.keypoint_mask.astype(bool)) & bool(c.present)
                idx = list(targets)
                if aug is not None and c.present:
                    image, fine, pts, mask, idx = self._augment(
                        group.name, image, fine, pts, mask, idx, labels, aug, gen
                    )
                points[idx] = pts
                point_mask[idx] = mask
                images.append(_resize(image, size))
                fines.append(fine)
                present.append(bool(c.present))
            item[f"{group.name}_images"] = torch.stack(images)
            item[f"{group.name}_fine"] = fines  # type: ignore[assignment]  # padded in collate
            item[f"{group.name}_present"] = torch.tensor(present)
        teacher = self.teacher or (
            gen is not None and torch.rand((), generator=gen).item() < self._teacher_prob()
        )
        jitter = torch.zeros(len(TARGETS), 2)
        if aug is not None and teacher and aug.teacher_jitter > 0:
            jitter = (torch.rand(len(TARGETS), 2, generator=gen) * 2 - 1) * aug.teacher_jitter
        item.update(
            points=torch.nan_to_num(points, nan=0.5),
            point_mask=point_mask,
            has_coords=torch.tensor(bool(point_mask.any())),
            teacher=torch.tensor(bool(teacher)),
            teacher_jitter=jitter,
            labels=labels,
            study_id=torch.tensor(sid, dtype=torch.int64),
        )
        return item

    @staticmethod
    def _first_slice(n: int, aug: MultitaskAugmentConfig | None, gen) -> int:
        """First of the three slices taken from a cached stack of `n` (centre on the selected
        slice; shifted at random in training with `slice_shift_prob`)."""
        start = (n - SLICES) // 2
        room = min(start, aug.slice_shift_max) if aug is not None else 0
        if room > 0 and torch.rand((), generator=gen).item() < aug.slice_shift_prob:
            step = int(torch.randint(1, room + 1, (), generator=gen))
            start += step if torch.rand((), generator=gen).item() < 0.5 else -step
        return start

    @staticmethod
    def _augment(group, image, fine, pts, mask, idx, labels, aug, gen):
        """One crop: flip (with the anatomy's label and point swaps), affine, intensity."""
        same = fine is image  # no finer source: warp once
        flip_p = aug.axial_flip_prob if group == "axial" else aug.sagittal_flip_prob
        if torch.rand((), generator=gen).item() < flip_p:
            image, pts = image.flip(-1), flip_points_x(pts)
            fine = image if same else fine.flip(-1)
            if group == "axial":
                # Patient left <-> right: the keypoints trade places and so do their labels.
                a, b = idx
                labels[[a, b]] = labels[[b, a]]
                pts, mask = pts.flip(0), mask.flip(0)
        theta = _random_theta(aug, gen)
        image = warp(image, theta)
        fine = image if same else warp(fine, theta)
        pts = warp_points(pts, theta)
        inside = ((pts >= 0) & (pts <= 1)).all(dim=1)
        image, fine = _intensity([image, fine], aug, gen)
        return image, image if same else fine, pts, mask & inside, idx


def pad_stack(stacks: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, h_i, w_i) tensors -> zero-padded (N, C, H, W) and their sizes (N, 2) as (h, w)."""
    hw = torch.tensor([list(s.shape[-2:]) for s in stacks], dtype=torch.int64)
    h, w = int(hw[:, 0].max()), int(hw[:, 1].max())
    out = stacks[0].new_zeros((len(stacks), stacks[0].shape[0], h, w))
    for i, s in enumerate(stacks):
        out[i, :, : s.shape[-2], : s.shape[-1]] = s
    return out, hw


def collate_multitask(items: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Stack items; pad each group's fine sources to the batch's largest:
    `<group>_fine` (B, n, 3, H, W) and `<group>_fine_hw` (B, n, 2)."""
    out: dict[str, torch.Tensor] = {}
    for key in items[0]:
        if key.endswith("_fine"):
            flat = [f for it in items for f in it[key]]
            padded, hw = pad_stack(flat)
            n = len(items[0][key])
            out[key] = padded.reshape(len(items), n, *padded.shape[1:])
            out[f"{key}_hw"] = hw.reshape(len(items), n, 2)
        else:
            out[key] = torch.stack([it[key] for it in items])
    return out


def mirror_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch of the left/right-mirrored patients: axial crops flipped horizontally (their
    keypoints swap sides), the left and right Sagittal T1 crops exchanged (a parasagittal image
    looks the same in-plane from either side), targets permuted by `MIRROR_INDEX`. Mapping the
    model's outputs back with `MIRROR_INDEX` gives a prediction of the original patient."""
    out = dict(batch)
    sag = GROUPS[0]
    left = sag.keys.index(next(k for k in sag.keys if "__left_" in k))
    right = sag.keys.index(next(k for k in sag.keys if "__right_" in k))
    order = list(range(len(sag.keys)))
    order[left], order[right] = right, left
    for key in ("sagittal_images", "sagittal_fine", "sagittal_fine_hw", "sagittal_present"):
        if key in batch:
            out[key] = batch[key][:, order]
    for key in ("axial_images", "axial_fine"):
        if key in batch:
            out[key] = _flip_padded(batch[key], batch.get("axial_fine_hw"), key)
    index = torch.as_tensor(MIRROR_INDEX, device=batch["labels"].device)
    for key in ("points", "point_mask", "labels", "teacher_jitter"):
        if key in batch:
            out[key] = batch[key].index_select(1, index)
    ax = torch.as_tensor(_AXIAL_TARGETS, device=index.device)
    if "points" in batch:
        out["points"][:, ax] = flip_points_x(out["points"][:, ax])
    if "teacher_jitter" in batch:  # an offset, not a point: only its sign turns
        out["teacher_jitter"][:, ax, 0] = -out["teacher_jitter"][:, ax, 0]
    return out


def _flip_padded(x: torch.Tensor, hw: torch.Tensor | None, key: str) -> torch.Tensor:
    """Horizontal flip of (B, n, C, H, W) images; padded fine sources flip within their width."""
    if key != "axial_fine" or hw is None or bool((hw[..., 1] == x.shape[-1]).all()):
        return x.flip(-1)
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            h, w = int(hw[b, i, 0]), int(hw[b, i, 1])
            out[b, i, :, :h, :w] = x[b, i, :, :h, :w].flip(-1)
    return out
