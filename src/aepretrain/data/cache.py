"""The cache of stores: each data set, split and size decoded once, then mapped by every run.

An entry is ``NAME-KEY.npy`` (the pixels, see store.py) and ``NAME-KEY.json``: labels, names, skipped files, a
digest per image and the pixel file's size, times and inode. The key hashes the name, size and modification time
of every source file (and the settings that change decoding), so a changed, added or removed file makes a new
entry and nothing else does. The ``.json`` is written last: an entry without it, or whose pixel file does not
match it, is never read; it is rebuilt, and said so in one line. Each use checks the header and the size, and
every image against its digest when the file's size, modification or change time (which no one can set back)
or inode differ from those recorded when it was last verified; `aepretrain cache verify` checks every image of
every entry whatever its times. ``NAME-KEY.lock`` is held while an entry is built, so a second process (another
run, another DDP rank) waits for it, then maps the same file: one copy in the page cache.

Listing, clearing and verifying touch only files aepretrain wrote, told by their content (:func:`_ours_of`):
every index begins with aepretrain's mark, ``{"aepretrain": VERSION, "format": 3, ...``.

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
import logging
import os
import re
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..errors import UserError
from ..fileio import atomic_write, first_line
from .base import Images, Labelled, Store
from .store import Progress, allocate, decode_into, in_units, locked, unless_locked, verify_rows, write_chunks

LOG = logging.getLogger(__name__)
FORMAT_VERSION = 3  # 3: XXH3 digests (2: SHA-1; 1: one .npz per entry)
SHOW_PROGRESS: ContextVar[bool] = ContextVar("show_progress", default=True)
ENTRY_FILE = re.compile(r"^(?P<entry>.+-[0-9a-f]{20})\.(?P<kind>npy|json|lock|npz)$")
TEMP_FILE = re.compile(r"^\.(?P<entry>.+-[0-9a-f]{20})\.(?P<kind>npy|json)\.\d+\.tmp$")
MARK = b'{"aepretrain": '  # how every index aepretrain writes begins, even one cut short; no user's file by accident
INDEX_FIELDS = {"format", "shape", "rows", "labels", "names", "digests", "skipped", "stat"}  # every index since 2
FORMAT_1 = ["images.npy", "labels.npy", "meta.npy"]  # the arrays of a format-1 entry's .npz
BUILDER = re.compile(r"^process \d+ on ")  # a lock file's text while its build runs (and after, if it was killed)

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
    """What changes when the file's bytes may have: its size, modification time, inode and change time. The change
    time is set by the kernel on every write and on every change of the others, and cannot be set back."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]


def read_entry(entry: Entry, every_row: bool = False) -> tuple[Labelled, list[dict]] | None:
    """The entry's images, labels and skipped files; None if it was never finished; Damaged if it does not verify.
    Every image is checked against its digest when ``every_row``, or when the pixel file changed since they last
    were (its size, times or inode are not those recorded then)."""
    marker, pixels_file = entry.file("json"), entry.file("npy")
    if not marker.is_file():
        if pixels_file.exists():
            raise Damaged("its build never finished")
        return None
    meta = _read_index(marker)
    rows, digests, now = meta["rows"], meta["digests"], _stat_key_of_pixels(entry, meta)
    pixels = _map(pixels_file, tuple(meta["shape"]))
    if every_row or now != meta["stat"]:  # written to, copied or restored since it was verified: check every image
        try:
            problem = verify_rows(pixels_file, rows, digests)
        except OSError as exc:  # a bad disk block, say: unusable, like a wrong row
            problem = f"its pixel file cannot be read: {exc.strerror or first_line(exc)}"
        if problem:
            raise Damaged(problem)
        if now != meta["stat"]:
            try:
                atomic_write(marker, json.dumps(json.loads(marker.read_text()) | {"stat": now}))
            except OSError:
                pass  # a read-only cache: verified again next time
    every = np.zeros(len(pixels), np.uint64)
    every[rows] = digests
    images = Images((Store(pixels, every),), np.zeros(len(rows), np.int16), rows)
    return Labelled(images, meta["labels"], meta["names"]), meta["skipped"]


def _stat_key_of_pixels(entry: Entry, meta: dict[str, Any]) -> list[int]:
    """The pixel file's :func:`_stat_key`; Damaged if it is missing or its size is not the one written."""
    try:
        now = _stat_key(entry.file("npy"))
    except FileNotFoundError:
        raise Damaged("its pixel file is missing") from None
    if now[0] != meta["stat"][0]:
        raise Damaged(f"its pixel file has {now[0]} bytes, {meta['stat'][0]} were written")
    return now


def _map(pixels_file: Path, shape: tuple[int, ...]) -> np.memmap:
    """The pixel file mapped; Damaged if its header is not that of a uint8 array of ``shape``."""
    try:
        pixels = np.lib.format.open_memmap(pixels_file, mode="r")
    except Exception as exc:  # noqa: BLE001 - a garbled header makes numpy's parser raise almost anything
        raise Damaged(f"its pixel file's header is unreadable: {first_line(exc)[:80]}") from None
    if pixels.shape != shape or pixels.dtype != np.uint8:
        raise Damaged(f"its pixel file holds {pixels.dtype} {pixels.shape}, the index says uint8 {shape}")
    return pixels


def _read_index(marker: Path) -> dict[str, Any]:
    """The entry's index, its arrays as numpy arrays; Damaged if it cannot be read or does not agree with itself."""
    try:
        meta = json.loads(marker.read_text())
        rows, labels = np.array(meta["rows"], np.int64), np.array(meta["labels"], np.int64)
        digests = np.array([int(d, 16) for d in meta["digests"]], np.uint64)
        count = int(meta["shape"][0])
        # a stat of 3 (recorded before the change time was) differs from every new one: its rows are checked once
        if meta["format"] != FORMAT_VERSION or not len(rows) == len(labels) == len(meta["names"]) == len(digests) \
                or len(meta["shape"]) != 4 or len(meta["stat"]) not in (3, 4) \
                or not isinstance(meta["skipped"], list) or (len(rows) and not 0 <= rows.min() <= rows.max() < count):
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
    atomic_write(entry.file("json"), json.dumps({"aepretrain": __version__, "format": FORMAT_VERSION, **meta,
                                                 "stat": _stat_key(entry.file("npy"))}))
    seconds = time.perf_counter() - started
    size = entry.file("npy").stat().st_size
    LOG.info(f"stored {len(meta['rows'])} images of {entry.name} ({in_units(size)}, {len(meta['skipped'])} skipped) "
             f"in {entry.folder} in {seconds:.1f} s ({meta['shape'][0] / max(seconds, 1e-9):.0f} images/s)")


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
                LOG.warning(f"aepretrain: the cached data store {entry.file('npy')} is damaged ({exc}); rebuilding it")
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
    """What the cache holds: one row per entry aepretrain wrote there, with its size on disk and state (ready,
    damaged, unfinished, old format). Other files, folders and symbolic links, whatever their names, are left out."""
    rows = []
    for name, files in sorted(_named_like_entries(folder).items()):
        ours = _ours_of(files)
        if ours:
            rows.append(_describe(Entry(folder, *name.rsplit("-", 1)), ours))
    return rows


def _named_like_entries(folder: Path) -> dict[str, list[tuple[str, Path]]]:
    """The plain files of ``folder`` named like an entry's, by entry: (kind, path), kind npy, json, lock, npz, or
    tmp npy / tmp json for a build's temporary files."""
    grouped: dict[str, list[tuple[str, Path]]] = {}
    try:
        with os.scandir(folder) as found:
            for item in found:
                match = ENTRY_FILE.match(item.name) or TEMP_FILE.match(item.name)
                if match and item.is_file(follow_symlinks=False):
                    kind = match["kind"] if match.re is ENTRY_FILE else f"tmp {match['kind']}"
                    grouped.setdefault(match["entry"], []).append((kind, Path(item.path)))
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except OSError as exc:
        raise UserError(f"cannot read the cache folder {folder}: {exc.strerror or first_line(exc)}") from None
    return grouped


def _ours_of(files: list[tuple[str, Path]]) -> list[tuple[str, Path]]:
    """Those of one entry's files that aepretrain wrote, told by their content, which a user's file does not match
    by accident: an index (or its temporary file) begins with :data:`MARK`, or, written before the mark, holds every
    field of a format 2 or 3 index; a lock file names the process building the entry, as it does while a build
    runs and after one was killed; a .npy is ours beside such an index or lock, or under a temporary name when it
    is a whole uint8 store; a .npz holds exactly a format-1 entry's arrays. The lock file goes with the rest."""
    kinds = dict(files)
    index = "json" in kinds and _is_index(kinds["json"])
    building = "lock" in kinds and BUILDER.match(_head(kinds["lock"], 200).decode(errors="replace")) is not None

    def mine(kind: str, path: Path) -> bool:
        if kind == "json":
            return index
        if kind == "npy":
            return index or building
        if kind == "tmp npy":
            return building or _is_store(path)
        if kind == "tmp json":
            return _is_index(path)
        return kind == "npz" and _is_format_1(path)

    ours = [(kind, path) for kind, path in files if mine(kind, path)]
    if "lock" in kinds and (ours or building):
        ours.append(("lock", kinds["lock"]))
    return ours


def _head(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def _is_index(path: Path) -> bool:
    if _head(path, len(MARK)) == MARK:
        return True
    try:
        meta = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and INDEX_FIELDS <= meta.keys() and meta["format"] in (2, 3)


def _is_format_1(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            if sorted(archive.namelist()) != FORMAT_1:
                return False
            with archive.open("meta.npy") as f:
                meta = json.loads(str(np.lib.format.read_array(f, allow_pickle=False)))
    except Exception:  # noqa: BLE001 - whatever a foreign or damaged file makes zipfile or numpy raise: not ours
        return False
    return isinstance(meta, dict) and meta.keys() == {"names", "skipped"}


def _is_store(path: Path) -> bool:
    """A whole uint8 image store (see store.allocate): its header, and the size it reserves for its pixels."""
    try:
        with open(path, "rb") as f:
            if np.lib.format.read_magic(f) != (1, 0):
                return False
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            offset = f.tell()
        return dtype == np.uint8 and not fortran_order and len(shape) == 4 and \
            path.stat().st_size == offset + int(np.prod(shape))
    except Exception:  # noqa: BLE001 - as in _is_format_1
        return False


def _describe(entry: Entry, files: list[tuple[str, Path]]) -> dict[str, Any]:
    """An entry's row in `cache list`: its images, size on disk, state and source."""
    size, kinds = 0, dict(files)
    for _, path in files:
        try:
            size += path.lstat().st_blocks * 512
        except FileNotFoundError:
            pass  # gone since the folder was read: a build's temporary file, renamed
    state, images, source = "unfinished", None, None
    if "npz" in kinds:
        state = "old format"
    elif "json" in kinds:
        state = "damaged"
        try:
            meta = json.loads(kinds["json"].read_text())
            images, source = len(meta["rows"]), meta.get("source")
            if meta["format"] != FORMAT_VERSION:
                state = "old format"
            else:
                checked = _read_index(kinds["json"])
                _stat_key_of_pixels(entry, checked)
                _map(entry.file("npy"), tuple(checked["shape"]))
                state = "ready"
        except (OSError, ValueError, KeyError, TypeError, AttributeError, Damaged):
            pass
    return {"entry": f"{entry.name}-{entry.key}", "images": images, "bytes": size, "state": state, "source": source,
            "files": [str(path) for _, path in files]}


def clear(folder: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Delete every entry aepretrain wrote in ``folder`` (and nothing else), except those being built now;
    (the entries removed, the names of those left because another process holds them)."""
    removed: list[dict[str, Any]] = []
    busy = []
    for row in entries(folder):
        lock = folder / f"{row['entry']}.lock"
        with _unless_building(lock, removed) as free:
            if free:
                _remove(row, lock, removed)
            else:
                busy.append(row["entry"])
    return removed, busy


def verify(folder: Path) -> list[dict[str, Any]]:
    """Check every image of every entry against its digest, whatever the file's times, and delete the entries that
    fail (the next run that uses one builds it again). One row per entry: entry, images, and its outcome ("ok",
    "removed", or "kept": being built now, or in an old format this version never reads) with the reason."""
    results: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    for row in entries(folder):
        outcome, reason, lock = "kept", "another process is building it", folder / f"{row['entry']}.lock"
        with _unless_building(lock, removed) as free:
            if free and row["state"] == "old format":
                reason = "an old format, never read by this version; `aepretrain cache clear` deletes it"
            elif free:
                try:
                    found = read_entry(Entry(folder, *row["entry"].rsplit("-", 1)), every_row=True)
                    outcome, reason = ("ok", "") if found else ("removed", "its build never finished")
                except Damaged as exc:
                    outcome, reason = "removed", str(exc)
                if outcome == "removed":
                    _remove(row, lock, removed)
        results.append({"entry": row["entry"], "images": row["images"], "outcome": outcome, "reason": reason})
    return results


@contextmanager
def _unless_building(lock: Path, removed: list[dict[str, Any]]) -> Iterator[bool]:
    """store.unless_locked on an entry's lock file; one line if that cannot be opened (a read-only cache)."""
    with ExitStack() as stack:
        try:
            free = stack.enter_context(unless_locked(lock))
        except OSError as exc:
            raise UserError(_cannot("open", lock, exc, removed)) from None
        yield free


def _remove(row: dict[str, Any], lock: Path, removed: list[dict[str, Any]]) -> None:
    """Delete an entry's files, its index and lock file last: stopped part way, what is left is still known as ours."""
    last = {".json": 1, ".lock": 2}
    for path in sorted({*map(Path, row["files"]), lock}, key=lambda path: (last.get(path.suffix, 0), path.name)):
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise UserError(_cannot("delete", path, exc, removed)) from None
    removed.append(row)


def _cannot(what: str, path: Path, exc: OSError, removed: list[dict[str, Any]]) -> str:
    done = f"{len(removed)} entr{'y' if len(removed) == 1 else 'ies'}"
    return f"cannot {what} {path}: {exc.strerror or first_line(exc)} ({done} of the cache removed before it)"
