"""The Oxford-IIIT Pet data set in its official layout.

    root/images/NAME.jpg                     (some are really GIF or PNG; a few are damaged)
    root/annotations/trainval.txt, test.txt  lines `NAME CLASS-ID SPECIES BREED-ID`, `#` comments allowed
    root/annotations/list.txt                the union; used alone when the two split files are absent

The breed is the file name without its trailing `_N`. Labels are re-indexed 0..K-1 over the breeds
present, in the order of their official CLASS-IDs, which are kept as metadata.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .base import Source
from .cache import decode_cached

Entry = tuple[str, int]  # (image name, official class id)


def parse_list(path: Path) -> list[Entry]:
    entries = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) < 2 or not fields[1].isdigit():
            raise UserError(f"{path}:{number}: expected `NAME CLASS-ID SPECIES BREED-ID`, found '{line[:60]}'")
        entries.append((fields[0], int(fields[1])))
    return entries


def breed(name: str) -> str:
    return name.rsplit("_", 1)[0]


def check_layout(root: Path) -> Path:
    if not root.is_dir():
        raise UserError(f"data root not found: {root}")
    annotations = root / "annotations"
    if not annotations.is_dir() or not (root / "images").is_dir():
        found = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:8]) or "nothing"
        raise UserError(f"{root} is not in the Oxford-IIIT Pet layout: expected images/ and annotations/ "
                        f"(trainval.txt, test.txt), found {found}")
    return annotations


def check_no_repeats(lists: dict[str, list[Entry]], files: dict[str, str], images: Path) -> None:
    """One image, one place: an image listed in both official splits would be tested on after training on it,
    and one listed twice could land in train and val. Names that lead to the same file count as one image."""
    seen: dict[str, tuple[str, str]] = {}
    repeats = []
    for split, entries in lists.items():
        for name, _cid in entries:
            file = os.path.realpath(images / f"{name}.jpg")
            if file in seen:
                repeats.append((name, files[split], *seen[file]))
            seen[file] = (name, files[split])
    if repeats:
        name, where, first_name, first_where = repeats[0]
        raise UserError(f"{len(repeats)} image(s) are listed more than once in {images.parent / 'annotations'}, e.g. "
                        f"{first_name} in {first_where} and {name} in {where}: the official splits must not overlap; "
                        "remove the repeated lines")


def read(root: str | None, size: int, cache_dir: str | None, max_pixels: int, **_: object) -> Source:
    if root is None:
        raise UserError("the oxford-pets data set needs --root DIR (get it with `aepretrain download --root DIR`)")
    folder = Path(root)
    annotations = check_layout(folder)
    if (annotations / "trainval.txt").is_file() and (annotations / "test.txt").is_file():
        files = {"train": "trainval.txt", "test": "test.txt"}
    elif (annotations / "list.txt").is_file():
        files = {"train": "list.txt"}
    else:
        raise UserError(f"{annotations} holds neither trainval.txt and test.txt nor list.txt")
    lists = {split: parse_list(annotations / name) for split, name in files.items()}
    check_no_repeats(lists, files, folder / "images")
    ids = {breed(name): cid for entries in lists.values() for name, cid in entries}
    classes = sorted(ids, key=lambda b: (ids[b], b.lower()))
    label_of = {b: k for k, b in enumerate(classes)}

    missing, decoded, skipped = [], {}, []
    for split, entries in lists.items():
        present = []
        for name, _cid in entries:
            path = folder / "images" / f"{name}.jpg"
            (present if path.is_file() else missing).append((name, path))
        decoded[split], bad = decode_cached(
            "oxford-pets", split, [p for _, p in present], [label_of[breed(n)] for n, _ in present],
            [n for n, _ in present], size, max_pixels, cache_dir)
        skipped += bad
    if sum(len(d) for d in decoded.values()) == 0:
        raise UserError(f"no usable image in {folder / 'images'}: {len(missing)} listed files are missing, "
                        f"{len(skipped)} could not be decoded")
    return Source(classes=classes, class_ids=[ids[b] for b in classes], channels=3, train=decoded["train"],
                  test=decoded.get("test"), skipped=skipped, missing=[str(p) for _, p in missing])
