"""The multitask dataset: shapes, masks, padding, and flips that respect anatomy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lsdc.constants import TARGETS
from lsdc.data.multitask import (
    GROUPS,
    MultitaskAugmentConfig,
    MultitaskDataConfig,
    MultitaskDataset,
    collate_multitask,
    mirror_batch,
    warp,
    warp_points,
)

AXIAL_L4 = "axial_t2__l4_l5"
LEFT_L4, RIGHT_L4 = (
    TARGETS.index("left_subarticular_stenosis_l4_l5"),
    TARGETS.index("right_subarticular_stenosis_l4_l5"),
)


def _only(**kwargs) -> MultitaskDataConfig:
    """A config whose augmentation does exactly what `kwargs` turn on."""
    still = dict(
        rotate_deg=0.0, scale=0.0, shift=0.0, contrast=0.0, brightness=0.0, gamma=0.0,
        axial_flip_prob=0.0, sagittal_flip_prob=0.0, teacher_epochs=0,
    )  # fmt: skip
    return MultitaskDataConfig(augment=MultitaskAugmentConfig(**{**still, **kwargs}))


def test_layout_covers_every_target_once():
    flat = [j for g in GROUPS for crop in g.targets for j in crop]
    assert sorted(flat) == list(range(len(TARGETS)))
    assert [len(g.keys) for g in GROUPS] == [3, 5]


def test_shapes_masks_and_padding(toy_multitask_cache):
    cache = toy_multitask_cache(n_studies=3, size=32, hires=48, absent={1: AXIAL_L4})
    cfg = MultitaskDataConfig()
    cfg.input.axial_size = 24
    ds = MultitaskDataset(cache, config=cfg)
    batch = collate_multitask([ds[i] for i in range(3)])
    assert batch["sagittal_images"].shape == (3, 3, 3, 32, 32)
    assert batch["axial_images"].shape == (3, 5, 3, 24, 24)  # axial resized on its own
    assert batch["axial_fine"].shape == (3, 5, 3, 48, 48)  # the finer native window
    assert batch["axial_fine_hw"][0].tolist() == [[48, 48]] * 5
    assert batch["points"].shape == (3, 25, 2) and batch["labels"].shape == (3, 25)
    # The absent crop: not present, its keypoints masked, its labels kept (they are labels of
    # the study, predicted from a learned prior).
    i = GROUPS[1].keys.index(AXIAL_L4)
    assert not batch["axial_present"][1, i] and batch["axial_present"][0].all()
    assert not batch["point_mask"][1, [LEFT_L4, RIGHT_L4]].any()
    assert batch["point_mask"][1].sum() == 23 and batch["point_mask"][0].all()
    assert not batch["teacher"].any()  # no teacher forcing outside training


def test_labels_read_only_the_labels_array(toy_multitask_cache, npz_reads):
    # Training reads every study's labels up front: that must not read the crops.
    ds = MultitaskDataset(toy_multitask_cache(n_studies=3, size=32, hires=48))
    expected = np.stack([ds[i]["labels"].numpy() for i in range(len(ds))])
    read = npz_reads
    read.clear()  # only what follows
    np.testing.assert_array_equal(ds.labels(), expected)
    assert read == ["labels"] * 3


def test_an_item_reads_each_array_of_its_study_once(toy_multitask_cache, npz_reads):
    ds = MultitaskDataset(toy_multitask_cache(n_studies=1, size=32, hires=48))
    read = npz_reads
    read.clear()  # only what follows
    ds[0]
    assert read and len(read) == len(set(read)), sorted(k for k in read if read.count(k) > 1)


def test_fine_sources_of_different_sizes_are_padded_with_their_size(toy_multitask_cache):
    small = toy_multitask_cache(n_studies=1, size=32)  # no hires: the crop itself (32)
    big = toy_multitask_cache(n_studies=1, size=32, hires=64)
    items = [MultitaskDataset(small)[0], MultitaskDataset(big)[0]]
    batch = collate_multitask(items)
    assert batch["sagittal_fine"].shape[-2:] == (64, 64)
    assert batch["sagittal_fine_hw"][:, 0].tolist() == [[32, 32], [64, 64]]
    assert batch["sagittal_fine"][0, 0, :, 32:].abs().sum() == 0  # zero padding


def test_axial_flip_swaps_left_and_right_points_and_labels(toy_multitask_cache):
    cache = toy_multitask_cache(n_studies=1, size=32)
    plain = MultitaskDataset(cache, config=_only())[0]
    flipped = MultitaskDataset(cache, config=_only(axial_flip_prob=1.0), train=True)[0]
    i = GROUPS[1].keys.index(AXIAL_L4)
    torch.testing.assert_close(flipped["axial_images"][i], plain["axial_images"][i].flip(-1))
    # The point labelled left is now the right one, at the mirrored x.
    torch.testing.assert_close(flipped["points"][RIGHT_L4, 0], 1 - plain["points"][LEFT_L4, 0])
    torch.testing.assert_close(flipped["points"][RIGHT_L4, 1], plain["points"][LEFT_L4, 1])
    assert flipped["labels"][RIGHT_L4] == plain["labels"][LEFT_L4]
    assert flipped["labels"][LEFT_L4] == plain["labels"][RIGHT_L4]
    # Sagittal crops and their labels are untouched.
    torch.testing.assert_close(flipped["sagittal_images"], plain["sagittal_images"])
    sag = [j for crop in GROUPS[0].targets for j in crop]
    assert torch.equal(flipped["labels"][sag], plain["labels"][sag])


def test_sagittal_flip_mirrors_front_and_back_and_changes_no_side(toy_multitask_cache):
    cache = toy_multitask_cache(n_studies=1, size=32)
    plain = MultitaskDataset(cache, config=_only())[0]
    flipped = MultitaskDataset(cache, config=_only(sagittal_flip_prob=1.0), train=True)[0]
    torch.testing.assert_close(flipped["sagittal_images"], plain["sagittal_images"].flip(-1))
    sag = [j for crop in GROUPS[0].targets for j in crop]
    torch.testing.assert_close(flipped["points"][sag, 0], 1 - plain["points"][sag, 0])
    assert torch.equal(flipped["labels"], plain["labels"])  # no label changes side


def test_affine_moves_keypoints_with_the_pixels():
    img = torch.zeros(1, 64, 64)
    img[0, 20, 40] = 1.0  # a dot at x=40, y=20
    point = torch.tensor([[(40 + 0.5) / 64, (20 + 0.5) / 64]])
    gen = torch.Generator().manual_seed(3)
    from lsdc.data.multitask import _random_theta

    for _ in range(5):
        theta = _random_theta(MultitaskAugmentConfig(rotate_deg=25, scale=0.2, shift=0.1), gen)
        moved = warp(img, theta)[0]
        y, x = np.unravel_index(int(moved.argmax()), moved.shape)
        px, py = (warp_points(point, theta)[0] * 64 - 0.5).tolist()
        assert abs(px - x) <= 1.0 and abs(py - y) <= 1.0


def test_mirror_batch_is_an_involution_and_swaps_sides(toy_multitask_cache):
    cache = toy_multitask_cache(n_studies=2, size=32, hires=40)
    batch = collate_multitask([MultitaskDataset(cache)[i] for i in range(2)])
    m = mirror_batch(batch)
    back = mirror_batch(m)
    for key, value in batch.items():
        torch.testing.assert_close(back[key], value, msg=key)  # x -> 1 - x -> x: float round-off
    left = TARGETS.index("left_neural_foraminal_narrowing_l3_l4")
    right = TARGETS.index("right_neural_foraminal_narrowing_l3_l4")
    assert torch.equal(m["sagittal_images"][:, 0], batch["sagittal_images"][:, 1])
    assert torch.equal(m["labels"][:, left], batch["labels"][:, right])
    torch.testing.assert_close(m["points"][:, RIGHT_L4, 0], 1 - batch["points"][:, LEFT_L4, 0])


def test_teacher_forcing_keeps_its_floor_and_jitters_its_windows(toy_multitask_cache):
    cache = toy_multitask_cache(n_studies=4, size=32, hires=40)
    cfg = _only(teacher_start=1.0, teacher_epochs=2, teacher_end=0.5, teacher_jitter=0.4)
    ds = MultitaskDataset(cache, config=cfg, train=True, seed=3)
    ds.set_epoch(1)
    assert ds._teacher_prob() == pytest.approx(0.75)  # halfway from 1 to 0.5
    ds.set_epoch(7)
    assert ds._teacher_prob() == pytest.approx(0.5)  # stays at the floor
    ds.set_epoch(0)
    items = [ds[i] for i in range(4)]
    assert all(bool(it["teacher"]) for it in items)
    jitter = torch.stack([it["teacher_jitter"] for it in items])
    assert jitter.abs().max() <= 0.4 and jitter.abs().max() > 0.1
    assert len({tuple(j.flatten().tolist()) for j in jitter}) == 4  # drawn per study
    torch.testing.assert_close(ds[2]["teacher_jitter"], items[2]["teacher_jitter"])  # seeded
    # Not teacher-forced, or not training: no offset.
    ds.cfg.augment.teacher_start = ds.cfg.augment.teacher_end = 0.0
    assert not ds[0]["teacher_jitter"].any()
    assert not MultitaskDataset(cache, config=cfg)[0]["teacher_jitter"].any()


def test_mirror_batch_turns_the_axial_jitter_with_its_points(toy_multitask_cache):
    cache = toy_multitask_cache(n_studies=2, size=32, hires=40)
    batch = collate_multitask([MultitaskDataset(cache)[i] for i in range(2)])
    batch["teacher_jitter"] = torch.rand(2, 25, 2) - 0.5
    m = mirror_batch(batch)
    back = mirror_batch(m)
    torch.testing.assert_close(back["teacher_jitter"], batch["teacher_jitter"])
    j = batch["teacher_jitter"]
    assert m["teacher_jitter"][:, RIGHT_L4, 0].tolist() == (-j[:, LEFT_L4, 0]).tolist()
    assert m["teacher_jitter"][:, RIGHT_L4, 1].tolist() == j[:, LEFT_L4, 1].tolist()
    left = TARGETS.index("left_neural_foraminal_narrowing_l3_l4")
    right = TARGETS.index("right_neural_foraminal_narrowing_l3_l4")
    assert m["teacher_jitter"][:, right].tolist() == j[:, left].tolist()  # sagittal: no turn


def test_old_cache_format_is_refused(tmp_path):
    from lsdc.preprocess.cache import StudyCache

    StudyCache(tmp_path / "old", "multitask", {"format": 1, "split": "train"})
    with pytest.raises(ValueError, match="preprocess it again"):
        MultitaskDataset(tmp_path / "old")


def _five_slice_cache(root):
    """The toy cache rewritten with 5 slices a crop, slice j filled with j / 10 (image and
    native window), as a cache made with selection.neighbours=2 stores them."""
    from lsdc.preprocess.cache import StudyCache

    cache = StudyCache.open(root)
    for sid in cache.study_ids():
        arrays, meta = cache.load(sid)
        for name in list(arrays):
            if name.endswith(("__image", "__hires")):
                h, w = arrays[name].shape[-2:]
                ramp = np.arange(5, dtype=np.float16)[:, None, None] / 10
                arrays[name] = np.broadcast_to(ramp, (5, h, w)).copy()
        cache.save(sid, arrays, meta)
    return root


def test_slice_shift_takes_three_neighbouring_slices_off_centre(toy_multitask_cache):
    cache = _five_slice_cache(toy_multitask_cache(n_studies=1, size=16, hires=24))
    plain = MultitaskDataset(cache)[0]["axial_images"]  # (5 crops, 3, H, W)
    # Outside training (and in training without the shift) the centre three: slices 1, 2, 3.
    np.testing.assert_allclose(plain[:, :, 0, 0].numpy(), [[0.1, 0.2, 0.3]] * 5, atol=1e-3)
    ds = MultitaskDataset(cache, config=_only(slice_shift_prob=1.0), train=True)
    firsts = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[0]
        for group in ("axial", "sagittal"):
            for image, fine in zip(item[f"{group}_images"], item[f"{group}_fine"], strict=True):
                values = image[:, 0, 0].numpy()
                first = round(float(values[0]) * 10)
                np.testing.assert_allclose(values, (first + np.arange(3)) / 10, atol=1e-3)
                np.testing.assert_allclose(fine[:, 0, 0].numpy(), values, atol=1e-3)
                firsts.add(first)
    assert firsts == {0, 2}  # always shifted, one slice either way
