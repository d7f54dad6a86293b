"""What aepretrain says while it works, and where: one path, Python logging under the logger ``aepretrain``.

Library code logs (``logging.getLogger(__name__)``) and prints nothing: a notebook shows its lines only once
logging is configured, e.g. ``logging.basicConfig(level=logging.INFO)``. The command line puts one handler on
stderr (:func:`cli_logging`): info lines (step headers, one line per epoch, the data stores built) as they are,
warnings (libraries' too) with aepretrain's prefix; results (tables, JSON, the final summary) stay on stdout,
printed by cli.py. Which fit is training (:func:`fitting`) names its header, its progress bar and its epoch lines.

Example:
    >>> with fitting("study f0.1 greedy seed 3"):
    ...     fit_label("finetune pretrained")
    'study f0.1 greedy seed 3'
    >>> with fitting("study greedy seed 3 {fit}"):
    ...     fit_label("stage 2/3")
    'study greedy seed 3 stage 2/3'
    >>> fit_label("stage 2/3")
    'stage 2/3'
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

LOG = logging.getLogger("aepretrain")
PREFIX = "aepretrain: "
FIT = "{fit}"
FITTING: ContextVar[str] = ContextVar("fitting", default=FIT)


@contextmanager
def fitting(template: str) -> Iterator[None]:
    """Fits inside the block are named ``template``, its ``{fit}`` replaced by the fit's own name (``stage 2/3``,
    ``finetune scratch``): a study names each task, which runs the same stages and arms as every other."""
    token = FITTING.set(template)
    try:
        yield
    finally:
        FITTING.reset(token)


def fit_label(own: str) -> str:
    return FITTING.get().replace(FIT, own)


def header(text: str) -> None:
    """The line before a step (a stage, an arm, the probes, the report), said by the first process only."""
    from .fileio import is_global_zero  # here: it imports Lightning, which the command line loads late

    if is_global_zero():
        LOG.info(text)


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a redirect or a test's capture made after the setup)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _Lines(logging.Formatter):
    """Info and debug lines as they are; a warning or error begins ``aepretrain: `` (most already say it, so that
    a notebook's default handler shows them the same way)."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno < logging.WARNING or text.startswith(PREFIX) else PREFIX + text


def cli_level(quiet: bool, verbose: bool) -> int:
    """``--quiet``: warnings and errors only; ``--verbose``: debug lines too (and Lightning's own)."""
    return logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO


@contextmanager
def cli_logging(level: int) -> Iterator[None]:
    """The command line's handler on stderr at ``level`` while the block runs; the logger as it was afterwards
    (tests call the command line many times in one process)."""
    handler = _Stderr()
    handler.setFormatter(_Lines())
    before = LOG.level, LOG.propagate, warnings.showwarning
    LOG.addHandler(handler)
    LOG.setLevel(level)
    LOG.propagate = False  # said once, whatever handlers the root logger has
    warnings.showwarning = _warning_line
    try:
        yield
    finally:
        LOG.removeHandler(handler)
        LOG.setLevel(before[0])
        LOG.propagate = before[1]
        warnings.showwarning = before[2]


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
                  line: str | None = None) -> None:
    """A library's warning (Lightning's, PyTorch's) as one of ours: one line, without the code that raised it."""
    LOG.warning(f"{PREFIX}warning: {message}")
