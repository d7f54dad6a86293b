"""Any folder of images: labelled (one subfolder per class) or unlabelled (images only, for pre-training).

    root/cat/a.jpg, root/dog/b.png, ...   labelled: classes are the subfolder names, sorted
    root/a.jpg, root/b.png, ...           unlabelled: label -1, usable for pre-training only

Every file is tried by content, whatever its extension; those that cannot be decoded are skipped and
reported. Hidden files are ignored. There is no official test split: one is carved from the images.
A class folder that is a link back into the root is not followed, and a file reached twice (through
links) is read once, so no image carries two labels or sits in two splits.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .base import UNLABELLED, Source
from .cache import decode_cached


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))


def _overlaps(a: Path, b: Path) -> bool:
    """True when one folder lies inside the other (or they are the same)."""
    return a == b or a in b.parents or b in a.parents


def _once(groups: dict[str, list[Path]]) -> tuple[dict[str, list[Path]], list[dict[str, str]]]:
    """Each file once, under the first path (in group order) that reaches it; the other paths reported as skipped."""
    first: dict[str, Path] = {}
    kept: dict[str, list[Path]] = {}
    skipped = []
    for group, paths in groups.items():
        for path in paths:
            real = os.path.realpath(path)
            if real in first:
                skipped.append({"path": str(path), "reason": f"the same file as {first[real]} (a link): read once, "
                                "so that no image carries two labels or sits in two splits"})
            else:
                first[real] = path
                kept.setdefault(group, []).append(path)
    return kept, skipped


def read(root: str | None, size: int, cache_dir: str | None, max_pixels: int, **_: object) -> Source:
    if root is None:
        raise UserError("the folder data set needs --root DIR")
    folder = Path(root)
    if not folder.is_dir():
        raise UserError(f"data root not found: {folder}")
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    looped = [d for d in subfolders if d.is_symlink() and _overlaps(d.resolve(), folder.resolve())]
    skipped_links = [{"path": str(d), "reason": f"a link to {os.readlink(d)}, back into the data set's folder: not "
                      "followed, so that no image carries two labels"} for d in looped]
    class_files, skipped_twins = _once({d.name: _files(d) for d in subfolders if d not in looped})
    if class_files:
        classes = sorted(class_files)
        paths = [p for c in classes for p in class_files[c]]
        labels = [k for k, c in enumerate(classes) for _ in class_files[c]]
    else:
        unlabelled, skipped_twins = _once({"": _files(folder)})
        classes, paths = [], unlabelled.get("", [])
        labels = [UNLABELLED] * len(paths)
    if not paths:
        raise UserError(f"no files in {folder}: expected images, or one subfolder of images per class")
    names = [str(p.relative_to(folder)) for p in paths]
    data, skipped = decode_cached("folder", "all", paths, labels, names, size, max_pixels, cache_dir)
    skipped = skipped_links + skipped_twins + skipped
    if len(data) == 0:
        raise UserError(f"none of the {len(paths)} files in {folder} is a readable image "
                        f"(first: {skipped[0]['path']}: {skipped[0]['reason']})")
    return Source(classes=classes, channels=3, train=data, test=None, skipped=skipped)
