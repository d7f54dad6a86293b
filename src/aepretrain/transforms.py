"""Pixels as the networks take them, and the reference's augmentation, batched on the training device.

Images are kept as uint8 (N, H, W, C); a network takes float32 in [0, 1], (N, C, H, W), without mean or
standard-deviation normalisation, as the reference did.

Example:
    >>> import numpy as np
    >>> x = pixels(np.full((2, 4, 4, 3), 255, np.uint8))
    >>> tuple(x.shape), float(x.max())
    ((2, 3, 4, 4), 1.0)
    >>> from aepretrain.config import AugmentConfig
    >>> [type(step).__name__ for step in augmenter(AugmentConfig(rotation=10, zoom=0.1))]
    ['RandomAffine', 'ColorJitter', 'RandomHorizontalFlip']
"""

from __future__ import annotations

import kornia.augmentation as K
import numpy as np
import torch
from torch import nn

from .config import AugmentConfig


def to_float(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 pixels of NCHW shape to float in [0, 1], in channels-last memory when asked."""
    x = x.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def pixels(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (N, H, W, C), an array or a tensor, as float NCHW in [0, 1]."""
    return to_float(torch.as_tensor(images).permute(0, 3, 1, 2))


def augmenter(cfg: AugmentConfig) -> nn.Module:
    """The reference's augmentation, batched: rotation, zoom, multiplicative brightness, horizontal flip."""
    steps: list[nn.Module] = []
    if cfg.rotation or cfg.zoom:
        zoom = (1 - cfg.zoom, 1 + cfg.zoom)
        steps.append(K.RandomAffine(degrees=cfg.rotation, scale=zoom * 2 if cfg.zoom_axes == "independent" else zoom,
                                    padding_mode="border" if cfg.fill == "nearest" else "zeros", p=1.0))
    if cfg.brightness and tuple(cfg.brightness) != (1.0, 1.0):
        steps.append(K.ColorJitter(brightness=tuple(cfg.brightness), p=1.0))
    if cfg.hflip:
        steps.append(K.RandomHorizontalFlip())
    return nn.Sequential(*steps)
