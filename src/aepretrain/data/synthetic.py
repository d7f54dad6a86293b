"""A small procedurally generated labelled data set for tests: deterministic from a seed.

Each class is an oriented stripe pattern of its own angle, frequency and colour, with random
phase, shift and noise per image, so a small CNN can learn it and an autoencoder can reconstruct it.
"""

from __future__ import annotations

import numpy as np

from ..seeds import numpy_generator
from .base import Labelled, Source


def generate(classes: int, per_class: int, size: int, seed: int, split: str) -> Labelled:
    rng = numpy_generator(seed, "synthetic", 0 if split == "train" else 1)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images, labels = [], []
    for k in range(classes):
        angle = np.pi * k / classes
        freq = 3.0 + 2.0 * (k % 3)
        colour = np.array([0.3 + 0.7 * ((k + c) % 3 == 0) for c in range(3)], np.float32)
        for _ in range(per_class):
            phase = rng.uniform(0, 2 * np.pi)
            a = angle + rng.normal(0, 0.08)
            wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * (xx * np.cos(a) + yy * np.sin(a)) + phase)
            img = wave[..., None] * colour + rng.normal(0, 0.05, (size, size, 3)).astype(np.float32)
            images.append(np.clip(img * 255, 0, 255).astype(np.uint8))
            labels.append(k)
    order = rng.permutation(len(labels))
    return Labelled(np.stack(images)[order], np.array(labels, np.int64)[order],
                    [f"{split}/{i}" for i in order])


def read(root: str | None, size: int, seed: int, classes: int = 4, per_class: int = 40, **_: object) -> Source:
    names = [f"pattern{k}" for k in range(classes)]
    return Source(classes=names, channels=3,
                  train=generate(classes, per_class, size, seed, "train"),
                  test=generate(classes, max(1, per_class // 2), size, seed, "test"))
