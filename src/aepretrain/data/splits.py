"""Seeded, stratified splits: validation from train, the autoencoder subset, capped subsets.

Every function takes labels and returns sorted index arrays, so a split is the same for the same
labels and seed on any machine. Unlabelled items (label -1) form one stratum of their own.

Example:
    >>> import numpy as np
    >>> keep, take = stratified_split(np.array([0, 0, 1, 1]), 0.5, seed=0)
    >>> sorted(np.concatenate([keep, take]).tolist())
    [0, 1, 2, 3]
"""

from __future__ import annotations

import numpy as np

from ..seeds import derive_seed


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, taken): ``fraction`` of each class is taken, rounded, at least one where a class has two."""
    rng = np.random.default_rng(seed)
    kept, taken = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n = int(round(fraction * len(members)))
        if fraction > 0 and n == 0 and len(members) > 1:
            n = 1
        taken.append(members[:n])
        kept.append(members[n:])
    return np.sort(np.concatenate(kept)).astype(np.int64), np.sort(np.concatenate(taken)).astype(np.int64)


def autoencoder_split(labels: np.ndarray, fraction: float, val_fraction: float, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) of the autoencoders: ``fraction`` of the pool, stratified, all of it trained on, as the
    reference did; their validation loss on as many images again times ``val_fraction``, drawn from the rest of
    the pool. When the subset is the whole pool, ``val_fraction`` of it is held out instead.

    >>> train, val = autoencoder_split(np.repeat([0, 1], 30), 1 / 3, 0.1, seed=0)
    >>> len(train), len(val), len(set(train) & set(val))
    (20, 2, 0)
    """
    rest, subset = stratified_split(labels, fraction, derive_seed(seed, "ae-subset"))
    stream = derive_seed(seed, "ae-val")
    if len(rest) == 0:
        fit, val = stratified_split(labels, val_fraction, stream)
        return fit, val
    size = max(1, round(val_fraction * len(subset)))
    return subset, rest[stratified_subset(labels[rest], size, stream)]


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` items, classes in proportion; all items when there are no more than ``size``."""
    if size >= len(labels):
        return np.arange(len(labels))
    _, taken = stratified_split(labels, size / len(labels), seed)
    return taken
