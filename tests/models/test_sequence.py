"""Sequence model: shapes, registry, the missing-series mask, backbones offline."""

from __future__ import annotations

import pytest
import torch

from lsdc.models.backbones import PretrainedWeightsUnavailable, create_backbone
from lsdc.models.registry import available_models, build_model, register_model

TINY = dict(backbone="test_convnext", d_model=32, num_heads=2, num_layers=1, dim_feedforward=64)


def _batch(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "images": torch.randn(b, 3, 10, size, size, generator=g),
        "series_mask": torch.ones(b, 3, dtype=torch.bool),
    }


@pytest.mark.parametrize("level_tokens", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_forward_shapes(level_tokens, shared):
    model = build_model("sequence", **TINY, level_tokens=level_tokens, shared_backbone=shared)
    assert len(model.backbones) == (1 if shared else 3)
    out = model(_batch())
    assert out["logits"].shape == (2, 25, 3)
    feats = model.forward_features(**_batch())
    assert feats["tokens"].shape == (2, 30, 32)
    assert torch.equal(model.forward_head(feats)["logits"], model.forward_head(feats)["logits"])


@pytest.mark.parametrize("train_mode", [False, True])
def test_missing_series_pixels_cannot_change_the_output(train_mode):
    torch.manual_seed(0)
    model = build_model("sequence", **TINY, dropout=0.0)
    model.train(train_mode)
    batch = _batch(b=3)
    batch["series_mask"][0, 1] = False
    batch["series_mask"][2] = torch.tensor([False, False, True])
    ref = model(batch)["logits"]
    changed = {k: v.clone() for k, v in batch.items()}
    changed["images"][0, 1] = torch.randn(10, 32, 32) * 50
    changed["images"][2, :2] = 7.0
    torch.testing.assert_close(model(changed)["logits"], ref, atol=0, rtol=0)
    # ...while a present series does change it
    changed["images"][1, 0] += 1.0
    assert not torch.allclose(model(changed)["logits"][1], ref[1])


def test_study_without_any_series_still_predicts():
    model = build_model("sequence", **TINY).eval()
    batch = _batch(b=1)
    batch["series_mask"][:] = False
    out = model(batch)["logits"]
    assert torch.isfinite(out).all()


def test_registry_is_unique_and_lists_models():
    assert "sequence" in available_models()
    with pytest.raises(KeyError, match="unknown model"):
        build_model("no-such-model")

    @register_model("_test_dummy")
    class Dummy(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="already registered"):
        register_model("_test_dummy")(torch.nn.Linear)


def test_backbone_sized_from_num_features():
    bb = create_backbone("mobilenetv3_small_050", in_chans=1)
    assert bb(torch.randn(2, 1, 32, 32)).shape == (2, bb.num_features)


def test_pretrained_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsUnavailable, match="pretrained_path"):
        create_backbone("test_convnext", pretrained=True)


def test_pretrained_from_local_file(tmp_path):
    from safetensors.torch import save_file

    src = create_backbone("test_convnext", in_chans=3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    bb = create_backbone("test_convnext", in_chans=1, pretrained_path=path)
    # the 3-channel stem was summed into one channel (timm adapt_input_conv); the rest is equal
    key = next(k for k, v in src.model.state_dict().items() if v.ndim == 4)
    torch.testing.assert_close(
        bb.model.state_dict()[key], src.model.state_dict()[key].sum(1, keepdim=True)
    )


def test_grid_tokens_cover_every_cell_and_keep_the_missing_series_mask():
    torch.manual_seed(0)
    model = build_model("sequence", **TINY, grid=2, dropout=0.0).eval()
    batch = _batch(b=2)
    feats = model.forward_features(**batch)
    assert feats["tokens"].shape == (2, 3 * 10 * 4, 32)
    assert model(batch)["logits"].shape == (2, 25, 3)
    batch["series_mask"][0, 2] = False
    ref = model(batch)["logits"]
    batch["images"][0, 2] = 9.0
    torch.testing.assert_close(model(batch)["logits"], ref, atol=0, rtol=0)


def test_grid_tokens_see_where_a_change_is():
    """With a grid, the tokens of the cell holding a local change differ more than the others
    (a pooled vector cannot say where the change was)."""
    torch.manual_seed(0)
    model = build_model("sequence", **TINY, grid=2).eval()
    batch = _batch(b=1)
    emb = model._slice_features(batch["images"], batch["series_mask"])  # (1, 3, 10, 4, F)
    changed = batch["images"].clone()
    changed[0, 0, 0, :16, :16] += 5.0  # top-left quarter of one slice
    emb2 = model._slice_features(changed, batch["series_mask"])
    diff = (emb2 - emb)[0, 0, 0].abs().sum(-1)  # (4,) per cell, row-major
    assert int(diff.argmax()) == 0
    assert torch.equal(emb2[0, 0, 1:], emb[0, 0, 1:])


def test_target_bias_starts_at_the_given_prior():
    model = build_model("sequence", **TINY, target_bias=True).eval()
    log_prior = torch.log(torch.tensor([0.7, 0.2, 0.1])).expand(25, 3).clone()
    log_prior[3] = torch.log(torch.tensor([0.2, 0.3, 0.5]))
    model.init_target_bias(log_prior)
    probs = model(_batch())["logits"].softmax(-1)
    torch.testing.assert_close(probs, log_prior.exp().expand(2, 25, 3), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="target_bias"):
        build_model("sequence", **TINY).init_target_bias(log_prior)


def test_it_learns_a_planted_grade_per_level():
    # Where the model cannot see (the learning curve's 64-px stacks: its training loss stays
    # at the prior's for 20 epochs), it must be the input that hides the signal, not the model:
    # a square in the middle sagittal slices, brighter with the grade, at a row per level.
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n, slices = 48, 4
    grades = torch.randint(0, 3, (n, 5), generator=g)
    images = torch.randn(n, 3, slices, 32, 32, generator=g) * 0.3
    for level in range(5):
        rows = slice(4 + 5 * level, 8 + 5 * level)
        images[:, 1, 1:3, rows, 14:18] += grades[:, level, None, None, None] * 2.5
    y = grades[:, None, :].expand(n, 5, 5).reshape(n, 25)  # every condition: its level's grade
    batch = {"images": images, "series_mask": torch.ones(n, 3, dtype=torch.bool)}
    model = build_model("sequence", **TINY, num_slices=slices, target_bias=True, dropout=0.0)
    prior = torch.bincount(y.flatten(), minlength=3).float() / y.numel()
    model.init_target_bias(prior.log().expand(25, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        rows = torch.randint(0, n, (16,), generator=g)
        out = model({k: v[rows] for k, v in batch.items()})["logits"]
        loss = F.cross_entropy(out.reshape(-1, 3), y[rows].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = model.eval()(batch)["logits"]
    prior_ce = -(prior * prior.log()).sum()
    assert F.cross_entropy(out.reshape(-1, 3), y.reshape(-1)) < 0.6 * prior_ce
    assert (out.argmax(-1) == y).float().mean() > 0.75  # the majority grade: about 0.35
