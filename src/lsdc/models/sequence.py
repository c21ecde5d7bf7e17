"""Sequence model: 3 series types x N ordered slices -> per-slice timm features -> transformer
encoder over the slice tokens -> 25 x 3 severity logits.

Input `images` (B, T=3, S, H, W) in the order of `constants.SERIES_TYPES` and `series_mask`
(B, 3) bool, True where the series exists. A missing series never reaches the backbone and is
hidden from attention by `src_key_padding_mask`, so its pixels cannot change the output.
"""

from __future__ import annotations

import torch
from torch import nn

from lsdc.constants import CONDITIONS, LEVELS, SERIES_TYPES, SEVERITIES
from lsdc.models.backbones import create_backbone
from lsdc.models.registry import register_model

N_TYPES = len(SERIES_TYPES)
N_CONDITIONS = len(CONDITIONS)
N_LEVELS = len(LEVELS)
N_CLASSES = len(SEVERITIES)


@register_model("sequence")
class SequenceModel(nn.Module):
    """See module docstring. `level_tokens=True` reads the 5 levels from 5 learned query tokens
    (each predicts the 5 conditions at its level); otherwise one CLS token predicts all 25."""

    def __init__(
        self,
        backbone: str = "resnet18",
        pretrained: bool = False,
        pretrained_path: str | None = None,
        shared_backbone: bool = True,
        num_slices: int = 10,
        d_model: int = 256,
        num_heads: int = 4,
        num_layers: int = 2,
        dim_feedforward: int = 512,
        dropout: float = 0.1,
        level_tokens: bool = True,
        drop_path_rate: float = 0.0,
        grid: int = 1,
        target_bias: bool = False,
    ) -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        self.num_slices = num_slices
        self.grid = grid
        self.shared_backbone = shared_backbone
        self.level_tokens = level_tokens
        n_backbones = 1 if shared_backbone else N_TYPES
        self.backbones = nn.ModuleList(
            create_backbone(
                backbone,
                in_chans=1,
                pretrained=pretrained,
                pretrained_path=pretrained_path,
                drop_path_rate=drop_path_rate,
            )
            for _ in range(n_backbones)
        )
        num_features = self.backbones[0].num_features
        self.proj = nn.Sequential(nn.Linear(num_features, d_model), nn.LayerNorm(d_model))
        self.type_embed = nn.Parameter(torch.zeros(N_TYPES, d_model))
        self.pos_embed = nn.Parameter(torch.zeros(num_slices, d_model))
        # grid > 1: each slice gives grid x grid tokens (its feature map pooled to that grid) with
        # a learned embedding per cell, so the level queries can attend to where a level lies in
        # the slice instead of reading it out of one globally pooled vector.
        self.cell_embed = nn.Parameter(torch.zeros(grid * grid, d_model)) if grid > 1 else None
        n_queries = N_LEVELS if level_tokens else 1
        self.query_tokens = nn.Parameter(torch.zeros(n_queries, d_model))
        for p in (self.type_embed, self.pos_embed, self.query_tokens, self.cell_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model,
            num_heads,
            dim_feedforward=dim_feedforward,
            dropout=dropout,
            batch_first=True,
            norm_first=True,
        )
        # enable_nested_tensor=False: the nested fast path returns zeros at padded positions and
        # varies by device; plain masking keeps CPU and GPU identical.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        per_query = N_CONDITIONS * N_CLASSES * (1 if level_tokens else N_LEVELS)
        self.head = nn.Linear(d_model, per_query)
        # A bias per target (25, 3) on top of the head: the shared level-token head cannot hold
        # the per-level class balance, and `init_target_bias` starts it at the training prior.
        self.target_bias = (
            nn.Parameter(torch.zeros(N_CONDITIONS * N_LEVELS, N_CLASSES)) if target_bias else None
        )

    @torch.no_grad()
    def init_target_bias(self, log_prior: torch.Tensor) -> None:
        """Start the output at `log_prior` (25, 3): the head is zeroed and the bias set, so
        training begins at the class prior instead of spending its first steps finding it (the
        head still learns: its gradient is the features times the error)."""
        if self.target_bias is None:
            raise ValueError("the model was built with target_bias=False")
        self.target_bias.copy_(log_prior.to(self.target_bias))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def _embed(self, backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) -> (N, G, F) with G = grid * grid cells (G = 1: the pooled vector)."""
        if self.grid == 1:
            return backbone(x)[:, None]
        fmap = backbone.model.forward_features(x)
        if fmap.ndim != 4:
            raise ValueError(f"grid > 1 needs a CNN feature map (N, C, h, w), got {fmap.ndim}-D")
        cells = nn.functional.adaptive_avg_pool2d(fmap, self.grid)  # (N, F, grid, grid)
        return cells.flatten(2).transpose(1, 2)  # (N, G, F)

    def _slice_features(self, images: torch.Tensor, series_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, S, H, W), (B, T) -> (B, T, S, G, F); zeros for missing series, whose pixels
        never reach a backbone (so they cannot leak in, not even through BatchNorm statistics)."""
        b, t, s, h, w = images.shape
        g = self.grid * self.grid
        out = images.new_zeros(b, t, s, g, self.backbones[0].num_features)
        # Which series are present is read on the host (a backbone's batch size depends on
        # it): a `nonzero` per backbone call, at the start of the forward, where the device has
        # the least work queued to drain. Nothing else in a training step waits for the device.
        if self.shared_backbone:
            # One backbone call over every present series of the batch (fewer, larger kernels).
            idx = series_mask.flatten().nonzero().squeeze(1)  # (P,) into B * T
            if idx.numel():
                present = images.flatten(0, 1).index_select(0, idx)  # (P, S, H, W)
                feats = self._embed(self.backbones[0], present.reshape(-1, 1, h, w))  # (P*S, G, F)
                feats = feats.reshape(idx.numel(), s, g, -1)
                out = out.to(feats.dtype).flatten(0, 1).index_copy(0, idx, feats)
                out = out.reshape(b, t, s, g, -1)
            return out
        for ti in range(t):
            rows = series_mask[:, ti].nonzero().squeeze(1)  # (B_present,)
            if not rows.numel():
                continue
            x = images[:, ti].index_select(0, rows).reshape(-1, 1, h, w)  # (B_present * S, 1, H, W)
            feats = self._embed(self.backbones[ti], x)  # (B_present * S, G, F)
            out = out.to(feats.dtype)
            out[:, ti] = out[:, ti].index_copy(0, rows, feats.reshape(rows.numel(), s, g, -1))
        return out

    def forward_features(
        self, images: torch.Tensor, series_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        b, t, s, _, _ = images.shape
        if t != N_TYPES or s != self.num_slices:
            raise ValueError(
                f"images must be (B, {N_TYPES}, {self.num_slices}, H, W), got {tuple(images.shape)}"
            )
        series_mask = series_mask.bool()
        feats = self._slice_features(images, series_mask)  # (B, T, S, G, F)
        g = feats.shape[3]
        tokens = self.proj(feats)  # (B, T, S, G, D)
        tokens = tokens + self.type_embed[None, :, None, None] + self.pos_embed[None, None, :, None]
        if self.cell_embed is not None:
            tokens = tokens + self.cell_embed[None, None, None]
        tokens = tokens.reshape(b, t * s * g, -1)  # (B, T * S * G, D)
        queries = self.query_tokens[None].expand(b, -1, -1)  # (B, Q, D)
        x = torch.cat([queries, tokens], dim=1)  # (B, Q + T * S * G, D)
        # True = ignore: every slice token of a missing series; query tokens are always kept so
        # a study without any series still has something to attend to.
        pad = torch.cat(
            [
                series_mask.new_zeros(b, queries.shape[1]),
                (~series_mask)[:, :, None].expand(b, t, s * g).reshape(b, t * s * g),
            ],
            dim=1,
        )  # (B, Q + T * S * G)
        x = self.encoder(x, src_key_padding_mask=pad)
        x = self.norm(x)
        return {"queries": x[:, : queries.shape[1]], "tokens": x[:, queries.shape[1] :]}

    def forward_head(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q = features["queries"]  # (B, Q, D)
        b = q.shape[0]
        out = self.head(q)  # (B, Q, per_query)
        if self.level_tokens:
            # (B, level, condition, class) -> condition-major (B, 25, 3) as in TARGETS
            logits = out.reshape(b, N_LEVELS, N_CONDITIONS, N_CLASSES).transpose(1, 2)
            logits = logits.reshape(b, N_CONDITIONS * N_LEVELS, N_CLASSES)
        else:
            logits = out.reshape(b, N_CONDITIONS * N_LEVELS, N_CLASSES)
        if self.target_bias is not None:
            logits = logits + self.target_bias
        return {"logits": logits}  # (B, 25, 3)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` holds `images` (B, 3, S, H, W) float and `series_mask` (B, 3) bool."""
        return self.forward_head(self.forward_features(batch["images"], batch["series_mask"]))
