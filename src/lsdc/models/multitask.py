"""Multitask model: keypoints and severity on 3-slice crops, then a second look at each keypoint.

Input: a batch of `lsdc.data.multitask` (two crop groups, sagittal and axial, each a dense
(B, n, 3, H, W) tensor in [0, 1]; fine sources for the second pass; `teacher` flags and true
`points` when teacher forcing). Every per-keypoint output is in target order (25 = `TARGETS`):
each target has exactly one keypoint, in one crop.

First pass, per crop: a timm backbone with the 3 slices as channels gives a fine map (stride
`fine_stride`: 8, or 4 for small inputs, where a 64-px sagittal crop at stride 8 is an 8 x 8 grid,
about one cell per lumbar level) and a coarse map, fused into one map (`fuse`). The keypoint
head is a heatmap per keypoint with a soft-argmax (`keypoint_head="heatmap"`) or a direct
regression from pooled features (`"regression"`); both give x/y normalised to the crop ([0, 1]
edge to edge) and a visibility logit. The crops of a group share one keypoint head
(`keypoint_heads="group"`), or each series type has its own ("series": Sagittal T1's foramina
and Sagittal T2's canal are different points on different contrasts). Severity of a keypoint
comes from the fused features sampled at its predicted position plus the crop's global features,
through one head per condition and level.

Second pass, per keypoint: a window centred on the predicted keypoint (on the true one where the
batch asks for teacher forcing) is sampled from the finest pixels the batch carries, upsampled
(`upsample`: "sr" with a `lsdc.models.superres` network, "bicubic", or "none", which samples the
window directly at the output size), embedded by the same backbone (`second_backbone="shared"`),
by `WindowEncoder` ("window": a compact CNN that keeps the window's full resolution through its
first layers, where an ImageNet stem would reduce a 48-px window to a few cells) or by a second
timm model, and classified per target. Which targets share a classifier is `heads`: "target"
(one per condition and level, 25 x 3), "side" (left and right share), or "condition" (one per
condition, with a learned per-target embedding so that it still knows the level and side). When
sides share, right-side axial windows are mirrored so that they look like left ones.

With `refine`, a small CNN (`WindowRefiner`) also places each keypoint inside its window (a
heatmap at half the window's resolution, soft-argmax): `keypoints` are then the refined points
and `keypoints_first` the first pass's. With `read_refined` as well, the second pass reads
windows sampled again at the refined points (teacher-forced ones stay on the true points).

The output is the second pass alone (`combine="second"`, the default: the first pass then
serves the keypoints and an auxiliary loss), the average of the two passes' log-probabilities
(a geometric mean of the two predictions; "average") or a learned per-target mix ("learned").
On the benchmark phantom the first pass is the weaker reader (fold 0: 0.81 vs 0.62), averaging
drags the second pass back to 0.68, and the learned mix barely moves from one half. Crops that
do not exist (a missing series) give their targets a learned per-target prior instead.

Outputs (dict): logits (B, 25, 3) combined; logits_first, logits_second (B, 25, 3);
keypoints (B, 25, 2) normalised crop x/y (refined with `refine`; then also keypoints_first);
visibility (B, 25) logits; heatmaps_<group>
(B * n, K, h, w) logits (heatmap head only); crop_present (B, 25) bool.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lsdc.constants import SAGITTAL_T1, SERIES_TYPES, SEVERITIES, TARGETS, mirror_target
from lsdc.data.multitask import GROUPS
from lsdc.models.backbones import WindowEncoder, create_backbone, create_spatial_backbone
from lsdc.models.registry import register_model

N_TARGETS = len(TARGETS)
N_CLASSES = len(SEVERITIES)
# Pixels are [0, 1] in the batch; the networks see (x - MEAN) / STD.
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


def soft_argmax(heatmaps: torch.Tensor) -> torch.Tensor:
    """(N, K, h, w) logits -> (N, K, 2) expected x/y, normalised to [0, 1] edge to edge (cell
    centres at (j + 0.5) / w)."""
    n, k, h, w = heatmaps.shape
    p = heatmaps.float().flatten(2).softmax(-1).reshape(n, k, h, w)
    xs = (torch.arange(w, device=p.device, dtype=p.dtype) + 0.5) / w
    ys = (torch.arange(h, device=p.device, dtype=p.dtype) + 0.5) / h
    return torch.stack([(p.sum(2) * xs).sum(-1), (p.sum(3) * ys).sum(-1)], dim=-1)


def sample_points(fmap: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Bilinear features (N, K, C) of a map (N, C, h, w) at normalised points (N, K, 2)."""
    grid = (points * 2 - 1)[:, :, None, :]  # (N, K, 1, 2) in grid_sample's frame
    out = F.grid_sample(fmap, grid.to(fmap.dtype), align_corners=False, padding_mode="border")
    return out[..., 0].transpose(1, 2)


def window_grid(
    centres: torch.Tensor, half: float | torch.Tensor, size: int, scale_xy: torch.Tensor
) -> torch.Tensor:
    """Sampling grid (N, size, size, 2) of square windows of half-side `half` (normalised to the
    crop; a float, or one per window (N,)) at `centres` (N, 2) normalised; `scale_xy` (N, 2)
    maps the crop frame to a padded source (true size / padded size), both in grid_sample's
    [-1, 1] convention."""
    t = (torch.arange(size, device=centres.device, dtype=centres.dtype) + 0.5) / size * 2 - 1
    gy, gx = torch.meshgrid(t, t, indexing="ij")  # (size, size)
    unit = torch.stack([gx, gy], dim=-1)[None]  # (1, size, size, 2)
    if isinstance(half, torch.Tensor):
        half = half.to(centres.dtype)[:, None, None, None]
    offs = unit * half  # window offsets in crop units
    pts = centres[:, None, None, :] + offs  # (N, size, size, 2) in [0, 1] crop units
    return pts * 2 * scale_xy[:, None, None, :] - 1


class TargetHeads(nn.Module):
    """Linear classifiers; `index` maps each of the 25 targets to its head. Where heads are
    shared by several targets, a learned per-target embedding is added to the features first, so
    a shared head still knows the level and side it reads (N_heads < 25 <=> embedding)."""

    def __init__(self, in_features: int, index: list[int]) -> None:
        super().__init__()
        n = max(index) + 1
        self.register_buffer("index", torch.as_tensor(index, dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(torch.randn(n, in_features, N_CLASSES) * in_features**-0.5)
        self.bias = nn.Parameter(torch.zeros(n, N_CLASSES))
        self.embed = nn.Embedding(N_TARGETS, in_features) if n < N_TARGETS else None
        if self.embed is not None:
            nn.init.zeros_(self.embed.weight)

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """x (N, in_features) features of target `targets` (N,) -> logits (N, 3)."""
        if self.embed is not None:
            x = F.gelu(x + self.embed(targets))
        heads = self.index[targets]
        return torch.einsum("nf,nfc->nc", x, self.weight[heads]) + self.bias[heads]


HEAD_SHARING = ("target", "side", "condition")
COMBINE = ("second", "average", "learned")
KEYPOINT_HEADS = ("group", "series")


def _head_index(heads: str) -> list[int]:
    """Head of each target: its own ("target"), its left counterpart's ("side"), or one per
    condition, all levels and both sides ("condition")."""
    if heads not in HEAD_SHARING:
        raise ValueError(f"heads must be one of {HEAD_SHARING}, not {heads!r}")
    if heads == "target":
        return list(range(N_TARGETS))
    canon = [mirror_target(t) if t.startswith("right_") else t for t in TARGETS]
    if heads == "condition":
        canon = [t.rsplit("_", 2)[0] for t in canon]  # drop the level ("_l1_l2")
    names = list(dict.fromkeys(canon))
    return [names.index(t) for t in canon]


class WindowRefiner(nn.Module):
    """Where in a second-pass window its keypoint lies: a small CNN at half the window's
    resolution, a one-channel heatmap and its soft-argmax. (M, C, P, P) -> (M, 2) x/y
    normalised to the window ([0, 1] edge to edge)."""

    def __init__(self, in_chans: int = 3, width: int = 16, kinds: int = 1) -> None:
        super().__init__()

        def block(a: int, c: int) -> list[nn.Module]:
            return [nn.Conv2d(a, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(True)]

        self.net = nn.Sequential(
            *block(in_chans, width),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            *block(2 * width, 2 * width),
            nn.Conv2d(2 * width, kinds, 1),  # one map per kind of window (series type)
        )

    def heatmap(self, windows: torch.Tensor, kinds: torch.Tensor | None = None) -> torch.Tensor:
        """(M, C, P, P) windows, each of kind `kinds` (M,) (None: all 0) -> (M, 1, P/2, P/2)
        logits of where the keypoint lies."""
        maps = self.net((windows - PIXEL_MEAN) / PIXEL_STD)
        if maps.shape[1] == 1:
            return maps
        if kinds is None:
            kinds = torch.zeros(maps.shape[0], dtype=torch.long, device=maps.device)
        return maps[torch.arange(maps.shape[0], device=maps.device), kinds][:, None]

    def forward(self, windows: torch.Tensor, kinds: torch.Tensor | None = None) -> torch.Tensor:
        return soft_argmax(self.heatmap(windows, kinds))[:, 0]


def _drop_unbuilt_keypoint_head(
    module: MultitaskModel, state_dict: dict[str, torch.Tensor], prefix: str, *_: object
) -> None:
    """Load-time pre-hook: drops the weights of the keypoint head the model does not build,
    which weights saved before it was left out still hold (never trained: no gradient)."""
    for key in module.unbuilt_keys(state_dict, prefix):
        del state_dict[key]


@register_model("multitask")
class MultitaskModel(nn.Module):
    """See the module docstring."""

    def __init__(
        self,
        backbone: str = "resnet18",
        pretrained: bool = False,
        pretrained_path: str | None = None,
        drop_path_rate: float = 0.0,
        feature_dim: int = 128,
        hidden_dim: int = 256,
        dropout: float = 0.2,
        keypoint_head: str = "heatmap",
        keypoint_heads: str = "group",
        second_pass: bool = True,
        second_backbone: str = "window",
        window_sagittal: float = 0.06,
        window_axial: float = 0.14,
        window_sagittal_t1: float = 0.0,
        window_px: int = 32,
        upsample: str = "bicubic",
        sr_scale: int = 2,
        sr_path: str | None = None,
        sr_kwargs: dict | None = None,
        combine: str = "second",
        heads: str = "condition",
        fine_stride: int = 8,
        window_pool: str = "mean",
        window_pixels: int = 0,
        window_widths: tuple[int, ...] | list[int] = (32, 64, 128),
        refine: bool = False,
        read_refined: bool = False,
    ) -> None:
        super().__init__()
        if keypoint_head not in ("heatmap", "regression"):
            raise ValueError(
                f"keypoint_head must be 'heatmap' or 'regression', not {keypoint_head!r}"
            )
        if upsample not in ("sr", "bicubic", "none"):
            raise ValueError(f"upsample must be 'sr', 'bicubic' or 'none', not {upsample!r}")
        if keypoint_heads not in KEYPOINT_HEADS:
            raise ValueError(
                f"keypoint_heads must be one of {KEYPOINT_HEADS}, not {keypoint_heads!r}"
            )
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, not {combine!r}")
        self.keypoint_head = keypoint_head
        self.second_pass = second_pass
        self.set_windows(window_sagittal, window_axial, window_sagittal_t1)
        self.window_px = window_px
        self.upsample_mode = upsample
        self.sr_scale = sr_scale
        self.combine = combine
        # Right-side axial windows are mirrored whenever a head reads both sides.
        self.mirror_right = heads != "target"

        self.backbone = create_spatial_backbone(
            backbone, 3, pretrained, pretrained_path, drop_path_rate, fine_stride
        )
        fc, nf, d = self.backbone.fine_channels, self.backbone.num_features, feature_dim
        self.lateral_fine = nn.Conv2d(fc, d, 1)
        self.lateral_coarse = nn.Conv2d(nf, d, 1)
        self.fuse = nn.Sequential(
            nn.Conv2d(d, d, 3, padding=1, bias=False), nn.BatchNorm2d(d), nn.ReLU(inplace=True)
        )
        self.global_proj = nn.Sequential(nn.Linear(nf, d), nn.LayerNorm(d), nn.GELU())
        k_of = {g.name: len(g.targets[0]) for g in GROUPS}
        # Which keypoint head each crop uses: one per group, or one per series type within it
        # (`keypoint_heads="series"`: Sagittal T1's foramina and Sagittal T2's canal are other
        # points on other contrasts, yet share the sagittal group's shape). The refiner's maps
        # follow the same choice, over all series types.
        self.kp_heads_of: dict[str, int] = {}
        for g in GROUPS:
            kinds = list(dict.fromkeys(g.series)) if keypoint_heads == "series" else [None]
            self.kp_heads_of[g.name] = len(kinds)
            local = [kinds.index(st) if keypoint_heads == "series" else 0 for st in g.series]
            kind = [SERIES_TYPES.index(st) if keypoint_heads == "series" else 0 for st in g.series]
            self.register_buffer(f"kp_head_{g.name}", torch.as_tensor(local), persistent=False)
            self.register_buffer(f"refine_kind_{g.name}", torch.as_tensor(kind), persistent=False)
        # Keypoint heads per group (their K differ: 5 sagittal, 2 axial). Only the head in use
        # is built: one without gradients stalls DDP's gradient reduction. (Weights saved when
        # both were built still load: `_drop_unbuilt_keypoint_head`.)
        if keypoint_head == "heatmap":
            self.heatmap = nn.ModuleDict(
                {g: nn.Conv2d(d, self.kp_heads_of[g] * k, 1) for g, k in k_of.items()}
            )
        else:
            self.regress = nn.ModuleDict(
                {g: nn.Linear(d, self.kp_heads_of[g] * 2 * k) for g, k in k_of.items()}
            )
        self.register_load_state_dict_pre_hook(_drop_unbuilt_keypoint_head)
        self.visible = nn.ModuleDict({g: nn.Linear(d, k) for g, k in k_of.items()})
        index = _head_index(heads)
        self.first_mlp = nn.Sequential(nn.Linear(2 * d, hidden_dim), nn.GELU(), nn.Dropout(dropout))
        self.first_heads = TargetHeads(hidden_dim, index)
        # What an absent crop's targets get; few training studies lack a crop, so where it
        # starts matters (`init_prior`).
        self.prior_logits = nn.Parameter(torch.zeros(N_TARGETS, N_CLASSES))

        self.refiner: nn.Module | None = None
        self.read_refined = bool(read_refined and refine and second_pass)
        if second_pass:
            if second_backbone == "shared":
                self.second = None
                n2 = nf
            elif second_backbone == "window":
                self.second = WindowEncoder(
                    3, tuple(window_widths), pool=window_pool, pixels=window_pixels
                )
                n2 = self.second.num_features
            else:
                self.second = create_backbone(second_backbone, 3, pretrained=False)
                n2 = self.second.num_features
            self.second_mlp = nn.Sequential(
                nn.Linear(n2, hidden_dim), nn.GELU(), nn.Dropout(dropout)
            )
            self.second_heads = TargetHeads(hidden_dim, index)
            # Local refinement: a heatmap over each window places its keypoint at the
            # window's finer pixels (a first-pass cell on a 64-px sagittal crop is ~17 mm).
            kinds = len(SERIES_TYPES) if keypoint_heads == "series" else 1
            self.refiner = WindowRefiner(3, kinds=kinds) if refine else None
            if combine == "learned":
                self.mix = nn.Parameter(torch.zeros(N_TARGETS))  # per-target weight, sigmoid
            self.sr: nn.Module | None = None
            if upsample == "sr":
                from lsdc.models.superres import SuperResolution, load_sr

                # Training loads the weights of a `lsdc train sr` run (`sr_path`); inference
                # builds the architecture (`sr_kwargs`) and restores the weights from this
                # model's own checkpoint, so a run folder does not depend on the SR run's path.
                if sr_path:
                    self.sr = load_sr(sr_path)
                else:
                    self.sr = SuperResolution(**(sr_kwargs or {"scale": sr_scale}))
                self.sr_scale = int(self.sr.scale)
                for p in self.sr.parameters():
                    p.requires_grad_(False)  # trained on its own task; kept fixed here

        # Target index tensors per group: (n_crops, K).
        for g in GROUPS:
            self.register_buffer(
                f"targets_{g.name}", torch.as_tensor(g.targets, dtype=torch.long), persistent=False
            )
        right_axial = [
            j for g in GROUPS if g.name == "axial" for c in g.targets for j in c
            if TARGETS[j].startswith("right_")
        ]  # fmt: skip
        self.register_buffer(
            "right_axial", torch.as_tensor(right_axial, dtype=torch.long), persistent=False
        )

    def unbuilt_keys(self, state: Mapping[str, torch.Tensor], prefix: str = "") -> list[str]:
        """The keys of `state` that belong to the keypoint head this model does not build
        (weights saved before it was left out): loading drops them, and the check of a
        weights file's tensor names (`lsdc.models.weights`) does not count them."""
        unbuilt = prefix + ("regress." if self.keypoint_head == "heatmap" else "heatmap.")
        return [k for k in state if k.startswith(unbuilt)]

    @torch.no_grad()
    def init_prior(self, log_prior: torch.Tensor) -> None:
        """Start `prior_logits` (25, 3) at a log prior, e.g. the training studies' metric-
        weighted class prior."""
        self.prior_logits.copy_(log_prior.to(self.prior_logits))

    # ------------------------------------------------------------------ timm-style API

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Crops (N, 3, H, W) in [0, 1] -> fused map (N, D, H/s, W/s), s = fine_stride, and
        global features (N, D)."""
        fine, coarse = self.backbone((x - PIXEL_MEAN) / PIXEL_STD)
        top = F.interpolate(self.lateral_coarse(coarse), size=fine.shape[-2:], mode="nearest")
        fmap = self.fuse(self.lateral_fine(fine) + top)
        return fmap, self.global_proj(coarse.mean(dim=(2, 3)))

    def forward_keypoints(
        self, group: str, fmap: torch.Tensor, glob: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Crops of `group` (N = batch x the group's crops, crop-minor) -> (points (N, K, 2)
        normalised, visibility logits (N, K), heatmaps (N, K, h, w))."""
        vis = self.visible[group](glob)
        n, k = vis.shape
        if self.keypoint_head == "heatmap":
            hm = self._own_head(group, self.heatmap[group](fmap))
            return soft_argmax(hm), vis, hm
        xy = self._own_head(group, self.regress[group](glob))
        return xy.reshape(n, k, 2).sigmoid(), vis, None

    def _own_head(self, group: str, out: torch.Tensor) -> torch.Tensor:
        """Every head's output for each crop (N, heads * C, ...) -> its own head's (N, C, ...)."""
        if self.kp_heads_of[group] == 1:
            return out
        n = out.shape[0]
        out = out.reshape(n, self.kp_heads_of[group], -1, *out.shape[2:])
        per_crop = getattr(self, f"kp_head_{group}")
        head = per_crop.repeat(n // per_crop.numel())  # crops are crop-minor in N
        return out[torch.arange(n, device=out.device), head]

    def forward_head(
        self, fmap: torch.Tensor, glob: torch.Tensor, points: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """First-pass logits (N, K, 3) from features at `points` (N, K, 2) plus global ones."""
        n, k = points.shape[:2]
        local = sample_points(fmap, points)  # (N, K, D)
        feats = torch.cat([local, glob[:, None].expand(-1, k, -1)], dim=-1)
        h = self.first_mlp(feats).reshape(n * k, -1)
        return self.first_heads(h, targets.reshape(-1)).reshape(n, k, N_CLASSES)

    def set_windows(self, sagittal: float, axial: float, sagittal_t1: float = 0.0) -> None:
        """Half sides of the second-pass windows, fractions of the crop: one per crop group, and
        for the Sagittal T1 (foraminal) crops `sagittal_t1` where > 0. A foramen is smaller than
        the canal the Sagittal T2 window must take in with its borders. Called on a model
        already moved to a device, the new half sides go there too."""
        self.windows = {"sagittal": sagittal, "axial": axial}
        for g in GROUPS:
            half = [
                sagittal_t1 if sagittal_t1 > 0 and st == SAGITTAL_T1 else self.windows[g.name]
                for st in g.series
            ]
            old = getattr(self, f"half_{g.name}", None)
            device = old.device if old is not None else None
            self.register_buffer(
                f"half_{g.name}", torch.tensor(half, device=device), persistent=False
            )

    def half_sides(self, group: str, sources: int, k: int) -> torch.Tensor:
        """The half side of each of the `k` windows of `sources` crops of `group` (batch-major,
        as the crops are flattened): (sources * k,)."""
        half = getattr(self, f"half_{group}")
        if sources % len(half):
            raise ValueError(f"{sources} {group} sources: not whole studies of {len(half)} crops")
        return half.repeat(sources // len(half)).repeat_interleave(k)

    def windows_at(
        self,
        group: str,
        fine: torch.Tensor,
        fine_hw: torch.Tensor,
        centres: torch.Tensor,
        upsampled: bool = True,
    ) -> torch.Tensor:
        """Second-pass windows: fine sources (N, 3, H, W) padded, their sizes (N, 2) (h, w),
        centres (N, K, 2) normalised -> (N * K, 3, P, P), P = window_px * sr_scale (with
        `upsampled=False`, the sampled window before upsampling)."""
        n, k = centres.shape[:2]
        # The true share of the padded source, per axis (Python divisors: no copy from the host).
        wh = fine_hw.flip(-1).to(centres.dtype)  # (N, 2) true w, h
        scale = torch.stack([wh[:, 0] / fine.shape[-1], wh[:, 1] / fine.shape[-2]], dim=-1)
        out_px = self.window_px * self.sr_scale
        px = out_px if self.upsample_mode == "none" else self.window_px
        grid = window_grid(
            centres.reshape(n * k, 2),
            self.half_sides(group, n, k),
            px,
            scale.repeat_interleave(k, dim=0),
        )
        # A source's K windows stacked down one grid (N, K * px, px): each source is read in
        # place, never copied K times (about 190 MB a sagittal batch at the gpu preset's size).
        grid = grid.reshape(n, k * px, px, 2).to(fine.dtype)
        win = F.grid_sample(fine, grid, align_corners=False, padding_mode="zeros")
        c = win.shape[1]
        win = win.reshape(n, c, k, px, px).transpose(1, 2).reshape(n * k, c, px, px)
        if not upsampled:
            return win
        if self.upsample_mode == "bicubic":
            win = F.interpolate(win, scale_factor=self.sr_scale, mode="bicubic").clamp(0, 1)
        elif self.upsample_mode == "sr":
            assert self.sr is not None
            with torch.no_grad():
                self.sr.eval()
                win = self.sr(win).clamp(0, 1)  # each slice (channel) is one image
        return win

    def embed_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """(M, 3, P, P) in [0, 1] -> pooled features (M, F) of the second-pass backbone."""
        x = (windows - PIXEL_MEAN) / PIXEL_STD
        if self.second is not None:
            return self.second(x)
        return self.backbone(x)[1].mean(dim=(2, 3))

    def read_windows(self, windows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Second-pass logits (M, 3) of windows (M, 3, P, P) in [0, 1] of targets (M,)."""
        return self.second_heads(self.second_mlp(self.embed_windows(windows)), targets)

    # ------------------------------------------------------------------ forward

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ref = batch[f"{GROUPS[0].name}_images"]
        b = ref.shape[0]
        dev = ref.device
        logits1 = ref.new_zeros(b, N_TARGETS, N_CLASSES)
        logits2 = ref.new_zeros(b, N_TARGETS, N_CLASSES)
        keypoints = ref.new_zeros(b, N_TARGETS, 2)
        visibility = ref.new_zeros(b, N_TARGETS)
        present = torch.zeros(b, N_TARGETS, dtype=torch.bool, device=dev)
        out: dict[str, torch.Tensor] = {}
        teacher = batch.get("teacher")
        refined_all = ref.new_zeros(b, N_TARGETS, 2)
        for g in GROUPS:
            images = batch[f"{g.name}_images"]  # (B, n, 3, H, W)
            n = images.shape[1]
            targets = getattr(self, f"targets_{g.name}")  # (n, K)
            k = targets.shape[1]
            tgt = targets[None].expand(b, -1, -1).reshape(b * n, k)
            fmap, glob = self.forward_features(images.flatten(0, 1))
            points, vis, hm = self.forward_keypoints(g.name, fmap, glob)  # (B*n, K, 2)
            if hm is not None:
                out[f"heatmaps_{g.name}"] = hm
            first = self.forward_head(fmap, glob, points.detach(), tgt)  # (B*n, K, 3)
            flat_t = tgt.reshape(b, n * k)
            # Outputs gathered in float32: under autocast the heads give bf16/fp16, and
            # scatter_ needs one dtype (the losses and the metric want float32 anyway).
            first, points, vis = first.float(), points.float(), vis.float()
            logits1.scatter_(1, flat_t[..., None].expand(-1, -1, 3), first.reshape(b, n * k, 3))
            keypoints.scatter_(1, flat_t[..., None].expand(-1, -1, 2), points.reshape(b, n * k, 2))
            visibility.scatter_(1, flat_t, vis.reshape(b, n * k))
            crop_present = batch[f"{g.name}_present"][..., None].expand(-1, -1, k)  # (B, n, K)
            present.scatter_(1, flat_t, crop_present.reshape(b, n * k))
            if not self.second_pass:
                continue
            centres = points.detach().reshape(b, n, k, 2)
            forced = None
            if teacher is not None and "points" in batch:
                true = batch["points"][:, targets]  # (B, n, K, 2)
                if "teacher_jitter" in batch:
                    half = getattr(self, f"half_{g.name}")[None, :, None, None]
                    true = true + batch["teacher_jitter"][:, targets] * half
                forced = teacher[:, None, None] & batch["point_mask"][:, targets]
                centres = torch.where(forced[..., None], true.to(centres.dtype), centres)
            fine = batch[f"{g.name}_fine"].flatten(0, 1)
            fine_hw = batch[f"{g.name}_fine_hw"].flatten(0, 1)
            windows = self.windows_at(g.name, fine, fine_hw, centres.reshape(b * n, k, 2))
            if self.refiner is not None:
                # Window [0, 1] -> crop units: centre + (r - 0.5) * 2 * half side.
                half = self.half_sides(g.name, b * n, k)[:, None].float()
                kinds = getattr(self, f"refine_kind_{g.name}")[None, :, None].expand(b, n, k)
                hm_r = self.refiner.heatmap(windows, kinds.reshape(-1))  # (B*n*K, 1, p, p)
                r = soft_argmax(hm_r)[:, 0]  # (B*n*K, 2)
                # For a heatmap loss on the refiner (`loss.refine_heatmap_weight`): where each
                # window lies, to put the true point into it.
                out[f"refine_heatmaps_{g.name}"] = hm_r[:, 0]
                out[f"refine_windows_{g.name}"] = torch.cat(
                    [
                        centres.reshape(-1, 2).float(),
                        half,
                    ],
                    dim=1,
                )  # (B*n*K, 3): centre x/y and half side, crop units
                refined = centres.reshape(-1, 2) + (r - 0.5) * 2 * half.to(r.dtype)
                refined = refined.float().clamp(0, 1).reshape(b, n * k, 2)
                refined_all.scatter_(1, flat_t[..., None].expand(-1, -1, 2), refined)
                if self.read_refined:
                    # Read again where the refiner puts each point; teacher-forced windows stay
                    # where teaching put them.
                    again = refined.detach().to(centres.dtype).reshape(b, n, k, 2)
                    if forced is not None:
                        again = torch.where(forced[..., None], centres, again)
                    windows = self.windows_at(g.name, fine, fine_hw, again.reshape(b * n, k, 2))
            flat_targets = tgt.reshape(-1)
            if self.mirror_right and g.name == "axial":
                # Right-side windows mirrored: one head reads both sides the same way.
                right = torch.isin(flat_targets, self.right_axial)
                windows = torch.where(right[:, None, None, None], windows.flip(-1), windows)
            second = self.read_windows(windows, flat_targets).float().reshape(b, n * k, 3)
            logits2.scatter_(1, flat_t[..., None].expand(-1, -1, 3), second)
        prior = self.prior_logits[None].expand(b, -1, -1)
        logits1 = torch.where(present[..., None], logits1, prior)
        if self.second_pass:
            logits2 = torch.where(present[..., None], logits2, prior)
            lp1, lp2 = logits1.log_softmax(-1), logits2.log_softmax(-1)
            if self.combine == "learned":
                w = self.mix.sigmoid()[None, :, None]
                logits = w * lp1 + (1 - w) * lp2
            elif self.combine == "average":
                logits = 0.5 * (lp1 + lp2)
            else:
                logits = lp2
        else:
            logits = logits1
        out.update(
            logits=logits,
            logits_first=logits1,
            logits_second=logits2 if self.second_pass else logits1,
            keypoints=keypoints,
            visibility=visibility,
            crop_present=present,
        )
        if self.second_pass and self.refiner is not None:
            # The reported points are the refined ones; the first pass's stay for its loss.
            out.update(keypoints=refined_all, keypoints_first=keypoints)
        return out
