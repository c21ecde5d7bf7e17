"""timm feature extractors: image batch (N, C, H, W) -> pooled features (N, num_features).

Pretrained weights are loaded only from what the user has: a local file (`pretrained_path`,
.safetensors or a torch state dict) or timm's hub cache. Offline without a file, asking for
pretrained weights fails at once with a clear message instead of hanging on a download.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn


class PretrainedWeightsUnavailable(RuntimeError):
    """pretrained=True but no local weights file and the hub is unreachable (offline)."""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from lsdc.fileio import read_safetensors

        return read_safetensors(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Some published files wrap the weights ({"state_dict": ...} or {"model": ...}).
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


class Backbone(nn.Module):
    """A timm model without classifier; `num_features` is the width of what `forward` returns."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        # timm: `head_hidden_size` is the real pooled width when a model keeps a head conv after
        # pooling (MobileNetV3: 1024 vs num_features 288); otherwise num_features.
        self.num_features = int(getattr(model, "head_hidden_size", None) or model.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, C, H, W) -> (N, num_features)
        return self.model(x)


class SpatialBackbone(nn.Module):
    """A timm model as a feature-map extractor: `forward(x)` returns the fine map (stride
    `fine_stride`, 8 by default) and the last (coarsest) map, `(N, fine_channels, H/8, W/8)`
    and `(N, num_features, H/32, W/32)` for the usual reductions; the model keeps its own
    parameter names, so the same pretrained files load as into `Backbone`."""

    def __init__(self, model: nn.Module, fine_stride: int = 8) -> None:
        super().__init__()
        self.model = model
        info = list(model.feature_info)
        # The shallowest stage at stride >= fine_stride: 8 is fine enough to place a keypoint
        # and deep enough to mean something on large inputs; small inputs need 4 (a 64-px crop
        # gives an 8 x 8 map at stride 8, about one cell per lumbar level).
        fine = next((i for i, f in enumerate(info) if f["reduction"] >= fine_stride), len(info) - 1)
        self.indices = sorted({fine, len(info) - 1})
        self.fine_channels = int(info[fine]["num_chs"])
        self.num_features = int(info[-1]["num_chs"])
        self.fine_reduction = int(info[fine]["reduction"])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        return maps[0], maps[-1]


def create_spatial_backbone(
    name: str,
    in_chans: int = 3,
    pretrained: bool = False,
    pretrained_path: str | Path | None = None,
    drop_path_rate: float = 0.0,
    fine_stride: int = 8,
) -> SpatialBackbone:
    """A timm model returning feature maps (see `SpatialBackbone`); weights as `create_backbone`."""
    return SpatialBackbone(
        create_backbone(name, in_chans, pretrained, pretrained_path, drop_path_rate).model,
        fine_stride,
    )


def create_backbone(
    name: str,
    in_chans: int = 1,
    pretrained: bool = False,
    pretrained_path: str | Path | None = None,
    drop_path_rate: float = 0.0,
) -> Backbone:
    """A pooled timm feature extractor (no classifier) taking `in_chans` channels."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}")
    kwargs: dict[str, object] = {"num_classes": 0, "in_chans": in_chans}
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    if pretrained_path is not None:
        model = timm.create_model(name, pretrained=False, **kwargs)
        state = load_state_dict_file(pretrained_path)
        _load_pretrained_into(model, state, in_chans, pretrained_path)
        return Backbone(model)
    if pretrained:
        if _hub_offline():
            raise PretrainedWeightsUnavailable(
                f"pretrained weights for {name!r} requested but HF_HUB_OFFLINE is set and no "
                "local file was given; pass pretrained_path=<file.safetensors> or "
                "pretrained=False to train from scratch"
            )
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # network or missing-weights errors from timm/huggingface_hub
            raise PretrainedWeightsUnavailable(
                f"could not load pretrained weights for {name!r}: {exc}"
            ) from exc
        return Backbone(model)
    return Backbone(timm.create_model(name, pretrained=False, **kwargs))


def _load_pretrained_into(
    model: nn.Module, state: dict[str, torch.Tensor], in_chans: int, path: str | Path
) -> None:
    """Load weights, adapting the first conv to `in_chans` and dropping the classifier."""
    from timm.models import adapt_input_conv

    own = model.state_dict()
    fitted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in own:
            continue  # classifier and other heads of the published model
        if value.shape != own[key].shape and value.ndim == 4 and value.shape[1] != in_chans:
            value = adapt_input_conv(in_chans, value)
        if value.shape != own[key].shape:
            raise ValueError(
                f"{path}: weight {key} has shape {tuple(value.shape)}, "
                f"model expects {tuple(own[key].shape)}"
            )
        fitted[key] = value
    missing = sorted(k for k in set(own) - set(fitted) if not k.endswith("num_batches_tracked"))
    if missing:
        raise ValueError(f"{path}: {len(missing)} backbone weights missing, e.g. {missing[:3]}")
    model.load_state_dict(fitted, strict=False)


class WindowEncoder(nn.Module):
    """A compact CNN for the small second-pass windows (24-64 px): three stages of two 3x3
    convolutions, each halving the resolution only after it has looked at full detail, then
    pooling. ImageNet backbones reduce a 48-px window to 2x2 cells within their stem;
    millimetre-scale narrowing needs the early, full-resolution layers that this keeps.

    `pool="mean"`: global average pooling alone. `pool="grid"`: the average pool plus a coarse
    `grid` x `grid` map of `grid_channels` reduced channels, flattened, so the head knows *where*
    in the window a feature lies: the window is centred on one level's structure, but a global
    average also pools the neighbouring levels' canal or foramina at its edges, which a linear
    reader of the raw pixels tells apart. `pixels` > 0 appends the window's standardised pixels
    themselves. (N, in_chans, P, P) -> (N, num_features)."""

    def __init__(
        self,
        in_chans: int = 3,
        widths: tuple[int, ...] = (32, 64, 128),
        pool: str = "mean",
        grid: int = 4,
        grid_channels: int = 32,
        pixels: int = 0,
    ) -> None:
        super().__init__()
        if pool not in ("mean", "grid"):
            raise ValueError(f"pool must be 'mean' or 'grid', not {pool!r}")
        layers: list[nn.Module] = []
        c = in_chans
        for w in widths:
            for a in (c, w):
                layers += [nn.Conv2d(a, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)]
                layers.append(nn.ReLU(inplace=True))
            layers.append(nn.MaxPool2d(2))
            c = w
        self.features = nn.Sequential(*layers)
        self.num_features = c
        self.grid: nn.Module | None = None
        if pool == "grid":
            self.grid = nn.Sequential(
                nn.Conv2d(c, grid_channels, 1, bias=False),
                nn.BatchNorm2d(grid_channels),
                nn.ReLU(inplace=True),
                nn.AdaptiveAvgPool2d(grid),
                nn.Flatten(),
            )
            self.num_features += grid_channels * grid * grid
        # The window's own pixels, area-averaged to `pixels` x `pixels` and standardised per
        # pixel across the batch (BatchNorm1d): what a linear probe reads. On tens of studies a
        # regularised linear reader of these beats the convolutions trained from scratch.
        self.pixels: nn.Module | None = None
        if pixels > 0:
            self.pixels = nn.Sequential(
                nn.AdaptiveAvgPool2d(pixels), nn.Flatten(), nn.BatchNorm1d(in_chans * pixels**2)
            )
            self.num_features += in_chans * pixels**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)  # (N, C, P/8, P/8)
        parts = [f.mean(dim=(2, 3))]
        if self.grid is not None:
            parts.append(self.grid(f))
        if self.pixels is not None:
            parts.append(self.pixels(x))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
