"""Both model families under autocast, the path training and `predict` take on a GPU, run on the
CPU in bfloat16 (found by `lsdc fit --rehearse`: the multitask model gathered bf16 head outputs
into float32 tensors and scatter_ failed)."""

from __future__ import annotations

import pytest
import torch

from lsdc.data.multitask import MultitaskDataset, collate_multitask
from lsdc.data.sequence import SequenceDataset, collate_sequence
from lsdc.models.registry import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"refine": True},
        {"refine": True, "read_refined": True},
        {"keypoint_head": "regression"},
        # The demo preset's model: series heads and the foraminal windows' own half side.
        {
            "refine": True,
            "read_refined": True,
            "keypoint_heads": "series",
            "window_sagittal_t1": 0.045,
        },
    ],
)
def test_the_multitask_model_runs_under_bf16_autocast(toy_multitask_cache, kwargs):
    cache = toy_multitask_cache(n_studies=2, size=32, hires=48)
    batch = collate_multitask([MultitaskDataset(cache)[i] for i in range(2)])
    # One study teacher-forced with offset windows, one read where the model puts its points.
    batch["teacher"] = torch.tensor([True, False])
    batch["teacher_jitter"] = torch.rand(2, 25, 2) - 0.5
    model = build_model(
        "multitask", backbone="resnet10t", feature_dim=16, hidden_dim=16, window_px=8, **kwargs
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    for key in ("logits", "keypoints", "visibility"):
        assert out[key].dtype == torch.float32 and torch.isfinite(out[key]).all(), key
    out["logits"].sum().backward()


def test_the_sequence_model_runs_under_bf16_autocast(toy_sequence_cache):
    cache = toy_sequence_cache(n_studies=2, size=32)
    batch = collate_sequence([SequenceDataset(cache)[i] for i in range(2)])
    model = build_model(
        "sequence", backbone="test_convnext", d_model=32, num_heads=2, num_layers=1,
        dim_feedforward=64,
    )  # fmt: skip
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert torch.isfinite(out["logits"].float()).all()
    out["logits"].float().sum().backward()
