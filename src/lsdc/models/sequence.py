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
    ) -> None:
        super().__init__()
        self.num_slices = num_slices
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
        n_queries = N_LEVELS if level_tokens else 1
        self.query_tokens = nn.Parameter(torch.zeros(n_queries, d_model))
        for p in (self.type_embed, self.pos_embed, self.query_tokens):
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

    def _slice_features(self, images: torch.Tensor, series_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, S, H, W), (B, T) -> (B, T, S, F); zeros for missing series, whose pixels never
        reach a backbone (so they cannot leak in, not even through BatchNorm statistics)."""
        b, t, s, h, w = images.shape
        out = images.new_zeros(b, t, s, self.backbones[0].num_features)
        if self.shared_backbone:
            # One backbone call over every present series of the batch (fewer, larger kernels).
            present = images[series_mask]  # (P, S, H, W)
            if present.shape[0]:
                feats = self.backbones[0](present.reshape(-1, 1, h, w))  # (P * S, F)
                out = out.to(feats.dtype)
                out[series_mask] = feats.reshape(present.shape[0], s, -1)
            return out
        for ti in range(t):
            rows = series_mask[:, ti]
            if not bool(rows.any()):
                continue
            x = images[rows, ti].reshape(-1, 1, h, w)  # (B_present * S, 1, H, W)
            feats = self.backbones[ti](x).reshape(int(rows.sum()), s, -1)  # (B_present, S, F)
            out = out.to(feats.dtype)
            out[rows, ti] = feats
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
        feats = self._slice_features(images, series_mask)  # (B, T, S, F)
        tokens = self.proj(feats)  # (B, T, S, D)
        tokens = tokens + self.type_embed[None, :, None, :] + self.pos_embed[None, None, :, :]
        tokens = tokens.reshape(b, t * s, -1)  # (B, 30, D)
        queries = self.query_tokens[None].expand(b, -1, -1)  # (B, Q, D)
        x = torch.cat([queries, tokens], dim=1)  # (B, Q + 30, D)
        # True = ignore: every slice token of a missing series; query tokens are always kept so
        # a study without any series still has something to attend to.
        pad = torch.cat(
            [
                series_mask.new_zeros(b, queries.shape[1]),
                (~series_mask)[:, :, None].expand(b, t, s).reshape(b, t * s),
            ],
            dim=1,
        )  # (B, Q + 30)
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
        return {"logits": logits}  # (B, 25, 3)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`batch` holds `images` (B, 3, S, H, W) float and `series_mask` (B, 3) bool."""
        return self.forward_head(self.forward_features(batch["images"], batch["series_mask"]))
