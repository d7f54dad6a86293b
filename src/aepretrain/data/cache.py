"""Decode and resize once: uint8 arrays cached on disk, keyed by data set, split, size and content.

The key hashes the name, size and modification time of every source file (and the settings that
change decoding), so a changed, added or removed file rebuilds the cache and nothing else does.
Files are written to a temporary name and renamed, so an interrupted write leaves no bad cache.

Example:
    >>> images, skipped = decode_cached("folder", "train", paths, labels, names, 64, 10**8, None)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..fileio import write_stream
from .base import Labelled
from .images import decode_many

FORMAT_VERSION = 1


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    base = os.environ.get("AEPRETRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aepretrain")
    return Path(base)


def fingerprint(paths: list[Path], *settings: object) -> str:
    digest = hashlib.sha1(json.dumps([FORMAT_VERSION, *map(str, settings)]).encode())
    for path in paths:
        try:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:20]


def cached(cache_dir: str | None, name: str, key: str, build: Callable[[], tuple[Labelled, list[dict]]]
           ) -> tuple[Labelled, list[dict]]:
    """Load ``name-key.npz`` from the cache, or build it and store it."""
    folder = cache_root(cache_dir)
    path = folder / f"{name}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                return Labelled(z["images"], z["labels"], meta["names"]), meta["skipped"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable cache: rebuild it
    data, skipped = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        meta = json.dumps({"names": data.names, "skipped": skipped})
        write_stream(path, lambda f: np.savez(f, images=data.images, labels=data.labels, meta=np.array(meta)))
    except OSError:
        pass  # a read-only or full cache folder costs speed, not correctness
    return data, skipped


def decode_cached(dataset: str, split: str, paths: list[Path], labels: list[int], names: list[str],
                  size: int, max_pixels: int, cache_dir: str | None) -> tuple[Labelled, list[dict]]:
    """Decode ``paths`` to size x size RGB (cached); undecodable files are skipped with their reason."""

    def build() -> tuple[Labelled, list[dict]]:
        pixels, reasons = decode_many(paths, size, max_pixels)
        ok = [i for i, p in enumerate(pixels) if p is not None]
        skipped = [{"path": str(paths[i]), "reason": reasons[i]} for i, p in enumerate(pixels) if p is None]
        images = np.stack([pixels[i] for i in ok]) if ok else np.zeros((0, size, size, 3), np.uint8)
        return Labelled(images, np.array([labels[i] for i in ok], np.int64), [names[i] for i in ok]), skipped

    key = fingerprint(paths, dataset, split, size, max_pixels)
    return cached(cache_dir, f"{dataset}-{split}-{size}", key, build)
