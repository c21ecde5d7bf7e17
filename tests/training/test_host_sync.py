"""A training step makes the host wait for the device only where it must.

On a GPU, reading a tensor's value in Python (`bool`, `int`, `.item()`), an output whose size
depends on values (a boolean mask index, `nonzero`) and a blocking copy of host data to the
device (`new_tensor`, `torch.tensor(..., device=)`) each stall the host until the device's queue
drains. A CPU run cannot see those stalls, so `HostSyncs` records the Python-level calls that
cause them: every torch call passes through a `TorchFunctionMode`. Its scope is the engine's
`training_step` (forward, loss, logging); the backward pass, the optimiser and Lightning's loop
around the step are outside it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

pytestmark = pytest.mark.usefixtures("one_thread")

# Values read on the host, or outputs whose size only the device knows.
_READS = {
    "__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu",
    "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "equal",
    "allclose", "bincount", "histc",
}  # fmt: skip


def _host_index(index: Any) -> bool:
    """Whether an index is a boolean mask (its result's size is data-dependent) or host data
    (a list, copied to the device before use)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(
        isinstance(p, list) or (isinstance(p, torch.Tensor) and p.dtype == torch.bool)
        for p in parts
    )


class HostSyncs(TorchFunctionMode):
    """Inside `with HostSyncs() as syncs:`, `syncs.calls` lists the calls that synchronise
    with a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if (
            name in _READS
            or name == "new_tensor"  # host data onto the tensor's device
            or (name in ("tensor", "as_tensor") and kwargs.get("device") is not None)
            or (name in ("__getitem__", "__setitem__") and _host_index(args[1]))
            or (name == "where" and len(args) + len(kwargs) == 1)
            or (name == "repeat_interleave" and isinstance(args[1] if len(args) > 1 else
                kwargs.get("repeats"), torch.Tensor) and "output_size" not in kwargs)
        ):  # fmt: skip
            self.calls.append(name)
        return func(*args, **kwargs)


def test_host_syncs_sees_the_usual_culprits():
    x = torch.rand(4)
    with HostSyncs() as syncs:
        bool((x > 0.5).any())
        x.sum().item()
        x[x > 0.5]
        x.new_tensor([1.0, 2.0])
        x[:, None][[0, 1]]
        torch.where(x > 0.5)
        x.masked_fill(x > 0.5, 0.0).sum() / x.sum().clamp(min=1)  # none of these
    assert syncs.calls == ["__bool__", "item", "__getitem__", "new_tensor", "__getitem__", "where"]


def _steps_syncs(lit: Any, batch: dict[str, torch.Tensor], steps: int = 2) -> list[list[str]]:
    """The host syncs of each of `steps` training steps of the engine's LightningModule, run
    by a Trainer (the engine's step: forward, loss, logging). The losses' constants are copied
    to the device in the first step (`device_constant`), then never again."""
    import lightning as L

    from lsdc.training.losses import device_constant

    device_constant.cache_clear()
    per_step: list[list[str]] = []
    step: Callable = lit.training_step

    def watched(*args, **kwargs):
        with HostSyncs() as syncs:
            out = step(*args, **kwargs)
        per_step.append(syncs.calls)
        return out

    lit.training_step = watched
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    # batch_size=None: each item is already a batch.
    trainer.fit(lit, torch.utils.data.DataLoader([batch] * steps, batch_size=None))
    return per_step


def _lit(name: str, kwargs: dict, loss_fn=None) -> Any:
    from lsdc.models.registry import build_model
    from lsdc.training.engine import EngineConfig, build_lit_module

    model = build_model(name, **kwargs)
    return build_lit_module(model, EngineConfig(grad_clip=1.0), loss_fn)


@pytest.mark.parametrize(
    "kwargs", [{}, {"keypoint_head": "regression", "refine": True}], ids=["heatmap", "refine"]
)
def test_a_multitask_training_step_never_waits_for_the_device(toy_multitask_cache, kwargs):
    from functools import partial

    from lsdc.data.multitask import MultitaskDataset, collate_multitask
    from lsdc.training.losses import LossConfig
    from lsdc.training.multitask import MultitaskLossConfig, multitask_loss

    # A study with coordinates and one without, with teacher forcing (the true points).
    cache = toy_multitask_cache(n_studies=2, size=32, hires=40, uncoordinated={1})
    ds = MultitaskDataset(cache, teacher=True)
    batch = collate_multitask([ds[0], ds[1]])
    batch["labels"][1, :5] = -1  # a study without a labelled spinal level
    loss_fn = partial(
        multitask_loss, cfg=MultitaskLossConfig(heatmap_target="bilinear"), severity=LossConfig()
    )
    tiny = dict(backbone="resnet10t", feature_dim=16, hidden_dim=16, window_px=8)
    first, second = _steps_syncs(_lit("multitask", {**tiny, **kwargs}, loss_fn), batch)
    assert set(first) <= {"tensor"} and second == []


@pytest.mark.parametrize("shared", [True, False])
def test_a_sequence_training_step_reads_only_which_series_are_present(shared):
    tiny = dict(backbone="test_convnext", d_model=32, num_heads=2, num_layers=1,
                dim_feedforward=64, num_slices=4, shared_backbone=shared)  # fmt: skip
    labels = torch.randint(0, 3, (2, 25))
    labels[0, :5] = -1
    batch = {
        "images": torch.rand(2, 3, 4, 32, 32),
        "series_mask": torch.tensor([[True, True, False], [True, True, True]]),
        "labels": labels,
        "study_id": torch.tensor([1, 2]),
    }
    # The present series go to the backbones and no others (not even into their BatchNorm
    # statistics): a `nonzero` per backbone call, at the start of the forward.
    reads = ["nonzero"] * (1 if shared else 3)
    first, second = _steps_syncs(_lit("sequence", tiny), batch)
    assert set(first) <= {"tensor", "nonzero"} and second == reads
