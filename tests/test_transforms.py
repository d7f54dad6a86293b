"""Pixels as the networks take them."""

from __future__ import annotations

import numpy as np
import torch

from aepretrain.transforms import pixels, to_float


def test_pixels_are_float_nchw_in_0_1_exactly_as_uint8_over_255() -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 5, 4, 2), dtype=np.uint8)
    x = pixels(images)
    assert x.dtype == torch.float32 and tuple(x.shape) == (3, 2, 5, 4)
    assert torch.equal(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    assert torch.equal(pixels(torch.from_numpy(images)), x)
    assert float(pixels(np.full((1, 1, 1, 1), 255, np.uint8))) == 1.0


def test_to_float_leaves_its_input_alone_and_gives_channels_last_when_asked() -> None:
    x = torch.full((2, 3, 4, 4), 51, dtype=torch.uint8)
    y = to_float(x, channels_last=True)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.allclose(y, torch.full_like(y, 0.2))
    assert int(x[0, 0, 0, 0]) == 51
