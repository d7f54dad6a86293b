"""Fashion-MNIST, the built-in default: idx files from --root, else Debian's dataset-fashion-mnist, else the copy
`aepretrain download --dataset fashion-mnist` put in the cache folder. Reading never downloads.

70,000 grayscale 28x28 images of 10 kinds of clothing (60,000 train, 10,000 official test).
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError, shown
from .base import Source
from .cache import cached, fingerprint
from .download import downloaded_root

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
RESIZE_CHUNK = 2048  # images resized at a time: memory stays small at any size
HOW_TO_GET = ("get it with `sudo apt-get install dataset-fashion-mnist` or `aepretrain download --dataset "
              "fashion-mnist`, or pass --root to a folder holding the four idx files")


def _present(root: Path, stem: str) -> Path | None:
    return next((root / name for name in (stem + ".gz", stem) if (root / name).is_file()), None)


def _find(root: Path, stem: str) -> Path:
    path = _present(root, stem)
    if path is None:
        raise UserError(f"Fashion-MNIST file {stem}(.gz) not found in {root}; {HOW_TO_GET}")
    return path


def find_root(root: str | None) -> Path:
    """The folder to read: ``root`` when given, else the first of Debian's folder and the downloaded copy that
    holds all four idx files."""
    if root:
        if not Path(root).is_dir():
            raise UserError(f"Fashion-MNIST not found (--root {shown(root)} does not exist); {HOW_TO_GET}")
        return Path(root)
    places = (DEBIAN_ROOT, downloaded_root("fashion-mnist"))
    for folder in places:
        if all(_present(folder, stem) for stems in FILES.values() for stem in stems):
            return folder
    raise UserError(f"Fashion-MNIST not found (neither {places[0]} nor {places[1]} holds its four idx files); "
                    f"{HOW_TO_GET}")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 + 4 * ndim or int.from_bytes(raw[2:3], "big") != 0x08 or raw[3] != ndim:
        raise UserError(f"{path} is not an idx file of {ndim} dimension(s) of unsigned bytes")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(shape))} values, found {data.size}")
    return data.reshape(shape)


def resize_batch(images: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W) or (N, H, W, C) uint8 to (N, size, size, C) uint8, antialiased bilinear."""
    x = torch.from_numpy(np.array(images if images.ndim == 4 else images[..., None])).permute(0, 3, 1, 2).float()
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def read(root: str | None, size: int, cache_dir: str | None, **_: object) -> Source:
    folder = find_root(root)
    splits = {}
    for split, (images_stem, labels_stem) in FILES.items():
        paths = [_find(folder, images_stem), _find(folder, labels_stem)]

        def read_split(paths: list[Path] = paths, split: str = split
                       ) -> tuple[np.ndarray, list[str], Iterator[np.ndarray], tuple[int, ...]]:
            images, labels = _read_idx(paths[0], 3), _read_idx(paths[1], 1)
            if len(images) != len(labels):
                raise UserError(f"{paths[0]} holds {len(images)} images but {paths[1]} {len(labels)} labels")
            chunks = (resize_batch(images[i:i + RESIZE_CHUNK], size) for i in range(0, len(images), RESIZE_CHUNK))
            return labels.astype(np.int64), [f"{split}/{i}" for i in range(len(labels))], chunks, \
                (len(labels), size, size, 1)

        splits[split] = cached(cache_dir, f"fashion-mnist-{split}-{size}", fingerprint(paths, size), folder, read_split)
    return Source(classes=list(CLASSES), train=splits["train"], test=splits["test"], channels=1,
                  root=str(folder))
