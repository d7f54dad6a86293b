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


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``size`` items, classes in proportion; all items when there are no more than ``size``."""
    if size >= len(labels):
        return np.arange(len(labels))
    _, taken = stratified_split(labels, size / len(labels), seed)
    return taken
