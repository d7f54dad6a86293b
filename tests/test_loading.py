"""Batches from the store: the loader, its steps per epoch, the order per (seed, epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aepretrain.data.base import Labelled
from aepretrain.data.loading import EpochShuffle, ImageDataset, batches_per_epoch, loader


@pytest.mark.parametrize("n,batch,drop_last,expected", [(270, 128, True, 2), (270, 128, False, 3), (256, 128, True, 2),
                                                        (100, 128, True, 1), (0, 16, True, 0)])
def test_batches_per_epoch_matches_the_loader(n: int, batch: int, drop_last: bool, expected: int) -> None:
    assert batches_per_epoch(n, batch, drop_last) == expected
    if n:
        data = Labelled(np.zeros((n, 4, 4, 1), np.uint8), np.zeros(n, np.int64), [str(i) for i in range(n)])
        assert len(list(loader(data, batch, True, seed=0, drop_last=drop_last))) == expected


def test_epoch_shuffle_depends_on_seed_and_epoch_only() -> None:
    a, b = EpochShuffle(50, seed=3), EpochShuffle(50, seed=3)
    first = list(a)
    assert sorted(first) == list(range(50)) and first != list(range(50))
    torch.manual_seed(123)  # the global generator plays no part
    assert list(b) == first
    a.set_epoch(1)
    assert list(a) != first and sorted(a) == list(range(50))
    assert list(EpochShuffle(50, seed=4)) != first


def test_a_batch_is_gathered_in_file_order_as_nchw_uint8() -> None:
    images = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    data = Labelled(images, np.arange(6) * 10, [str(i) for i in range(6)])
    x, y = ImageDataset(data).__getitems__([5, 1, 3])
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 3, 2, 2)
    assert y.tolist() == [10, 30, 50]  # sorted: the store is read forward
    assert torch.equal(x[1], torch.from_numpy(images[3]).permute(2, 0, 1))
