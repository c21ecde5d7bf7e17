"""The training loss is the official metric on the same predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lsdc.metrics import score_arrays
from lsdc.training.losses import LossConfig, metric_loss


def _random(n=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=(n, 25), p=[0.6, 0.25, 0.15])
    labels[rng.random((n, 25)) < 0.15] = -1
    logits = rng.normal(size=(n, 25, 3)) * 2
    return torch.tensor(logits, dtype=torch.float64), torch.tensor(labels)


def test_loss_equals_metric_on_a_whole_set():
    logits, labels = _random()
    loss = metric_loss(logits.double(), labels)
    probs = logits.softmax(-1).numpy()
    official = score_arrays(labels.numpy(), probs)
    for key in ("spinal", "foraminal", "subarticular", "any_severe_spinal"):
        assert float(loss[key]) == pytest.approx(official[key], rel=1e-5)
    assert float(loss["loss"]) == pytest.approx(official["score"], rel=1e-5)


def test_missing_labels_are_ignored_and_weights_apply():
    logits, labels = _random(seed=1)
    base = metric_loss(logits, labels)["loss"]
    changed = logits.clone()
    # unlabelled rows may hold anything
    changed[labels == -1] = torch.tensor([9.0, -9.0, 0.0], dtype=changed.dtype)
    assert torch.allclose(metric_loss(changed, labels)["loss"], base)
    # a severe row weighs 4x a normal one: per-row CE ratio test on a single group
    one = torch.zeros(2, 25, 3)
    lab = torch.full((2, 25), -1)
    lab[0, 0], lab[1, 0] = 0, 2  # spinal l1_l2: study 0 normal, study 1 severe
    one[1, 0] = torch.tensor([0.0, 0.0, 3.0])
    cfg = LossConfig(any_severe_weight=0.0)
    spinal = metric_loss(one, lab, cfg)["spinal"]
    ce0 = torch.log(torch.tensor(3.0))  # uniform on the normal row
    ce1 = -torch.log_softmax(one[1, 0], -1)[2]
    assert torch.allclose(spinal, (ce0 + 4 * ce1) / 5)


def test_no_labels_gives_zero_with_gradient():
    logits = torch.randn(2, 25, 3, requires_grad=True)
    out = metric_loss(logits, torch.full((2, 25), -1))
    out["loss"].backward()
    assert float(out["loss"].detach()) == 0.0 and logits.grad is not None


def test_a_term_without_rows_counts_zero_and_leaves_the_mean_of_the_others():
    # Study 0 has spinal labels only, study 1 foraminal only: no subarticular rows at all, and
    # no spinal level for study 1's any-severe term (its -inf max must not become a NaN).
    logits, labels = _random(n=2, seed=2)
    labels[:] = -1
    labels[0, :5] = torch.tensor([0, 2, 1, 0, 0])
    labels[1, 5:15] = 1
    logits.requires_grad_(True)
    out = metric_loss(logits, labels)
    assert out["subarticular"] == 0 and out["n_subarticular"] == 0
    assert out["n_spinal"] == 1 + 4 + 2 + 1 + 1 and out["n_any_severe_spinal"] == 4
    mean = (out["spinal"] + out["foraminal"] + out["any_severe_spinal"]) / 3
    assert torch.allclose(out["loss"].detach(), mean)
    # The same as the study alone for its any-severe term.
    alone = metric_loss(logits[:1].detach(), labels[:1])["any_severe_spinal"]
    assert torch.allclose(out["any_severe_spinal"], alone)
    out["loss"].backward()
    assert torch.isfinite(logits.grad).all()
    assert not logits.grad[:, 15:].any()  # nothing labelled there
