"""The cache of stores: each data set, split and size decoded once, then mapped by every run.

An entry is ``NAME-KEY.npy`` (the pixels, see store.py) and ``NAME-KEY.json``: labels, names, skipped files, a
digest per image and the pixel file's size and time. The key hashes the name, size and modification time of
every source file (and the settings that change decoding), so a changed, added or removed file makes a new
entry and nothing else does. The ``.json`` is written last: an entry without it, or whose pixel file does not
match it (header, size, and a digest per image when the file changed since it was verified), is never read;
it is rebuilt, and said so in one line. ``NAME-KEY.lock`` is held while an entry is built, so a second
process (another run, another DDP rank) waits for it, then maps the same file: one copy in the page cache.

Example:
    >>> import tempfile
    >>> from PIL import Image
    >>> here = Path(tempfile.mkdtemp())
    >>> paths = [here / "a.png", here / "b.png", here / "notes.txt"]
    >>> Image.new("RGB", (40, 30), "red").save(paths[0]); Image.new("RGB", (30, 40), "blue").save(paths[1])
    >>> _ = paths[2].write_text("not an image")
    >>> labelled, skipped = decode_cached("folder", "all", paths, [0, 1, 0], ["a", "b", "n"], 32, 10**8, str(here))
    >>> labelled.images.shape, labelled.labels.tolist(), [Path(s["path"]).name for s in skipped]
    ((2, 32, 32, 3), [0, 1], ['notes.txt'])
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..fileio import atomic_write, first_line
from .base import Images, Labelled, Store
from .store import Progress, allocate, decode_into, in_units, locked, unless_locked, verify_rows, write_chunks

FORMAT_VERSION = 3  # 3: XXH3 digests (2: SHA-1)
SHOW_PROGRESS: ContextVar[bool] = ContextVar("show_progress", default=True)
ENTRY_FILE = re.compile(r"^(?P<entry>.+-[0-9a-f]{20})\.(?P<kind>npy|json|lock|npz)$")
TEMP_FILE = re.compile(r"^\.(?P<entry>.+-[0-9a-f]{20})\.(npy|json)\.\d+\.tmp$")

Fill = Callable[[Path, Progress], dict[str, Any]]


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    base = os.environ.get("AEPRETRAIN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aepretrain")
    return Path(base)


@contextmanager
def progress_shown(live: bool) -> Iterator[None]:
    """Whether stores built inside the block draw a progress bar (on a terminal); a summary line is always said."""
    token = SHOW_PROGRESS.set(live)
    try:
        yield
    finally:
        SHOW_PROGRESS.reset(token)


def fingerprint(paths: list[Path], *settings: object) -> str:
    digest = hashlib.sha1(json.dumps([FORMAT_VERSION, *map(str, settings)]).encode())
    for path in paths:
        try:
            stat = path.stat()
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()[:20]


class Damaged(Exception):
    """An entry that must not be read; the message says why in a few words."""


@dataclass(frozen=True)
class Entry:
    folder: Path
    name: str  # data set, split and size, e.g. oxford-pets-test-224
    key: str

    def file(self, kind: str) -> Path:
        return self.folder / f"{self.name}-{self.key}.{kind}"


def _stat_key(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def read_entry(entry: Entry) -> tuple[Labelled, list[dict]] | None:
    """The entry's images, labels and skipped files; None if it was never finished; Damaged if it does not verify."""
    marker, pixels_file = entry.file("json"), entry.file("npy")
    if not marker.is_file():
        if pixels_file.exists():
            raise Damaged("its build never finished")
        return None
    meta = _read_index(marker)
    shape, rows, digests, recorded = tuple(meta["shape"]), meta["rows"], meta["digests"], meta["stat"]
    try:
        now = _stat_key(pixels_file)
    except FileNotFoundError:
        raise Damaged("its pixel file is missing") from None
    if now[0] != recorded[0]:
        raise Damaged(f"its pixel file has {now[0]} bytes, {recorded[0]} were written")
    try:
        pixels = np.lib.format.open_memmap(pixels_file, mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise Damaged(f"its pixel file is not a store: {first_line(exc)[:80]}") from None
    if pixels.shape != shape or pixels.dtype != np.uint8:
        raise Damaged(f"its pixel file holds {pixels.dtype} {pixels.shape}, the index says uint8 {shape}")
    if now != recorded:  # written to, copied or restored since it was verified: check every image again
        problem = verify_rows(pixels_file, rows, digests)
        if problem:
            raise Damaged(problem)
        try:
            atomic_write(marker, json.dumps(json.loads(marker.read_text()) | {"stat": now}))
        except OSError:
            pass  # a read-only cache: verified again next time
    every = np.zeros(shape[0], np.uint64)
    every[rows] = digests
    images = Images((Store(pixels, every),), np.zeros(len(rows), np.int16), rows)
    return Labelled(images, meta["labels"], meta["names"]), meta["skipped"]


def _read_index(marker: Path) -> dict[str, Any]:
    """The entry's index, its arrays as numpy arrays; Damaged if it cannot be read or does not agree with itself."""
    try:
        meta = json.loads(marker.read_text())
        rows, labels = np.array(meta["rows"], np.int64), np.array(meta["labels"], np.int64)
        digests = np.array([int(d, 16) for d in meta["digests"]], np.uint64)
        count = int(meta["shape"][0])
        if meta["format"] != FORMAT_VERSION or not len(rows) == len(labels) == len(meta["names"]) == len(digests) \
                or len(meta["shape"]) != 4 or len(meta["stat"]) != 3 or not isinstance(meta["skipped"], list) \
                or (len(rows) and not 0 <= rows.min() <= rows.max() < count):
            raise ValueError("its fields do not agree")
        return meta | {"rows": rows, "labels": labels, "digests": digests}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise Damaged(f"its index {marker.name} is unreadable: {first_line(exc)[:80]}") from None


def _build(entry: Entry, fill: Fill) -> None:
    """Write the pixels (to a temporary file: allocate, fill, flush to disk, rename), then the index.

    The digests are those of the pixels the decoders wrote, computed as they wrote them; the build is not read
    back (right after writing, that would only read the page cache, not the disk). Any later change to the
    file's size, time or inode makes :func:`read_entry` check every row against them."""
    for stale in entry.folder.glob(f".{entry.name}-{entry.key}.*.tmp"):
        stale.unlink()  # a killed build's: we hold the entry's lock, so no one is writing it
    for kind in ("json", "npy"):  # absent, or damaged: its room is better spent on the new one
        entry.file(kind).unlink(missing_ok=True)
    started = time.perf_counter()
    progress = Progress(0, f"decoding {entry.name}", SHOW_PROGRESS.get())
    meta: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        meta.update(fill(tmp, progress))
        progress.close()

    atomic_write(entry.file("npy"), write)
    meta["digests"] = [f"{d:016x}" for d in meta["digests"]]
    atomic_write(entry.file("json"), json.dumps({"format": FORMAT_VERSION, **meta,
                                                 "stat": _stat_key(entry.file("npy"))}))
    seconds = time.perf_counter() - started
    size = entry.file("npy").stat().st_size
    print(f"stored {len(meta['rows'])} images of {entry.name} ({in_units(size)}, {len(meta['skipped'])} skipped) "
          f"in {entry.folder} in {seconds:.1f} s ({meta['shape'][0] / max(seconds, 1e-9):.0f} images/s)",
          file=sys.stderr, flush=True)


def load_or_build(cache_dir: str | None, name: str, key: str, fill: Fill) -> tuple[Labelled, list[dict]]:
    """The entry ``name-key``: mapped if it verifies, else built by ``fill`` (under its lock) and then mapped.

    ``fill(tmp, progress)`` writes the pixels into the new file ``tmp`` (see store.allocate) and returns the
    index: shape, rows, labels, names, digests (ints) and skipped files."""
    entry = Entry(cache_root(cache_dir), name, key)
    try:
        found = read_entry(entry)
        if found is not None:
            return found
    except Damaged:
        pass  # said and rebuilt under the lock, unless another process is rebuilding it now
    try:
        entry.folder.mkdir(parents=True, exist_ok=True)
        with locked(entry.file("lock"), f"the data store {entry.name}"):
            try:
                found = read_entry(entry)
            except Damaged as exc:
                print(f"aepretrain: the cached data store {entry.file('npy')} is damaged ({exc}); rebuilding it",
                      file=sys.stderr, flush=True)
                found = None
            if found is None:
                _build(entry, fill)
                found = read_entry(entry)
    except OSError as exc:
        raise UserError(f"cannot write the data store {entry.name} in {entry.folder}: {exc.strerror or first_line(exc)}"
                        "; free space there, or point data.cache_dir or $AEPRETRAIN_CACHE at a writable folder with "
                        "room for it (the stores already there are untouched)") from None
    except Damaged as exc:
        raise UserError(f"the data store {entry.file('npy')} did not verify right after it was built ({exc})") from None
    assert found is not None
    return found


def decode_cached(dataset: str, split: str, paths: list[Path], labels: list[int], names: list[str],
                  size: int, max_pixels: int, cache_dir: str | None) -> tuple[Labelled, list[dict]]:
    """Decode ``paths`` to size x size RGB into a store (once); undecodable files are skipped with their reason."""
    if not paths:
        return Labelled(np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64), []), []

    def fill(tmp: Path, progress: Progress) -> dict[str, Any]:
        shape = (len(paths), size, size, 3)
        offset = allocate(tmp, shape)
        progress.total = len(paths)
        reasons, digests = decode_into(tmp, offset, paths, size, max_pixels, progress)
        ok = [i for i, reason in enumerate(reasons) if reason is None]
        return {"shape": shape, "rows": ok, "labels": [int(labels[i]) for i in ok], "names": [names[i] for i in ok],
                "digests": [digests[i] for i in ok], "source": os.path.commonpath([str(p) for p in paths]),
                "skipped": [{"path": str(p), "reason": r} for p, r in zip(paths, reasons) if r is not None]}

    key = fingerprint(paths, dataset, split, size, max_pixels)
    return load_or_build(cache_dir, f"{dataset}-{split}-{size}", key, fill)


def cached(cache_dir: str | None, name: str, key: str, source: Path,
           read: Callable[[], tuple[np.ndarray, list[str], Iterator[np.ndarray], tuple[int, ...]]]) -> Labelled:
    """A store written from arrays: ``read()`` gives labels, names, the pixels as chunks of rows, and their shape."""

    def fill(tmp: Path, progress: Progress) -> dict[str, Any]:
        labels, names, chunks, shape = read()
        offset = allocate(tmp, shape)
        progress.total = shape[0]
        digests = write_chunks(tmp, offset, chunks, progress)
        return {"shape": shape, "rows": list(range(shape[0])), "labels": labels.tolist(), "names": names,
                "digests": digests, "source": str(source), "skipped": []}

    return load_or_build(cache_dir, name, key, fill)[0]


def entries(folder: Path) -> list[dict[str, Any]]:
    """What the cache holds: one row per entry, with its size on disk and state (ready, unfinished, old format)."""
    grouped: dict[str, dict[str, Path]] = {}
    for path in folder.iterdir() if folder.is_dir() else []:
        match = ENTRY_FILE.match(path.name) or TEMP_FILE.match(path.name)
        if match:
            kind = match.groupdict().get("kind") or "tmp"
            grouped.setdefault(match["entry"], {})[kind if kind != "tmp" else path.name] = path
    rows = []
    for name, files in sorted(grouped.items()):
        size = sum(p.stat().st_blocks * 512 for p in files.values())
        images, source = None, None
        try:
            meta = json.loads(files["json"].read_text()) if "json" in files else None
            images, source = (len(meta["rows"]), meta.get("source")) if meta else (None, None)
        except (OSError, ValueError, KeyError, TypeError):
            meta = None
        old = "npz" in files or (meta is not None and meta.get("format") != FORMAT_VERSION)
        state = "old format" if old else "ready" if meta and "npy" in files else "unfinished"
        rows.append({"entry": name, "images": images, "bytes": size, "state": state, "source": source,
                     "files": [str(p) for p in files.values()]})
    return rows


def clear(folder: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Delete every entry aepretrain wrote in ``folder`` (and nothing else), except those being built now;
    (the entries removed, the names of those left because another process holds them)."""
    removed, busy = [], []
    for row in entries(folder):
        lock = folder / f"{row['entry']}.lock"
        with unless_locked(lock) as free:
            if not free:
                busy.append(row["entry"])
                continue
            for path in map(Path, row["files"]):
                path.unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
        removed.append(row)
    return removed, busy
