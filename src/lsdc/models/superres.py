"""A compact super-resolution network (EDSR/ESPCN-like) for the multitask second pass
(DESIGN §4, multitask step 4): small windows cropped around predicted keypoints are upsampled
x2 or x4 before they are classified.

The network predicts a residual on top of bicubic upsampling (global skip), and its last
convolution starts at zero, so an untrained network *is* bicubic upsampling and training can
only move it away from that baseline where the data says so. The model is linear in its output
(no clamp): `upsample` clamps to [0, 1] for use on images.

Weights are trained self-supervised on the multitask cache (`lsdc.training.superres`) and load
from safetensors only, checked against their recorded SHA-256 (`load_sr`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lsdc.models.registry import register_model

SR_JSON = "sr.json"
SR_WEIGHTS = "model.safetensors"
SCALES = (2, 4)
UPSAMPLE_MODES = ("sr", "bicubic", "none")


class _ResBlock(nn.Module):
    """conv-ReLU-conv with a scaled residual (EDSR): the small scale keeps deep stacks stable
    without batch norm, which would shift the intensities the global skip relies on."""

    def __init__(self, channels: int, res_scale: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.res_scale = res_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res_scale * self.conv2(F.relu(self.conv1(x)))


@register_model("superres")
class SuperResolution(nn.Module):
    """(N, C, h, w) images in [0, 1] -> (N, C, h*scale, w*scale): bicubic upsampling plus a
    learned residual.

    With `in_chans=1` any number of channels is accepted: each channel (e.g. each of the 3
    slices of a crop) is an image of its own, folded into the batch. With `in_chans > 1` the
    input must have exactly `in_chans` channels.
    """

    def __init__(
        self,
        scale: int = 2,
        channels: int = 32,
        num_blocks: int = 4,
        in_chans: int = 1,
        res_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if scale not in SCALES:
            raise ValueError(f"scale must be one of {SCALES}, not {scale!r}")
        if channels < 1 or num_blocks < 0 or in_chans < 1:
            raise ValueError(
                f"channels ({channels}) and in_chans ({in_chans}) must be >= 1, "
                f"num_blocks ({num_blocks}) >= 0"
            )
        self.scale = scale
        self.channels = channels
        self.num_blocks = num_blocks
        self.in_chans = in_chans
        # EDSR's 0.1 residual scaling stabilises 32+ block, 256-channel networks; at this size
        # it mostly slows learning (toy data, 300 steps, 32 ch x 4 blocks: +0.7 dB over
        # bicubic at 0.1, +4.7 dB at 1.0), hence 1.0 by default.
        self.res_scale = res_scale
        self.head = nn.Conv2d(in_chans, channels, 3, padding=1)
        self.body = nn.Sequential(
            *(_ResBlock(channels, res_scale) for _ in range(num_blocks)),
            nn.Conv2d(channels, channels, 3, padding=1),
        )
        # One conv + PixelShuffle(2) per factor of 2 (ESPCN): sub-pixel convolution avoids the
        # checkerboard artefacts of transposed convolutions.
        stages: list[nn.Module] = []
        for _ in range(scale.bit_length() - 1):
            stages += [nn.Conv2d(channels, 4 * channels, 3, padding=1), nn.PixelShuffle(2)]
        self.upsampler = nn.Sequential(*stages)
        self.tail = nn.Conv2d(channels, in_chans, 3, padding=1)
        # Zero residual at start: the untrained network equals bicubic upsampling.
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    @property
    def kwargs(self) -> dict[str, Any]:
        """The constructor arguments (what `sr.json` stores)."""
        return {
            "scale": self.scale,
            "channels": self.channels,
            "num_blocks": self.num_blocks,
            "in_chans": self.in_chans,
            "res_scale": self.res_scale,
        }

    def _fold(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N*C, 1, h, w) for a single-channel network; checked otherwise."""
        if x.ndim != 4:
            raise ValueError(f"expected (N, C, h, w) input, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        if self.in_chans == 1:
            return x.reshape(n * c, 1, h, w)
        if c != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {c}")
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Folded input (M, in_chans, h, w) -> features (M, channels, h, w) at low resolution."""
        feats = self.head(x - 0.5)  # centre [0, 1] intensities around zero
        return feats + self.body(feats)

    def forward_head(self, feats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Features (M, channels, h, w) and folded input (M, in_chans, h, w) -> output
        (M, in_chans, h*scale, w*scale): bicubic(x) + residual."""
        residual = self.tail(self.upsampler(feats))  # (M, in_chans, h*s, w*s)
        base = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return base + residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, C, h*scale, w*scale); not clamped."""
        folded = self._fold(x)  # checks the shape
        n, c, h, w = x.shape
        out = self.forward_head(self.forward_features(folded), folded)
        return out.reshape(n, c, h * self.scale, w * self.scale)


def upsample(x: torch.Tensor, scale: int, mode: str, sr: nn.Module | None = None) -> torch.Tensor:
    """Upsample images (N, C, h, w) in [0, 1] by `scale`.

    mode "sr": the super-resolution network `sr` (its scale must match), clamped to [0, 1];
    "bicubic": bicubic interpolation, clamped to [0, 1]; "none": `x` unchanged (for
    comparisons without upsampling). Gradients flow as usual; wrap in `torch.no_grad()` for
    inference.
    """
    if mode == "none":
        return x
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"upsample mode must be one of {UPSAMPLE_MODES}, not {mode!r}")
    if x.ndim != 4:
        raise ValueError(f"expected (N, C, h, w) input, got shape {tuple(x.shape)}")
    if mode == "bicubic":
        out = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
        return out.clamp(0.0, 1.0)
    if sr is None:
        raise ValueError("upsample mode 'sr' needs a super-resolution model (sr=...)")
    sr_scale = getattr(sr, "scale", scale)
    if sr_scale != scale:
        raise ValueError(f"the super-resolution model upsamples x{sr_scale}, not x{scale}")
    return sr(x).clamp(0.0, 1.0)


def _read_kwargs(path: Path) -> dict[str, Any]:
    try:
        kwargs = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(kwargs, dict):
        raise ValueError(f"{path}: expected a JSON object of SuperResolution arguments")
    return kwargs


def load_sr(path: str | Path, kwargs: Mapping[str, Any] | None = None) -> SuperResolution:
    """A trained `SuperResolution` in eval mode, from safetensors weights (never a pickle).

    `path` is a run folder of `train_sr` (its `sr.json` and `model.safetensors`), or a
    `.safetensors` file whose constructor arguments come from `kwargs` when given, else from a
    `sr.json` next to it.
    """
    from lsdc.models.weights import load_weights

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such super-resolution run folder or weights file")
    if path.is_dir():
        weights, kwargs_file = path / SR_WEIGHTS, path / SR_JSON
    else:
        weights, kwargs_file = path, path.with_name(SR_JSON)
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no such super-resolution weights file")
    if kwargs is None:
        if not kwargs_file.is_file():
            raise FileNotFoundError(
                f"{kwargs_file}: missing; it holds the SuperResolution arguments of {weights} "
                "(or pass kwargs=...)"
            )
        kwargs, source = _read_kwargs(kwargs_file), str(kwargs_file)
    else:
        source = "kwargs"
    try:
        model = SuperResolution(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: bad SuperResolution arguments {dict(kwargs)}: {exc}") from exc
    load_weights(model, weights, what=f"SuperResolution({dict(kwargs)}) from {source}")
    return model.eval()
