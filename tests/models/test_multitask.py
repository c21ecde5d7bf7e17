"""The multitask model: shapes, masks, keypoint geometry, windows, one optimisation step."""

from __future__ import annotations

import pytest
import torch

from lsdc.config import load_config
from lsdc.constants import TARGETS
from lsdc.data.multitask import GROUPS, MultitaskDataset, collate_multitask
from lsdc.models.multitask import MultitaskModel, sample_points, soft_argmax, window_grid
from lsdc.models.registry import build_model
from lsdc.training.multitask import MultitaskTrainConfig

TINY = dict(backbone="resnet10t", feature_dim=16, hidden_dim=16, window_px=8)


# One torch thread: see the `one_thread` fixture.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def batch(toy_multitask_cache):
    cache = toy_multitask_cache(n_studies=2, size=32, hires=48, absent={1: "axial_t2__l1_l2"})
    return collate_multitask([MultitaskDataset(cache)[i] for i in range(2)])


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"keypoint_head": "regression", "combine": "learned"},
        {"combine": "average", "heads": "target", "second_backbone": "shared"},
        {"second_pass": False},
        {"second_backbone": "resnet10t", "upsample": "none", "heads": "side"},
        {"second_backbone": "window", "heads": "condition"},
        {"fine_stride": 4},
        {"window_pool": "grid"},
        {"refine": True},
        {"refine": True, "keypoint_heads": "series"},
        {"keypoint_head": "regression", "keypoint_heads": "series"},
    ],
)
def test_outputs_and_masks(batch, kwargs):
    model = build_model("multitask", **TINY, **kwargs).eval()
    out = model(batch)
    assert out["logits"].shape == (2, 25, 3)
    assert out["keypoints"].shape == (2, 25, 2) and out["visibility"].shape == (2, 25)
    assert ((out["keypoints"] >= 0) & (out["keypoints"] <= 1)).all()
    # The absent crop's targets get the learned prior, whatever its (zero) pixels say.
    absent = [TARGETS.index(f"{s}_subarticular_stenosis_l1_l2") for s in ("left", "right")]
    assert not out["crop_present"][1, absent].any() and out["crop_present"][0].all()
    prior = model.prior_logits.detach()[absent]
    torch.testing.assert_close(out["logits_first"][1, absent], prior)


@pytest.mark.parametrize("stride", [8, 4])
def test_fine_stride_sets_the_heatmap_resolution(batch, stride):
    model = build_model("multitask", **TINY, fine_stride=stride).eval()
    out = model(batch)
    size = batch["sagittal_images"].shape[-1]
    assert out["heatmaps_sagittal"].shape[-2:] == (size // stride, size // stride)


def test_soft_argmax_and_point_sampling_agree_on_a_bright_dot():
    hm = torch.full((1, 1, 16, 16), -30.0)
    hm[0, 0, 5, 11] = 30.0  # cell (x=11, y=5)
    xy = soft_argmax(hm)[0, 0]
    torch.testing.assert_close(xy, torch.tensor([11.5 / 16, 5.5 / 16]))
    fmap = torch.zeros(1, 2, 16, 16)
    fmap[0, 1, 5, 11] = 7.0
    assert sample_points(fmap, xy[None, None])[0, 0].tolist() == [0.0, 7.0]


def test_window_is_centred_on_its_point_in_a_padded_source():
    src = torch.zeros(1, 1, 40, 64)  # true size 40 x 40, padded to width 64
    src[0, 0, 10, 30] = 1.0
    centre = torch.tensor([[(30 + 0.5) / 40, (10 + 0.5) / 40]])
    scale = torch.tensor([[40 / 64, 40 / 40]])
    grid = window_grid(centre, half=0.1, size=9, scale_xy=scale)
    win = torch.nn.functional.grid_sample(src, grid, align_corners=False)[0, 0]
    assert divmod(int(win.argmax()), 9) == (4, 4)  # the dot lands on the window's centre


def test_the_keypoint_head_finds_a_bright_dot_within_one_pixel():
    # Train the first pass's keypoint path alone on images of two dots (an axial crop's two
    # points) and check the soft-argmax lands within one pixel on new images.
    torch.manual_seed(0)
    model = MultitaskModel(backbone="resnet10t", feature_dim=32, hidden_dim=16, second_pass=False)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    size = 48

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pts = torch.rand(n, 2, 2) * 0.6 + 0.2  # normalised x/y of the left and right dot
        yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        img = torch.rand(n, 3, size, size) * 0.2
        for k in range(2):
            cx = pts[:, k, 0] * size - 0.5
            cy = pts[:, k, 1] * size - 0.5
            d2 = (xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2
            img += (0.9 * torch.exp(-d2 / 2.0) * (1 + k))[:, None]  # the right dot is brighter
        return img.clamp(0, 1), pts

    for _ in range(150):
        x, pts = sample(16)
        fmap, glob = model.forward_features(x)
        pred, _, _ = model.forward_keypoints("axial", fmap, glob)
        loss = (pred - pts).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        x, pts = sample(32)
        pred, _, _ = model.forward_keypoints("axial", *model.forward_features(x))
    err_px = ((pred - pts) * size).norm(dim=-1)
    assert err_px.median() < 1.0, err_px


def test_a_training_step_lowers_the_loss_on_a_fixed_batch(batch):
    from lsdc.training.losses import LossConfig
    from lsdc.training.multitask import MultitaskLossConfig, multitask_loss

    torch.manual_seed(0)
    model = build_model("multitask", **TINY)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = multitask_loss(model(batch), batch, MultitaskLossConfig(), LossConfig())["loss"]
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"keypoint_head": "regression", "combine": "learned"},
        {"refine": True, "second_backbone": "shared", "heads": "target"},
        {"refine": True, "keypoint_heads": "series"},
        {"second_pass": False},
    ],
)
def test_every_parameter_takes_part_in_every_backward_pass(toy_multitask_cache, kwargs):
    # DDP (find_unused_parameters=False) waits for a gradient of every trainable parameter at
    # every step: none may depend on what the batch holds (coordinates, labels) or on a loss
    # weight of 0.
    from lsdc.training.losses import LossConfig
    from lsdc.training.multitask import MultitaskLossConfig, multitask_loss

    cache = toy_multitask_cache(n_studies=2, size=32, hires=40, uncoordinated={1})
    items = [MultitaskDataset(cache)[i] for i in range(2)]
    unlabelled = {**items[1], "labels": torch.full((25,), -1)}
    model = build_model("multitask", **TINY, **kwargs)
    cfg = MultitaskLossConfig(first_weight=0.0)
    for batch in map(collate_multitask, ([items[0]], [items[1]], [unlabelled])):
        model.zero_grad(set_to_none=True)
        multitask_loss(model(batch), batch, cfg, LossConfig())["loss"].backward()
        idle = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not idle, idle


def test_weights_saved_with_both_keypoint_heads_still_load():
    # Until the unused keypoint head was left out, every model held both.
    heatmap = build_model("multitask", **TINY)
    regression = build_model("multitask", **TINY, keypoint_head="regression")
    assert not any(k.startswith("regress.") for k in heatmap.state_dict())
    assert not any(k.startswith("heatmap.") for k in regression.state_dict())
    both = {**regression.state_dict(), **heatmap.state_dict()}
    for model in (heatmap, regression):
        model.load_state_dict(both)
        # Under a wrapper too (a Lightning checkpoint's "model." prefix).
        torch.nn.ModuleDict({"model": model}).load_state_dict(
            {f"model.{k}": v for k, v in both.items()}
        )
    with pytest.raises(RuntimeError, match="bogus"):
        heatmap.load_state_dict({**both, "bogus": torch.zeros(1)})


def test_a_weights_file_with_both_keypoint_heads_loads_through_its_checks(tmp_path):
    # The path `predict` takes: a runs folder trained before the unused head was left out held
    # 4 tensors the name check called unexpected, and no such folder could predict.
    from lsdc.fileio import CorruptFileError
    from lsdc.models.weights import load_weights, save_weights

    regression = build_model("multitask", **TINY, keypoint_head="regression")
    heatmap = build_model("multitask", **TINY)

    class Both(torch.nn.Module):  # what a model saved before then held
        def state_dict(self) -> dict[str, torch.Tensor]:
            return {**regression.state_dict(), **heatmap.state_dict()}

    path = save_weights(Both(), tmp_path / "model.safetensors")
    fresh = build_model("multitask", **TINY)
    load_weights(fresh, path)
    for k, v in heatmap.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)
    other = build_model("multitask", **{**TINY, "hidden_dim": 24})
    with pytest.raises(CorruptFileError, match="another shape"):
        load_weights(other, path)


def test_the_refiner_learns_to_place_a_bright_dot_inside_its_window():
    from lsdc.models.multitask import WindowRefiner

    torch.manual_seed(0)
    refiner = WindowRefiner(3)
    opt = torch.optim.AdamW(refiner.parameters(), lr=3e-3)

    def dots(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        pts = torch.rand(n, 2) * 0.6 + 0.2
        yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
        d2 = (xx - pts[:, :1, None] * 24 + 0.5) ** 2 + (yy - pts[:, 1:, None] * 24 + 0.5) ** 2
        img = torch.exp(-d2 / 4.0)[:, None].expand(-1, 3, -1, -1)
        return img, pts

    test_img, test_pts = dots(32)
    with torch.no_grad():
        before = (refiner.eval()(test_img) - test_pts).abs().mean()
    refiner.train()
    for _ in range(150):
        img, pts = dots(16)
        loss = (refiner(img) - pts).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = (refiner.eval()(test_img) - test_pts).abs().mean()
    assert after < 0.25 * before and after * 24 < 1.5, (before, after)


def test_refined_points_are_reported_and_trained(batch):
    from lsdc.training.losses import LossConfig
    from lsdc.training.multitask import MultitaskLossConfig, multitask_loss

    model = build_model("multitask", **TINY, refine=True)
    out = model(batch)
    assert out["keypoints"].shape == out["keypoints_first"].shape == (2, 25, 2)
    terms = multitask_loss(out, batch, MultitaskLossConfig(), LossConfig())
    assert "refine_l1" in terms
    terms["loss"].backward()
    assert model.refiner.net[0].weight.grad.abs().sum() > 0


def test_the_refiner_heatmap_loss_puts_the_true_point_in_its_window(batch):
    from lsdc.training.losses import LossConfig
    from lsdc.training.multitask import MultitaskLossConfig, multitask_loss

    model = build_model("multitask", **TINY, refine=True)
    # Teacher-forced windows are centred on the true points: each lies at the window's centre.
    forced = {**batch, "teacher": torch.ones(2, dtype=torch.bool)}
    out = model(forced)
    for g in GROUPS:
        place = out[f"refine_windows_{g.name}"]
        true = forced["points"][:, torch.as_tensor(g.targets)].flatten(0, 2)
        known = forced["point_mask"][:, torch.as_tensor(g.targets)].flatten()
        inside = (true - place[:, :2]) / (2 * place[:, 2:]) + 0.5
        torch.testing.assert_close(inside[known], torch.full_like(inside[known], 0.5))
    off = multitask_loss(out, forced, MultitaskLossConfig(), LossConfig())
    on = multitask_loss(out, forced, MultitaskLossConfig(refine_heatmap_weight=2.0), LossConfig())
    assert off["refine_ce"] > 0
    torch.testing.assert_close(on["loss"], off["loss"] + 2.0 * off["refine_ce"])
    model.zero_grad()
    on["loss"].backward()
    assert model.refiner.net[-1].weight.grad.abs().sum() > 0


def test_teacher_forcing_moves_the_second_pass_to_the_true_points(batch):
    model = build_model("multitask", **TINY).eval()
    with torch.no_grad():
        free = model(batch)["logits_second"]
        forced = model({**batch, "teacher": torch.ones(2, dtype=torch.bool)})["logits_second"]
    assert not torch.allclose(free, forced)


def test_teacher_jitter_moves_each_window_off_its_true_point(batch):
    model = build_model("multitask", **TINY, refine=True, window_sagittal_t1=0.03).eval()
    jitter = torch.rand(2, 25, 2) * 2 - 1
    forced = {**batch, "teacher": torch.ones(2, dtype=torch.bool), "teacher_jitter": jitter}
    with torch.no_grad():
        out = model(forced)
    for g in GROUPS:
        t = torch.as_tensor(g.targets)
        place = out[f"refine_windows_{g.name}"]  # centre x/y and half side, crop units
        known = forced["point_mask"][:, t].flatten()
        half = torch.tensor(
            [0.03 if st == "Sagittal T1" else model.windows[g.name] for st in g.series]
        )[None, :, None]  # per crop
        expected = forced["points"][:, t] + jitter[:, t] * half[..., None]
        torch.testing.assert_close(place[known, :2], expected.flatten(0, 2)[known])
        torch.testing.assert_close(place[:, 2], half.expand(2, -1, t.shape[1]).flatten())


def test_read_refined_samples_the_windows_again_at_the_refined_points(batch, monkeypatch):
    model = build_model("multitask", **TINY, refine=True, read_refined=True).eval()
    seen = []
    sample = model.windows_at

    def spy(group, fine, hw, centres, upsampled=True):
        seen.append((group, centres.clone()))
        return sample(group, fine, hw, centres, upsampled)

    monkeypatch.setattr(model, "windows_at", spy)
    with torch.no_grad():
        out = model(batch)
    # Per group: the first pass's points, then the refined ones, which the output reports.
    assert [g for g, _ in seen] == [g.name for g in GROUPS for _ in (0, 1)]
    for g, (_, first), (_, again) in zip(GROUPS, seen[::2], seen[1::2], strict=True):
        t = torch.as_tensor(g.targets)
        torch.testing.assert_close(first, out["keypoints_first"][:, t].flatten(0, 1))
        torch.testing.assert_close(again, out["keypoints"][:, t].flatten(0, 1))
    # Teacher-forced windows stay on the true points.
    seen.clear()
    forced = {**batch, "teacher": torch.ones(2, dtype=torch.bool)}
    with torch.no_grad():
        model(forced)
    for g, (_, again) in zip(GROUPS, seen[1::2], strict=True):
        t = torch.as_tensor(g.targets)
        known = forced["point_mask"][:, t].flatten(0, 1)
        true = forced["points"][:, t].flatten(0, 1)
        torch.testing.assert_close(again[known], true[known])
    assert not build_model("multitask", **TINY, read_refined=True).read_refined  # no refiner


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="keypoint_head"):
        MultitaskModel(**TINY, keypoint_head="x")
    with pytest.raises(ValueError, match="upsample"):
        MultitaskModel(**TINY, upsample="lanczos")
    with pytest.raises(ValueError, match="heads"):
        MultitaskModel(**TINY, heads="level")
    with pytest.raises(ValueError, match="keypoint_heads"):
        MultitaskModel(**TINY, keypoint_heads="crop")


@pytest.mark.parametrize("head", ["heatmap", "regression"])
def test_series_keypoint_heads_move_only_their_own_series_points(batch, head):
    # With one head per series type, Sagittal T2's head places the spinal points and nothing
    # else, though its crop shares the sagittal group with Sagittal T1's two.
    from lsdc.constants import SAGITTAL_T2, SERIES_TYPES

    torch.manual_seed(0)
    model = build_model(
        "multitask", **TINY, keypoint_head=head, keypoint_heads="series", refine=True
    ).eval()
    sag = GROUPS[0]
    t2 = [j for c, st in zip(sag.targets, sag.series, strict=True) if st == SAGITTAL_T2 for j in c]
    assert len(t2) == 5 and all(TARGETS[j].startswith("spinal") for j in t2)
    others = [j for j in range(25) if j not in t2]
    with torch.no_grad():
        before = model(batch)
        layer = model.heatmap["sagittal"] if head == "heatmap" else model.regress["sagittal"]
        kinds = list(dict.fromkeys(sag.series))
        rows = layer.weight.shape[0] // len(kinds)
        t2_rows = slice(kinds.index(SAGITTAL_T2) * rows, (kinds.index(SAGITTAL_T2) + 1) * rows)
        layer.weight[t2_rows] += torch.randn_like(layer.weight[t2_rows])
        after = model(batch)
    moved = (after["keypoints_first"] - before["keypoints_first"]).abs().sum(-1)  # (B, 25)
    assert (moved[:, t2] > 1e-4).all()
    torch.testing.assert_close(moved[:, others], torch.zeros_like(moved[:, others]))
    # The refiner's Sagittal T2 map likewise moves only the spinal windows' refined points.
    with torch.no_grad():
        t2_map = model.refiner.net[-1].weight[SERIES_TYPES.index(SAGITTAL_T2)]
        t2_map += torch.randn_like(t2_map)
        again = model(batch)
    shift = (again["keypoints"] - after["keypoints"]).abs().sum(-1)
    assert (shift[:, t2] > 1e-4).all()
    torch.testing.assert_close(shift[:, others], torch.zeros_like(shift[:, others]))


def test_head_sharing_maps_targets_to_the_right_heads():
    from lsdc.models.multitask import _head_index

    def of(name: str, heads: str) -> int:
        return _head_index(heads)[TARGETS.index(name)]

    assert _head_index("target") == list(range(25))
    side = "left_subarticular_stenosis_l4_l5", "right_subarticular_stenosis_l4_l5"
    assert (
        of(side[0], "side") == of(side[1], "side") != of(side[0].replace("l4_l5", "l3_l4"), "side")
    )
    assert len(set(_head_index("side"))) == 15
    cond = _head_index("condition")
    assert len(set(cond)) == 3
    assert of("spinal_canal_stenosis_l1_l2", "condition") == of(
        "spinal_canal_stenosis_l5_s1", "condition"
    )
    assert of(side[0], "condition") == of("right_subarticular_stenosis_l1_l2", "condition")
    assert of(side[0], "condition") != of("left_neural_foraminal_narrowing_l4_l5", "condition")


def test_group_layout_matches_the_model():
    model = MultitaskModel(**TINY, second_pass=False)
    for g in GROUPS:
        assert getattr(model, f"targets_{g.name}").shape == (len(g.keys), len(g.targets[0]))


def test_absent_crops_predict_the_initial_prior(batch):
    model = build_model("multitask", **TINY).eval()
    prior = torch.softmax(torch.randn(25, 3), -1)
    model.init_prior(prior.log())
    with torch.no_grad():
        out = model(batch)
    absent = ~out["crop_present"]
    assert absent.any()
    torch.testing.assert_close(out["logits"].softmax(-1)[absent], prior.expand(2, -1, -1)[absent])


def test_grid_pooled_window_encoder_tells_where_a_feature_lies():
    from lsdc.models.backbones import WindowEncoder

    torch.manual_seed(0)
    enc = WindowEncoder(3, pool="grid", grid=4, grid_channels=8).eval()
    assert enc.num_features == 128 + 8 * 16
    top, bottom = torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)
    top[..., 2:8, 12:20], bottom[..., 24:30, 12:20] = 1, 1
    with torch.no_grad():
        a, b = enc(top), enc(bottom)
    assert a.shape == (1, enc.num_features)
    # The grid part tells the top of the window from the bottom, cell by cell.
    ga, gb = a[0, 128:].reshape(8, 4, 4), b[0, 128:].reshape(8, 4, 4)
    assert not torch.allclose(ga, gb)


def test_window_widths_set_the_readers_stages(batch):
    model = build_model("multitask", **TINY, window_widths=[8, 16, 24]).eval()
    convs = [m for m in model.second.features if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 24, 24]
    assert model.second.num_features == 24
    out = model(batch)
    assert torch.isfinite(out["logits"]).all()
    # The training config passes them on (a list from YAML or the command line).
    cfg = load_config(MultitaskTrainConfig, overrides=["model.window_widths=[8,16,24]"])
    assert cfg.model.window_widths == [8, 16, 24]


def test_windows_set_on_a_moved_model_stay_on_its_device():
    # bench_reader sets the windows of a loaded model; on a GPU the half sides must follow it.
    model = build_model("multitask", **TINY).to("meta")
    model.set_windows(0.05, 0.1, 0.03)
    for g in GROUPS:
        half = getattr(model, f"half_{g.name}")
        assert half.device.type == "meta" and half.shape == (len(g.series),)


def test_windows_are_sampled_in_place_as_from_a_copy_per_window():
    """Each source's K windows come from one grid over it (no K copies of the source), and match
    sampling one copy of the source per window."""
    import torch.nn.functional as F

    from lsdc.models.multitask import window_grid

    torch.manual_seed(0)
    # The Sagittal T1 (foraminal) crops' windows half the size of the Sagittal T2 one's.
    model = build_model(
        "multitask", **TINY, upsample="none", window_sagittal=0.06, window_sagittal_t1=0.03
    ).eval()
    n, k = 3, 5
    series = next(g.series for g in GROUPS if g.name == "sagittal")
    assert sorted(series) == ["Sagittal T1", "Sagittal T1", "Sagittal T2/STIR"]
    half = torch.tensor([0.03 if st == "Sagittal T1" else 0.06 for st in series])
    fine = torch.rand(n, 3, 40, 48)
    hw = torch.tensor([[40, 48], [30, 44], [36, 20]])
    centres = torch.rand(n, k, 2)
    got = model.windows_at("sagittal", fine, hw, centres)
    wh = hw.flip(-1).float()
    scale = torch.stack([wh[:, 0] / 48, wh[:, 1] / 40], dim=-1)
    px = got.shape[-1]
    grid = window_grid(
        centres.reshape(n * k, 2), half.repeat_interleave(k), px, scale.repeat_interleave(k, 0)
    )
    want = F.grid_sample(fine.repeat_interleave(k, 0), grid, align_corners=False)
    torch.testing.assert_close(got, want)
