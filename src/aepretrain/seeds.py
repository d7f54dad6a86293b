"""Named random streams: every seed the tool uses is derived from the run's seed and a name.

A name says what the stream is for, so two streams never share draws by accident and a new one
changes no existing one. The streams older than this module keep the values they always had
(``KEPT``), so that every published number reproduces; a new name is hashed.

Example:
    >>> derive_seed(0, "loader") == derive_seed(0, "loader")
    True
    >>> derive_seed(0, "loader") != derive_seed(1, "loader") != derive_seed(0, "ae-val")
    True
    >>> derive_seed(7, "val-split"), derive_seed(7, "epoch-order", 2)
    (8, 7015859)
    >>> int(numpy_generator(0, "label-fractions").integers(100)) == int(numpy_generator(0, "label-fractions").integers(100))
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np


def _mix(seed: int, index: int, salt: int) -> int:
    return (seed * 1_000_003 + index * 7919 + salt) % (2**63)


KEPT: dict[str, Callable[..., int | list[int]]] = {
    "model-init": lambda seed: seed,  # the weights both arms and every stage start from
    "test-carve": lambda seed: seed,  # the test split of a data set that has none
    "train-limit": lambda seed: seed,
    "test-limit": lambda seed: seed,
    "probe-subset": lambda seed: seed,
    "val-limit": lambda seed: seed,  # the study's smaller validation set
    "val-split": lambda seed: seed + 1,
    "ae-subset": lambda seed: seed + 2,
    "random-encoder": lambda seed: seed + 99,  # the probes' untrained baseline
    "epoch-order": lambda seed, epoch: _mix(seed, epoch, 0),  # the sampler's order in each epoch
    "epoch-draws": lambda seed, epoch: _mix(seed, epoch, 1),  # augmentation and dropout in each epoch
    "decoder-init": lambda seed, stage: _mix(seed, stage, 2),
    "label-fractions": lambda seed: [seed, 17],  # the study's nested labelled subsets (numpy entropy)
    "synthetic": lambda seed, split: [seed, split],  # the synthetic data set's images: split 0 train, 1 test
}


def derive_seed(seed: int, name: str, *parts: int | str) -> int:
    """A seed below 2**63 from the run's ``seed``, a stream ``name`` and optional parts (an epoch, a stage)."""
    if name in KEPT:
        kept = KEPT[name](seed, *parts)
        if isinstance(kept, int):
            return kept
    text = "\0".join(map(str, (seed, name, *parts)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def numpy_generator(seed: int, name: str, *parts: int | str) -> np.random.Generator:
    """A numpy generator of the named stream."""
    kept = KEPT[name](seed, *parts) if name in KEPT else None
    return np.random.default_rng(kept if isinstance(kept, list) else derive_seed(seed, name, *parts))
