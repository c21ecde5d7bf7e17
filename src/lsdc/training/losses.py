"""Losses shaped like the official metric (DESIGN §2).

`metric_loss`: per metric group (spinal, foraminal, subarticular), cross-entropy weighted by the
true severity (1/2/4) and normalised by the weight sum, unlabelled targets (-1) ignored; plus an
optional any-severe-spinal term (binary log loss of the max `severe` probability over the
labelled spinal levels, weighted by the max sample weight). Terms are averaged as the metric
averages them, so the loss of a whole epoch's predictions is the metric itself (without its
probability clipping).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lsdc.constants import (
    CONDITION_GROUP,
    CONDITIONS,
    LEVELS,
    METRIC_GROUPS,
    SEVERITY_INDEX,
    SEVERITY_WEIGHTS,
)

_SEVERE = SEVERITY_INDEX["Severe"]
# Target indices (condition-major, as TARGETS) of each metric group.
GROUP_TARGETS: dict[str, list[int]] = {
    g: [
        ci * len(LEVELS) + li
        for ci, c in enumerate(CONDITIONS)
        if CONDITION_GROUP[c] == g
        for li in range(len(LEVELS))
    ]
    for g in METRIC_GROUPS
}


@dataclass
class LossConfig:
    any_severe_weight: float = 1.0  # weight of the any-severe-spinal term (0 = off)
    # True: each group is its own weighted mean, then groups are averaged (the metric). False:
    # one weighted mean over all labelled targets.
    group_balanced: bool = True
    label_smoothing: float = 0.0


def metric_loss(
    logits: torch.Tensor, labels: torch.Tensor, cfg: LossConfig | None = None
) -> dict[str, torch.Tensor]:
    """logits (B, 25, 3), labels (B, 25) int (-1 = unlabelled) -> dict with `loss` (scalar) and
    one entry per term. A term without labelled rows in the batch is left out of the mean."""
    cfg = cfg or LossConfig()
    logits = logits.float()
    weights_table = logits.new_tensor(SEVERITY_WEIGHTS)
    labelled = labels >= 0  # (B, 25)
    safe = labels.clamp(min=0)
    ce = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        safe.reshape(-1),
        reduction="none",
        label_smoothing=cfg.label_smoothing,
    ).reshape(labels.shape)  # (B, 25)
    w = weights_table[safe] * labelled  # (B, 25), 0 where unlabelled
    terms: dict[str, torch.Tensor] = {}
    if cfg.group_balanced:
        for group, idx in GROUP_TARGETS.items():
            wg = w[:, idx]
            if bool((wg > 0).any()):
                terms[group] = (wg * ce[:, idx]).sum() / wg.sum()
    elif bool(labelled.any()):
        terms["severity"] = (w * ce).sum() / w.sum()
    if cfg.any_severe_weight > 0:
        term = any_severe_loss(logits, labels)
        if term is not None:
            terms["any_severe_spinal"] = term
    if not terms:
        # No labels at all: a zero that still depends on the graph, so backward() works.
        return {"loss": logits.sum() * 0.0}
    total = sum(
        (cfg.any_severe_weight if k == "any_severe_spinal" else 1.0) * v for k, v in terms.items()
    )
    norm = len(terms) - 1 + cfg.any_severe_weight if "any_severe_spinal" in terms else len(terms)
    return {"loss": total / norm, **{k: v.detach() for k, v in terms.items()}}


def any_severe_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
    """Binary weighted log loss of P(any labelled spinal level Severe), None if no study in the
    batch has a labelled spinal level."""
    idx = GROUP_TARGETS["spinal"]
    lab = labels[:, idx]  # (B, 5)
    labelled = lab >= 0
    keep = labelled.any(dim=1)
    if not bool(keep.any()):
        return None
    log_p = F.log_softmax(logits[:, idx].float(), dim=-1)  # (B, 5, 3)
    # max over labelled levels of p(severe), in log space for stability
    log_severe = log_p[..., _SEVERE].masked_fill(~labelled, float("-inf")).amax(dim=1)  # (B,)
    log_severe = log_severe[keep].clamp(max=-1e-7)
    y = ((lab == _SEVERE) & labelled).any(dim=1)[keep].float()
    weights = logits.new_tensor(SEVERITY_WEIGHTS)[lab.clamp(min=0)]
    w = weights.masked_fill(~labelled, 0).amax(dim=1)[keep]
    log_not = torch.log1p(-log_severe.exp())
    nll = -(y * log_severe + (1 - y) * log_not)
    return (w * nll).sum() / w.sum()
