"""Any folder of images: labelled (one subfolder per class) or unlabelled (images only, for pre-training).

    root/cat/a.jpg, root/dog/b.png, ...   labelled: classes are the subfolder names, sorted
    root/a.jpg, root/b.png, ...           unlabelled: label -1, usable for pre-training only

Every file is tried by content, whatever its extension; those that cannot be decoded are skipped and
reported. Hidden files are ignored. There is no official test split: one is carved from the images.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .base import UNLABELLED, Source
from .cache import decode_cached


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))


def read(root: str | None, size: int, cache_dir: str | None, max_pixels: int, **_: object) -> Source:
    if root is None:
        raise UserError("the folder data set needs --root DIR")
    folder = Path(root)
    if not folder.is_dir():
        raise UserError(f"data root not found: {folder}")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_files = {d.name: _files(d) for d in subfolders}
    class_files = {name: files for name, files in class_files.items() if files}
    if class_files:
        classes = sorted(class_files)
        paths = [p for c in classes for p in class_files[c]]
        labels = [k for k, c in enumerate(classes) for _ in class_files[c]]
    else:
        classes, paths = [], _files(folder)
        labels = [UNLABELLED] * len(paths)
    if not paths:
        raise UserError(f"no files in {folder}: expected images, or one subfolder of images per class")
    names = [str(p.relative_to(folder)) for p in paths]
    data, skipped = decode_cached("folder", "all", paths, labels, names, size, max_pixels, cache_dir)
    if len(data) == 0:
        raise UserError(f"none of the {len(paths)} files in {folder} is a readable image "
                        f"(first: {skipped[0]['path']}: {skipped[0]['reason']})")
    return Source(classes=classes, channels=3, train=data, test=None, skipped=skipped)
