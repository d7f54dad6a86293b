"""The one exception type for mistakes a user can cause; the CLI prints it as one line.

Example:
    >>> shown("runs/quick")
    'runs/quick'
    >>> shown("/tmp/" + "a" * 300)
    '/tmp/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa... (305 characters)'
"""

from __future__ import annotations

import importlib.util
import os

LONGEST_SHOWN = 100  # characters of a path a message shows whole; a longer one is cut to its first 60


class UserError(Exception):
    """A wrong path, a bad image, an unknown setting: something the user can fix.

    The message is one line that says what went wrong and where.
    """


def shown(path: str | os.PathLike[str] | bytes) -> str:
    """A path as a one-line message shows it: whole, or its start and length when it is too long to read."""
    text = os.fsdecode(path)
    return text if len(text) <= LONGEST_SHOWN else f"{text[:60]}... ({len(text)} characters)"


def require_posix() -> None:
    """Say in one line, before any work, that this system cannot run aepretrain: its run folders and data stores
    are locked with fcntl.flock (which also lets a dead process's lock be taken over), and Windows has no fcntl."""
    if importlib.util.find_spec("fcntl") is None:
        raise UserError("aepretrain needs a POSIX system (Linux, macOS, WSL): it locks its run folders and data "
                        "stores with fcntl.flock, which this Python lacks (Windows)")
