"""Small file helpers every stage shares: one atomic write, one way to quote an exception.

A file written with :func:`atomic_write` is whole or absent: a kill or a full disk mid-write
leaves the previous version in place.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
    >>> atomic_write(path, "hello")
    >>> path.read_text()
    'hello'
    >>> first_line(ValueError("bad value\\nmore detail"))
    'bad value'
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from .errors import UserError


def atomic_write(path: str | Path, content: str | bytes | Callable[[Path], None]) -> None:
    """Write ``content`` (text, bytes, or a function that writes a given path) to a temporary file beside
    ``path``, flush it to disk, then rename it over ``path``. On failure the temporary file is removed and
    the error raised; ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.unlink(missing_ok=True)  # a leftover, or a link planted there, is removed: nothing is written through it
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "xb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def open_lock_file(path: Path) -> int:
    """``path`` opened to read and write (made if absent) as a plain file, never through a symbolic link: a lock
    file planted as a link to another file would have that file written. A link or a special file there is
    refused in one line; other failures are raised as they are."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise UserError(f"{path} is a symbolic link: aepretrain writes its lock files only as plain files, never "
                        "through a link; remove the link") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a plain file: aepretrain writes its lock files only as plain files; remove it")
    return fd


def say_taken_over(path: Path, holder: str) -> None:
    """Say that the lock at ``path`` was taken from ``holder``, the record in it: a holder that lets go clears its
    record, so one left there was killed before it could."""
    if holder:
        print(f"aepretrain: took over the lock {path}, left by {holder}, which is gone", file=sys.stderr, flush=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_stream(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """For writers that take an open binary file (``torch.save``): ``atomic_write`` with a file object."""
    def to_path(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            write(f)
    atomic_write(path, to_path)


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def printable(text: str) -> str:
    """``text`` on one line, for a terminal or a report: each character that does not print (a newline in a file
    or class name, an escape code, a byte that is not UTF-8) is written as a Python string writes it.

    >>> print(printable("tabby\\ncat.jpg"), printable("Bombay"))
    tabby\\ncat.jpg Bombay
    """
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def check_folder(path: str | Path, flag: str = "--out") -> None:
    """Refuse, before any work, a folder to write into that cannot be one: a file, or a path through a file."""
    path = Path(path)
    there = next((part for part in (path, *path.parents) if part.exists()), None)
    if there is not None and not there.is_dir():
        raise UserError(f"{flag} {path} is a file, not a folder" if there == path else
                        f"{flag} {path} cannot be a folder: {there} is a file")


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, which a scheduler's job or ``taskset`` narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def is_global_zero() -> bool:
    """True in the one process that writes files (every process when not distributed). Before Lightning has set a
    distributed run up, a process knows its rank only from its launcher's environment: on a node other than the
    first (``NODE_RANK`` or ``GROUP_RANK``, as Lightning's launcher, torchrun and SLURM scripts set them) no
    process writes, whatever its rank on that node."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only  # here: importing Lightning is slow

    node = os.environ.get("NODE_RANK") or os.environ.get("GROUP_RANK") or "0"
    return getattr(rank_zero_only, "rank", 0) == 0 and node.strip() == "0"


def write_json(path: Path, value: Any) -> None:
    """Written whole or not at all, by the first process only."""
    if is_global_zero():
        atomic_write(path, json.dumps(value, indent=2))
