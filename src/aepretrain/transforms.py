"""Pixels as the networks take them, the reference's augmentation and the contrastive objectives' views, batched on
the training device.

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
    >>> a, b = two_views(torch.rand(2, 1, 16, 16))
    >>> tuple(a.shape), bool((a != b).any())
    ((2, 1, 16, 16), True)
"""

from __future__ import annotations

import functools

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


@functools.cache
def view_augmenter(size: tuple[int, int], channels: int) -> nn.Module:
    """SimCLR's view augmentation (Chen et al. 2020, appendix A) as its CIFAR-10 runs use it at 32 px: a random
    resized crop of 20-100 % of the area (8 % leaves a few pixels at this size), a horizontal flip, colour jitter
    of strength 0.5 with p 0.8 (brightness and contrast only on gray images), grayscale with p 0.2 (colour images),
    and no blur (the paper leaves it out at 32 px). It holds no state, so one instance serves every call."""
    colour = channels == 3
    steps: list[nn.Module] = [K.RandomResizedCrop(size, scale=(0.2, 1.0)), K.RandomHorizontalFlip(),
                              K.ColorJitter(0.4, 0.4, 0.4 if colour else 0.0, 0.1 if colour else 0.0, p=0.8)]
    if colour:
        steps.append(K.RandomGrayscale(p=0.2))
    return nn.Sequential(*steps)


def two_views(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independently augmented views of a float NCHW batch, in fp32 whatever the autocast, laid out in memory
    as the batch is."""
    augment = view_augmenter((x.shape[-2], x.shape[-1]), x.shape[1])
    layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
    with torch.autocast(x.device.type, enabled=False):
        return augment(x).contiguous(memory_format=layout), augment(x).contiguous(memory_format=layout)
