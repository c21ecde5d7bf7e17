"""The epoch a training dataset draws its augmentation from, seen by every loader worker."""

from __future__ import annotations

import torch


class SharedEpoch:
    """An epoch number in shared memory. Loader workers hold their own copy of the dataset (a
    persistent one for the whole run), so a plain attribute set on the main process's copy
    never reaches them: every epoch would replay epoch 0's augmentation and teacher forcing
    would never decay. Workers read this value when they draw an item."""

    def __init__(self, epoch: int = 0) -> None:
        self._value = torch.full((), int(epoch), dtype=torch.int64).share_memory_()

    def set(self, epoch: int) -> None:
        self._value.fill_(int(epoch))

    def get(self) -> int:
        return int(self._value.item())
