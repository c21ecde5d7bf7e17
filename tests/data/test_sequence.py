"""Sequence dataset: items, masks, and the left/right mirror augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lsdc.constants import AXIAL_T2, SERIES_TYPES, TARGETS, mirror_target
from lsdc.data.sequence import (
    AugmentConfig,
    SequenceDataset,
    augment_study,
    collate_sequence,
    mirror_images,
    mirror_targets,
)

AX = SERIES_TYPES.index(AXIAL_T2)


def test_items_and_collate(toy_sequence_cache):
    root = toy_sequence_cache(n_studies=4, size=16, missing={1: 2})
    ds = SequenceDataset(root)
    assert len(ds) == 4
    item = ds[1]
    assert item["images"].shape == (3, 10, 16, 16) and item["images"].dtype == torch.float32
    assert item["series_mask"].tolist() == [True, True, False]
    assert torch.all(item["images"][2] == 0)
    batch = collate_sequence([ds[i] for i in range(4)])
    assert batch["images"].shape == (4, 3, 10, 16, 16)
    assert batch["labels"].shape == (4, len(TARGETS))
    assert batch["study_id"].tolist() == ds.study_ids
    np.testing.assert_array_equal(ds.labels(), batch["labels"].numpy())


def test_labels_read_no_images(toy_sequence_cache, npz_reads):
    # At real scale a cache is tens of GB: the labels of every study must not cost its images.
    root = toy_sequence_cache(n_studies=3, size=16)
    ds = SequenceDataset(root)
    expected = np.stack([ds.cache.load(s)[0]["labels"] for s in ds.study_ids])
    read = npz_reads
    read.clear()  # only what follows
    np.testing.assert_array_equal(ds.labels(), expected)
    assert read == ["labels"] * 3


def test_labels_of_a_test_cache_are_unlabelled(toy_sequence_cache):
    ds = SequenceDataset(toy_sequence_cache(n_studies=2, size=16, split="test"))
    assert (ds.labels() == -1).all() and ds.labels().shape == (2, len(TARGETS))


def test_unknown_study_is_named(toy_sequence_cache):
    root = toy_sequence_cache(n_studies=2, size=16)
    with pytest.raises(KeyError, match="not in the cache"):
        SequenceDataset(root, [1000, 42])


def test_mirror_swaps_left_and_right_labels():
    labels = torch.arange(len(TARGETS))
    swapped = mirror_targets(labels)
    for j, t in enumerate(TARGETS):
        assert TARGETS[int(swapped[j])] == mirror_target(t)
    assert torch.equal(mirror_targets(swapped), labels)
    probs = np.random.default_rng(0).random((2, len(TARGETS), 3))
    np.testing.assert_array_equal(mirror_targets(mirror_targets(probs, 1), 1), probs)


def test_mirror_reverses_sagittal_slices_and_flips_axial_columns():
    # slice k of the sagittal types holds k (x order right->left); axial columns hold their index
    images = torch.zeros(3, 10, 4, 6)
    images[:2] = torch.arange(10.0)[None, :, None, None]
    images[AX] = torch.arange(6.0)[None, None, :]
    out = mirror_images(images)
    assert out[0, :, 0, 0].tolist() == list(range(9, -1, -1))
    assert out[1, :, 0, 0].tolist() == list(range(9, -1, -1))
    assert out[AX, 0, 0].tolist() == [5, 4, 3, 2, 1, 0]
    assert out[AX, :, :, 0].eq(5).all(), "axial slice order (head to feet) is unchanged"
    assert torch.equal(mirror_images(out), images)


def test_flip_augmentation_mirrors_images_and_labels_together():
    gen_images = torch.rand(3, 10, 8, 8)
    labels = torch.randint(0, 3, (len(TARGETS),))
    cfg = AugmentConfig(
        flip_prob=1.0, rotate_deg=0, scale=0, shift=0, contrast=0, brightness=0, gamma=0
    )
    mask = torch.ones(3, dtype=torch.bool)
    out, out_labels = augment_study(gen_images, mask, labels, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, mirror_images(gen_images), atol=1e-5, rtol=0)
    assert torch.equal(out_labels, mirror_targets(labels))
    cfg.flip_prob = 0.0
    out, out_labels = augment_study(gen_images, mask, labels, cfg, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, gen_images, atol=1e-5, rtol=0)
    assert torch.equal(out_labels, labels)


def test_augmentation_is_random_per_epoch_but_reproducible(toy_sequence_cache):
    root = toy_sequence_cache(n_studies=2, size=16)
    ds = SequenceDataset(root, augment=AugmentConfig(), seed=3)
    a = ds[0]["images"]
    assert torch.equal(a, ds[0]["images"])
    ds.set_epoch(1)
    assert not torch.equal(a, ds[0]["images"])
    plain = SequenceDataset(root)[0]["images"]
    assert not torch.equal(a, plain)
