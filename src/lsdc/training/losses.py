"""Losses shaped like the official metric (DESIGN §2).

`metric_loss`: per metric group (spinal, foraminal, subarticular), cross-entropy weighted by the
true severity (1/2/4) and normalised by the weight sum, unlabelled targets (-1) ignored; plus an
optional any-severe-spinal term (binary log loss of the max `severe` probability over the
labelled spinal levels, weighted by the max sample weight). Terms are averaged as the metric
averages them, so the loss of a whole epoch's predictions is the metric itself (without its
probability clipping).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lsdc.constants import SEVERITY_INDEX, SEVERITY_WEIGHTS
from lsdc.metrics import GROUP_TARGETS

_SEVERE = SEVERITY_INDEX["Severe"]


def _as_slice(index: Sequence[int]) -> slice:
    """A contiguous run of indices as a slice: a list index is host data that a GPU must copy
    over (and wait for) before it can gather; a slice is a view."""
    index = [int(i) for i in index]
    if index != list(range(index[0], index[-1] + 1)):
        raise ValueError(f"not a contiguous run of indices: {index}")
    return slice(index[0], index[-1] + 1)


# Each group's targets are one run in the condition-major order of TARGETS.
_GROUP_COLUMNS: dict[str, slice] = {g: _as_slice(idx) for g, idx in GROUP_TARGETS.items()}


@functools.lru_cache(maxsize=64)
def device_constant(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`torch.tensor(values)` on `device`, copied there once per device: a copy from the host
    (`new_tensor`, `torch.tensor(..., device=)`) waits for the device's queue to drain, at
    every step. Shared: never modify the result in place."""
    return torch.tensor(values, dtype=dtype, device=device)


@dataclass
class LossConfig:
    any_severe_weight: float = 1.0  # weight of the any-severe-spinal term (0 = off)
    # True: each group is its own weighted mean, then groups are averaged (the metric). False:
    # one weighted mean over all labelled targets.
    group_balanced: bool = True
    label_smoothing: float = 0.0


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum(values * weights) / sum(weights), sum(weights)) for `weights` >= 0 shaped as
    `values`, computed without asking the device whether any weight is non-zero (a host sync
    on GPU): with none the mean is 0, still in the graph with gradient 0, so every parameter
    behind it takes part in the backward pass (DDP's gradient reduction waits for each one).
    `values` must be finite where `weights` are 0."""
    total = weights.sum()
    return (values * weights).sum() / torch.where(total > 0, total, torch.ones_like(total)), total


def metric_loss(
    logits: torch.Tensor, labels: torch.Tensor, cfg: LossConfig | None = None
) -> dict[str, torch.Tensor]:
    """logits (B, 25, 3), labels (B, 25) int (-1 = unlabelled) -> dict with `loss` (scalar), one
    entry per term (detached) and `n_<term>`, its summed sample weights. A term without labelled
    rows in the batch is 0 with `n_<term>` 0 and is left out of the mean (so the loss is 0, with
    gradient, when nothing is labelled)."""
    cfg = cfg or LossConfig()
    logits = logits.float()
    weights_table = device_constant(SEVERITY_WEIGHTS, logits.device, logits.dtype)
    labelled = labels >= 0  # (B, 25)
    safe = labels.clamp(min=0)
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        safe.reshape(-1),
        reduction="none",
        label_smoothing=cfg.label_smoothing,
    ).reshape(labels.shape)  # (B, 25)
    w = weights_table[safe] * labelled  # (B, 25), 0 where unlabelled
    # name -> (value, summed sample weights, weight of the term in the mean)
    terms: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    if cfg.group_balanced:
        for group, cols in _GROUP_COLUMNS.items():
            terms[group] = (*masked_mean(ce[:, cols], w[:, cols]), 1.0)
    else:
        terms["severity"] = (*masked_mean(ce, w), 1.0)
    if cfg.any_severe_weight > 0:
        terms["any_severe_spinal"] = (*any_severe_loss(logits, labels), cfg.any_severe_weight)
    total = sum(k * v for v, _, k in terms.values())
    # The number of terms present, each counted with its weight: a tensor, not a host branch.
    norm = sum(k * (n > 0) for _, n, k in terms.values())
    loss = total / torch.where(norm > 0, norm, torch.ones_like(norm))
    return {
        "loss": loss,
        **{name: v.detach() for name, (v, _, _) in terms.items()},
        **{f"n_{name}": n.detach() for name, (_, n, _) in terms.items()},
    }


def any_severe_loss(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary weighted log loss of P(any labelled spinal level Severe) over the studies with a
    labelled spinal level, and their summed weights (0, and a loss of 0, when there are none)."""
    cols = _GROUP_COLUMNS["spinal"]
    lab = labels[:, cols]  # (B, 5)
    labelled = lab >= 0
    keep = labelled.any(dim=1)  # (B,)
    log_p = F.log_softmax(logits[:, cols].float(), dim=-1)  # (B, 5, 3)
    # max over labelled levels of p(severe), in log space for stability
    log_severe = log_p[..., _SEVERE].masked_fill(~labelled, float("-inf")).amax(dim=1)  # (B,)
    # A study without a labelled level has -inf here: made finite, then weighted 0 (0 * inf
    # would be NaN in the sum and in its gradient).
    log_severe = torch.where(keep, log_severe, torch.zeros_like(log_severe)).clamp(max=-1e-7)
    y = ((lab == _SEVERE) & labelled).any(dim=1).float()
    weights = device_constant(SEVERITY_WEIGHTS, logits.device, log_p.dtype)[lab.clamp(min=0)]
    w = weights.masked_fill(~labelled, 0).amax(dim=1)  # (B,), 0 where not kept
    log_not = torch.log1p(-log_severe.exp())
    nll = -(y * log_severe + (1 - y) * log_not)
    return masked_mean(nll, w)
