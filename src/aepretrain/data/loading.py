"""Batches for training: gathered a whole batch at a time from the store, in an order that depends only on
(seed, epoch), so that a resumed fit sees the same batches as an unbroken one.

Example:
    >>> import numpy as np
    >>> from aepretrain.data.base import Labelled
    >>> data = Labelled(np.zeros((10, 4, 4, 1), np.uint8), np.arange(10) % 2, [str(i) for i in range(10)])
    >>> x, y = next(iter(loader(data, batch_size=4, shuffle=True, seed=0)))
    >>> tuple(x.shape), x.dtype, len(y)
    ((4, 1, 4, 4), torch.uint8, 4)
    >>> batches_per_epoch(10, 4, drop_last=True)
    2
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..seeds import derive_seed
from .base import Labelled


class ImageDataset(Dataset):
    """Images as CHW uint8 tensors with their labels, gathered a whole batch at a time from the store.

    ``__getitems__`` takes a batch's indices, reads their rows in file order (sorted: the page cache reads
    forward) in one numpy gather, and returns the batch in that order: one copy per batch, no Python work per
    image. The order within a batch is then a function of the sampler's, so still of (seed, epoch) only.
    """

    def __init__(self, data: Labelled) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        index = np.sort(np.asarray(indices, np.int64))
        x = torch.from_numpy(self.data.images.gather(index)).permute(0, 3, 1, 2)  # NHWC memory, NCHW shape
        return x, torch.from_numpy(self.data.labels[index])


def whole_batch(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataLoader's collate step: ``ImageDataset.__getitems__`` already returns the batch."""
    return batch


class EpochShuffle(Sampler[int]):
    """A random order that depends only on (seed, epoch): a resumed run sees the same order as an unbroken one."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "epoch-order", self.epoch))
        return iter(torch.randperm(self.n, generator=generator).tolist())


def loader(data: Labelled, batch_size: int, shuffle: bool, seed: int, workers: int = 0,
           drop_last: bool = False) -> DataLoader:
    """Batches of ``data``. The loader draws its workers' base seed from a generator of its own, not from the
    global one: Lightning creates the iterator at another moment in a resumed fit than in an unbroken one, and a
    draw from the global generator there would shift the augmentation and dropout of the epoch."""
    return DataLoader(ImageDataset(data), batch_size=min(batch_size, max(1, len(data))), collate_fn=whole_batch,
                      sampler=EpochShuffle(len(data), seed) if shuffle else None,
                      drop_last=drop_last and len(data) > batch_size,
                      num_workers=workers, pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(derive_seed(seed, "loader")))


def batches_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """The optimizer steps one epoch of ``loader(n images, batch_size, drop_last=...)`` really makes."""
    if n <= batch_size:
        return 1 if n else 0
    return n // batch_size if drop_last else math.ceil(n / batch_size)
