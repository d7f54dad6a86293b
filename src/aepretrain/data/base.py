"""The shapes data takes on its way to training: stores of decoded pixels, index views into them, and a bundle.

A data set is decoded once into a store (a file in the cache, memory-mapped, read by the OS page cache). A split,
a subset or the pre-training set is an index array into one or more stores: taking one copies no pixel; only
gathering a batch does.

Example:
    >>> pixels = np.arange(4 * 2 * 2, dtype=np.uint8).reshape(4, 2, 2, 1)
    >>> part = Labelled(pixels, np.array([0, 1, 0, 1]), ["a", "b", "c", "d"]).take(np.array([3, 1]))
    >>> part.images.shape, part.names, part.images[0][0, 0, 0]
    ((2, 2, 2, 1), ['d', 'b'], np.uint8(12))
    >>> np.shares_memory(part.images.stores[0].pixels, pixels)
    True
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

UNLABELLED = -1


def digest(row: np.ndarray | bytes | memoryview) -> int:
    """XXH3's 64 bits of one image's pixels: the store's integrity check, and how the same image is recognised
    under another file name. A fast non-cryptographic hash, computed as each image is written: it costs the
    decoders next to nothing (SHA-1 took 4-5 % of their time)."""
    return xxhash.xxh3_64_intdigest(row)


def match_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """NHWC uint8 to ``channels``: RGB to gray by luminance, or gray repeated to RGB."""
    if images.shape[-1] == channels:
        return images
    if channels == 1:
        gray = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        return np.clip(gray.round(), 0, 255).astype(np.uint8)[..., None]
    return np.repeat(images, channels, axis=-1)


class Store:
    """Decoded images (M, H, W, C) uint8: a read-only memory map of a cache file, or an array in memory, and a
    content digest per row (read from the cache entry, or computed when first asked for)."""

    def __init__(self, pixels: np.ndarray, digests: np.ndarray | None = None) -> None:
        self.pixels, self._digests = pixels, digests

    def digests(self, rows: np.ndarray) -> np.ndarray:
        if self._digests is None:
            self._digests = np.array([digest(np.ascontiguousarray(p)) for p in self.pixels], np.uint64)
        return self._digests[rows]

    def __reduce__(self) -> tuple[Any, ...]:
        """A memory-mapped store travels to another process (DataLoader workers, spawned DDP processes) as its
        file name and is mapped again there, never as a copy of its pixels."""
        if isinstance(self.pixels, np.memmap) and self.pixels.filename:
            return map_file, (Path(self.pixels.filename), self._digests)
        return Store, (self.pixels, self._digests)


def map_file(path: Path, digests: np.ndarray | None = None) -> Store:
    """The store in a raw ``.npy`` file, mapped read-only."""
    return Store(np.lib.format.open_memmap(path, mode="r"), digests)


class Images:
    """(N, H, W, C) uint8 images as rows of stores. ``take`` and ``concat`` make index arrays, not copies; indexing
    gathers the rows (in file order, which the page cache reads fastest) into a new array, converting them to
    ``channels`` on the way where asked."""

    def __init__(self, stores: tuple[Store, ...], part: np.ndarray, rows: np.ndarray, channels: int | None = None) -> None:
        self.stores, self.part, self.rows = stores, part, rows
        height, width, depth = stores[0].pixels.shape[1:]
        self.shape = (len(rows), height, width, channels or depth)
        self.channels = channels
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4

    @staticmethod
    def of(pixels: np.ndarray) -> "Images":
        return Images((Store(pixels),), np.zeros(len(pixels), np.int16), np.arange(len(pixels)))

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, index: np.ndarray) -> "Images":
        return Images(self.stores, self.part[index], self.rows[index], self.channels)

    def with_channels(self, channels: int) -> "Images":
        return Images(self.stores, self.part, self.rows, channels)

    @staticmethod
    def concat(parts: list["Images"]) -> "Images":
        stores: list[Store] = []
        for p in parts:
            stores += [s for s in p.stores if not any(s is t for t in stores)]
        where = [np.array([next(k for k, t in enumerate(stores) if t is s) for s in p.stores], np.int16) for p in parts]
        channels = {p.shape[-1] for p in parts}
        if len({p.shape[1:3] for p in parts}) > 1 or len(channels) > 1:
            raise ValueError(f"cannot join images of shapes {sorted({p.shape[1:] for p in parts})}")
        explicit = {p.channels for p in parts} - {None}
        return Images(tuple(stores), np.concatenate([w[p.part] for w, p in zip(where, parts)]),
                      np.concatenate([p.rows for p in parts]), explicit.pop() if explicit else None)

    def gather(self, index: np.ndarray) -> np.ndarray:
        """The pixels of items ``index``, a new array, read store by store in row order."""
        index = np.asarray(index, np.int64)
        out = np.empty((len(index), *self.shape[1:]), np.uint8)
        for s, store in enumerate(self.stores):
            mine = np.flatnonzero(self.part[index] == s) if len(self.stores) > 1 else np.arange(len(index))
            rows = self.rows[index[mine]]
            order = np.argsort(rows, kind="stable")
            out[mine[order]] = match_channels(np.asarray(store.pixels[rows[order]]), self.shape[-1])
        return out

    def digests(self) -> np.ndarray:
        """The content digest of every item (uint64): equal images have equal digests, whatever their file names."""
        out = np.empty(len(self), np.uint64)
        for s, store in enumerate(self.stores):
            mine = self.part == s
            out[mine] = store.digests(self.rows[mine])
        return out

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(key, (int, np.integer)):
            return self.gather(np.array([range(len(self))[key]]))[0]
        return self.gather(np.arange(len(self))[key])

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        pixels = self.gather(np.arange(len(self)))
        return pixels if dtype is None else pixels.astype(dtype)


@dataclass
class Labelled:
    """Images (N, H, W, C) uint8 with labels (N,) int64 (-1: unlabelled) and source names. An array given as
    ``images`` becomes a store in memory."""

    images: Images
    labels: np.ndarray
    names: list[str]

    def __post_init__(self) -> None:
        if isinstance(self.images, np.ndarray):
            self.images = Images.of(self.images)

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> "Labelled":
        return Labelled(self.images.take(index), self.labels[index], [self.names[i] for i in index])

    @staticmethod
    def concat(parts: list["Labelled"]) -> "Labelled":
        return Labelled(Images.concat([p.images for p in parts]), np.concatenate([p.labels for p in parts]),
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
    root: str | None = None  # the folder read where the reader chose it (Fashion-MNIST without --root)


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

    def describe(self, sample_grid: Path | None = None) -> dict[str, Any]:
        """What `aepretrain data` prints: counts per split and class, image size, what was skipped and why; with
        a path, a grid of sample train images is drawn there."""
        if sample_grid is not None:
            from ..figures import sample_grid as draw  # matplotlib loads only when a grid is drawn

            draw(self.train.images, self.train.labels, self.classes, sample_grid)
        return {
            "dataset": self.dataset, "root": self.root, "classes": self.classes, "class_ids": self.class_ids,
            "counts": self.counts(), "per_class": self.per_class(),
            "image_size": [self.image_size, self.image_size, self.channels],
            "skipped": self.skipped, "missing": self.missing, "notes": self.notes,
            "sample_grid": str(sample_grid) if sample_grid else None,
        }

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test), "ae": len(self.ae),
                "ae_val": len(self.ae_val)}

    def per_class(self) -> dict[str, dict[str, int]]:
        table = {}
        for k, name in enumerate(self.classes):
            table[name] = {split: int((getattr(self, split).labels == k).sum()) for split in ("train", "val", "test")}
        return table
