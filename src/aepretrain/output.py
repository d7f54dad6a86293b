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
from contextlib import contextmanager, redirect_stdout
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


def duration(seconds: float | None) -> str:
    """Seconds for people.

    >>> duration(3.04), duration(125.4), duration(660), duration(3725)
    ('3.0 s', '2 min 5 s', '11 min', '1 h 2 min')
    """
    if seconds is None:
        return "n/a"
    whole = round(seconds)
    if whole < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {rest} s" if rest else f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def header(text: str) -> None:
    """The line before a step (a stage, an arm, the probes, the report), said by the first process only."""
    from .fileio import is_global_zero  # here: it imports Lightning, which the command line loads late

    if is_global_zero():
        LOG.info(text)


@contextmanager
def results_from_first_process() -> Iterator[None]:
    """Standard output, inside the block, is written by the first process of a distributed run only: each
    process of a DDP run ends the command, and its results are said once."""
    from .fileio import is_global_zero

    class FirstProcessOnly:
        def __init__(self, stream: Any) -> None:
            self.stream = stream

        def write(self, text: str) -> int:
            return self.stream.write(text) if is_global_zero() else len(text)

        def writelines(self, lines: Any) -> None:
            for line in lines:
                self.write(line)

        def __getattr__(self, name: str) -> Any:  # flush, isatty, encoding: the stream's own
            return getattr(self.stream, name)

    with redirect_stdout(FirstProcessOnly(sys.stdout)):  # type: ignore[type-var]
        yield


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
