"""Augmentation and teacher forcing through the engine's own loader with persistent workers:
each worker holds its copy of the dataset for the whole run, so the epoch must reach it (issue
19, item 1: before, every epoch replayed epoch 0 and teacher forcing never decayed)."""

from __future__ import annotations

import torch

from lsdc.data.multitask import MultitaskDataConfig, MultitaskDataset, collate_multitask
from lsdc.data.sequence import AugmentConfig, SequenceDataset, collate_sequence
from lsdc.training.engine import EngineConfig, _loader


def _epochs(ds, collate, workers: int, key: str, epochs=(0, 1, 5)) -> dict[int, torch.Tensor]:
    loader = _loader(ds, EngineConfig(batch_size=2, num_workers=workers), collate, train=False)
    out = {}
    for epoch in epochs:
        ds.set_epoch(epoch)  # what the training module does at each epoch start, in the parent
        out[epoch] = torch.cat([b[key].float().reshape(len(b[key]), -1) for b in loader])
    return out


def test_sequence_augmentation_changes_every_epoch_in_persistent_workers(toy_sequence_cache):
    ds = SequenceDataset(
        toy_sequence_cache(n_studies=4, size=16, num_slices=3), augment=AugmentConfig()
    )
    with_workers = _epochs(ds, collate_sequence, 2, "images")
    alone = _epochs(ds, collate_sequence, 0, "images")
    assert not torch.equal(with_workers[0], with_workers[1])
    for epoch, batch in with_workers.items():
        torch.testing.assert_close(batch, alone[epoch])  # the same draws as in one process


def test_teacher_forcing_decays_in_persistent_workers(toy_multitask_cache):
    cfg = MultitaskDataConfig()
    cfg.augment.teacher_start, cfg.augment.teacher_epochs = 1.0, 2
    ds = MultitaskDataset(toy_multitask_cache(n_studies=4, size=16), config=cfg, train=True)
    teacher = _epochs(ds, collate_multitask, 2, "teacher")
    assert bool(teacher[0].all()) and not bool(teacher[5].any())


def test_teacher_jitter_is_drawn_alike_in_persistent_workers(toy_multitask_cache):
    cfg = MultitaskDataConfig()
    cfg.augment.teacher_start = cfg.augment.teacher_end = 1.0
    cfg.augment.teacher_jitter = 0.5
    ds = MultitaskDataset(toy_multitask_cache(n_studies=4, size=16), config=cfg, train=True)
    with_workers = _epochs(ds, collate_multitask, 2, "teacher_jitter")
    alone = _epochs(ds, collate_multitask, 0, "teacher_jitter")
    assert not torch.equal(with_workers[0], with_workers[1])  # new offsets every epoch
    for epoch, jitter in with_workers.items():
        torch.testing.assert_close(jitter, alone[epoch])
