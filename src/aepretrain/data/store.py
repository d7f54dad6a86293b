"""The on-disk store: decoded images in one raw ``.npy`` file, written in place by parallel decoders, then mapped.

The file is allocated at its full size first (a full disk shows before any decoding), each worker decodes its
share of the files and writes every image straight into its row, and the main process only counts. Nothing
but the file names, a digest per image and the reasons for skipped files is held in memory, however many
images there are.
Rows of files that could not be decoded stay zero and are left out of the index.

Example:
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "demo.npy"
    >>> offset = allocate(path, (3, 2, 2, 1))
    >>> digests = write_chunks(path, offset, [np.full((3, 2, 2, 1), 7, np.uint8)])
    >>> verify_rows(path, np.arange(3), digests), np.load(path, mmap_mode="r")[2, 0, 0, 0]
    (None, np.uint8(7))
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from ..fileio import cpu_cores, open_lock_file, say_taken_over
from .base import digest
from .images import decode

CHUNK = 32  # files per decoding task: large enough to amortise the hand-over, small enough for a smooth bar
VERIFY_BLOCK = 64 << 20  # bytes read at a time when checking rows against their digests
FLUSH_EVERY = 0.5  # seconds between background flushes of a store being written
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends


def allocate(path: Path, shape: tuple[int, ...]) -> int:
    """Create ``path`` as a uint8 ``.npy`` of ``shape`` with its space reserved on disk; the pixels' offset."""
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
        offset = f.tell()
        size = int(np.prod(shape))
        try:
            if size:
                os.posix_fallocate(f.fileno(), offset, size)  # ENOSPC or EFBIG now, not after an hour of decoding
        except OSError as exc:
            free = shutil.disk_usage(path.parent).free
            raise OSError(exc.errno, f"{exc.strerror}: the store needs {in_units(size)}, "
                                     f"{in_units(free)} are free there") from None
    return offset


def in_units(size: int) -> str:
    """Bytes as people read them: 3.7 MB, 4.82 GB."""
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.1f} MB"


def _write_row(fd: int, row: np.ndarray, at: int) -> None:
    data = memoryview(np.ascontiguousarray(row)).cast("B")
    while data:
        written = os.pwrite(fd, data, at)
        if written == 0:
            raise OSError(28, "No space left on device")
        data, at = data[written:], at + written


def write_chunks(path: Path, offset: int, chunks: Iterable[np.ndarray], progress: Progress | None = None) -> list[int]:
    """Write arrays of rows one after the other from row 0; their digests."""
    digests: list[int] = []
    fd = os.open(path, os.O_WRONLY)
    try:
        at = offset
        for chunk in chunks:
            _write_row(fd, chunk, at)
            at += chunk.nbytes
            digests += [digest(np.ascontiguousarray(row)) for row in chunk]
            if progress:
                progress.advance(len(chunk))
    finally:
        os.close(fd)
    return digests


_TARGET: dict[str, int] = {}  # a decoding worker's open store file and row geometry


def _open_target(path: str, offset: int, size: int, max_pixels: int) -> None:
    _TARGET.update(fd=os.open(path, os.O_WRONLY), offset=offset, size=size, max_pixels=max_pixels)


def _start_worker(parent: int, *target: Any) -> None:
    """A decoding worker dies with its parent. It shares the parent's locks (a forked copy of a file descriptor
    holds its flock), so one orphaned by `kill -9` would hold the store and the run folder forever. Ctrl-C,
    which reaches the whole process group, is left to the parent, which ends its workers itself."""
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl: no signal will come
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler, which would raise in here
    _open_target(*target)


def _decode_chunk(job: tuple[int, list[str]]) -> tuple[int, list[str | None], list[int]]:
    """Decode files ``start, start + 1, ...`` into their rows; (start, reasons, digests), None where it worked."""
    start, paths = job
    t = _TARGET
    row_bytes = t["size"] * t["size"] * 3
    reasons: list[str | None] = []
    digests: list[int] = []
    for i, path in enumerate(paths, start):
        pixels, reason = decode(path, t["size"], t["max_pixels"])
        reasons.append(reason)
        digests.append(0)
        if pixels is not None:
            _write_row(t["fd"], pixels, t["offset"] + i * row_bytes)
            digests[-1] = digest(pixels)
    return start, reasons, digests


def decode_into(path: Path, offset: int, files: list[Path], size: int, max_pixels: int, progress: Progress
                ) -> tuple[list[str | None], list[int]]:
    """Decode ``files`` to size x size RGB straight into their rows of ``path``, on every core when there are many.
    Returns per file the reason it was skipped (None: decoded) and its row's digest."""
    jobs = [(start, [str(p) for p in files[start:start + CHUNK]]) for start in range(0, len(files), CHUNK)]
    reasons: list[str | None] = [None] * len(files)
    digests = [0] * len(files)

    def keep(result: tuple[int, list[str | None], list[int]]) -> None:
        start, why, rows = result
        reasons[start:start + len(why)], digests[start:start + len(rows)] = why, rows
        progress.advance(len(why))

    workers = min(cpu_cores(), 8)
    if len(files) < 2 * CHUNK or workers == 1:
        _open_target(str(path), offset, size, max_pixels)
        try:
            for job in jobs:
                keep(_decode_chunk(job))
        finally:
            os.close(_TARGET.pop("fd"))
        return reasons, digests
    with ProcessPoolExecutor(workers, get_context("fork"), initializer=_start_worker,
                             initargs=(os.getpid(), str(path), offset, size, max_pixels)) as pool:
        try:
            pending = {pool.submit(_decode_chunk, job) for job in jobs[:4 * workers]}  # forks the workers
            queued = iter(jobs[4 * workers:])  # a few tasks ahead per worker: the bar moves, memory stays flat
            with flushing(path):  # its thread starts after the fork: a forked child gets no half-held lock of it
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        keep(future.result())
                        job = next(queued, None)
                        if job is not None:
                            pending.add(pool.submit(_decode_chunk, job))
        except BaseException:  # Ctrl-C, SIGTERM, a failed write: the workers end now, not after the queued tasks
            for worker in list(pool._processes.values()):  # Python 3.14 calls this pool.kill_workers()
                worker.kill()
            raise
    return reasons, digests


@contextmanager
def flushing(path: Path) -> Iterator[None]:
    """Flush ``path`` to disk in the background while the block writes it. Left alone, the kernel holds a store's
    pages until the end (it starts writing only past a share of memory or after 30 s), and the closing flush
    then waits for all of them while the decoders sit idle. A failed flush is raised when the block ends: its
    error is reported once, so a later flush might not see it."""
    fd = os.open(path, os.O_RDONLY)
    stop, failed = threading.Event(), []

    def flush() -> None:
        while not stop.wait(FLUSH_EVERY):
            try:
                os.fdatasync(fd)
            except OSError as exc:
                failed.append(exc)
                return

    thread = threading.Thread(target=flush, name="store-flush", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        os.close(fd)
    if failed:
        raise failed[0]


def verify_rows(path: Path, rows: np.ndarray, digests: list[int] | np.ndarray) -> str | None:
    """None when every listed row of ``path`` still has its digest; else what is wrong, in a few words.

    The file is read with plain reads in large blocks, not mapped, so checking a store larger than memory does
    not fill this process's resident memory."""
    header = np.lib.format.open_memmap(path, mode="r")  # the header only: no pixel is touched through the map
    offset = header.offset
    row_bytes = int(np.prod(header.shape[1:]))
    expected = dict(zip(np.asarray(rows).tolist(), (int(d) for d in digests)))
    per_block = max(1, VERIFY_BLOCK // max(row_bytes, 1))
    buffer = bytearray(per_block * row_bytes)
    with open(path, "rb", buffering=0) as f:
        for first in range(0, header.shape[0], per_block):
            count = min(per_block, header.shape[0] - first)
            wanted = [r for r in range(first, first + count) if r in expected]
            if not wanted:
                continue
            f.seek(offset + first * row_bytes)
            view = memoryview(buffer)[:count * row_bytes]
            if f.readinto(view) != len(view):
                return f"the file ends before row {first + count}"
            for r in wanted:
                if digest(view[(r - first) * row_bytes:(r - first + 1) * row_bytes]) != expected[r]:
                    return f"row {r} does not match its checksum"
    return None


class Progress:
    """Images done, images per second and the time left, on one redrawn line of a terminal (nothing elsewhere)."""

    def __init__(self, total: int, what: str, live: bool) -> None:
        self.total, self.what, self.done = total, what, 0
        self.live = live and sys.stderr.isatty()
        self.started = self.shown = time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.live and now - self.shown > 0.25:
            self.shown = now
            rate = self.done / max(now - self.started, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"\r{self.what}: {self.done}/{self.total} images, {rate:.0f} images/s, {eta:.0f} s left   ",
                  end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.live:
            print("\r" + " " * 80 + "\r", end="", file=sys.stderr, flush=True)


def _lock_file(path: Path, blocking: bool) -> tuple[int | None, str]:
    """The open, exclusively locked lock file at ``path`` (None if another process holds it and not ``blocking``)
    and the record in it: its holder, or the one it left. Never opened through a symbolic link. A lock file
    deleted and made anew meanwhile (by `cache clear`) is locked anew, so two holders never coexist."""
    while True:
        fd = open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _record(fd)
            os.close(fd)
            return None, holder
        try:
            if os.fstat(fd).st_ino == os.stat(path, follow_symlinks=False).st_ino:
                return fd, _record(fd)
        except FileNotFoundError:
            pass
        os.close(fd)


def _record(fd: int) -> str:
    return os.pread(fd, 256, 0).decode(errors="replace").strip()


@contextmanager
def locked(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` while the block runs. A second process waits for it, saying once who
    holds it; the lock goes with its holder (and its decoding workers), so a killed build leaves none behind,
    and the next one says it took it over."""
    fd, holder = _lock_file(path, blocking=False)
    if fd is None:
        logging.getLogger(__name__).warning(f"aepretrain: {what} is being built by {holder or 'another process'}; "
                                            "waiting for it")
        fd, holder = _lock_file(path, blocking=True)
    assert fd is not None
    try:
        say_taken_over(path, holder)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


@contextmanager
def unless_locked(path: Path) -> Iterator[bool]:
    """True, holding the lock at ``path``, when no other process holds it; False (not waiting) when one does."""
    fd, _ = _lock_file(path, blocking=False)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)
