"""The shapes data takes on its way to training: decoded images with labels, and a prepared bundle."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

UNLABELLED = -1


@dataclass
class Labelled:
    """Decoded images (N, H, W, C) uint8 with labels (N,) int64 (-1: unlabelled) and source names."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "Labelled":
        return Labelled(self.images[index], self.labels[index], [self.names[i] for i in index])

    @staticmethod
    def concat(parts: list["Labelled"]) -> "Labelled":
        return Labelled(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
                        [n for p in parts for n in p.names])


@dataclass
class Source:
    """What a data set reader returns: decoded pools, before splitting."""

    classes: list[str]
    train: Labelled
    test: Labelled | None  # None: no official test split, one is carved from train
    channels: int
    class_ids: list[int] | None = None  # official ids, metadata only
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    missing: list[str] = field(default_factory=list)  # listed but absent


@dataclass
class DataBundle:
    """The splits a run trains, validates, pre-trains and tests on."""

    dataset: str
    root: str | None
    classes: list[str]
    channels: int
    image_size: int
    train: Labelled
    val: Labelled
    test: Labelled
    ae: Labelled  # what the autoencoders train on
    ae_val: Labelled  # their validation images, none of them in ``ae``
    class_ids: list[int] | None = None
    skipped: list[dict[str, str]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test), "ae": len(self.ae),
                "ae_val": len(self.ae_val)}

    def per_class(self) -> dict[str, dict[str, int]]:
        table = {}
        for k, name in enumerate(self.classes):
            table[name] = {split: int((getattr(self, split).labels == k).sum()) for split in ("train", "val", "test")}
        return table
