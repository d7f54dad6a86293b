"""Run folders: known by a marker only aepretrain writes, replaced only in what aepretrain wrote, used by one
process at a time.

A folder holds a run (or a study) when it holds ``.aepretrain-run.json``, which records the version, the
kind of folder and a checksum of the saved settings. ``--overwrite`` removes only the files aepretrain
writes in a folder of that kind (:data:`WRITES`: by name, down into ``figures/``, ``checkpoints/``, ``logs/``,
a study's ``cells/`` and ``pretrain/``), then the folders that are left empty; anything else stays, and with
it the folder that holds it. A symbolic link at one of those names is removed as a link, never followed. A
folder that is not empty and holds no marker is refused. A run folder that holds only a start that never
finished a stage (:func:`unfinished_start`: settings, no results) is replaced by the next run without either
flag, saying so. While a process works in a folder it holds a lock on ``.aepretrain-lock`` there (``flock``,
released when the process ends, however it ends); a second process is refused with the first one's id.

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> with run_folder(out, "run") as folder:
    ...     sorted(p.name for p in folder.iterdir())
    ['.aepretrain-lock', '.aepretrain-run.json']
    >>> read_marker(out)["kind"]
    'run'
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from . import __version__
from .config import Config, load, save
from .errors import UserError
from .fileio import atomic_write, first_line, open_lock_file, say_taken_over

MARKER = ".aepretrain-run.json"
LOCK = ".aepretrain-lock"
SETTINGS = "config.yaml"
Tree = dict[str, "Tree | None"]  # name pattern (fnmatch) -> what a folder of that name holds; None: a file
_FILE = None
_MODULES = ("stage[0-9]*", "test", "pretrained", "scratch")  # what trainers are named: stages, the test, arms
_TRAINING: Tree = {  # what a stage or arm writes under the folder it trains in (training.py, pretrain.py, finetune.py)
    "checkpoints": {
        **{f"{stem}.{ext}": _FILE for stem in ("pretrain-stage[0-9]*", "classifier-pretrained", "classifier-scratch")
           for ext in ("safetensors", "json")},  # weights and their record
        "resume": {module: {"last.ckpt": _FILE} for module in _MODULES},  # Lightning's, each epoch
    },
    "logs": {module: {"metrics.csv": _FILE, "hparams.yaml": _FILE, "events.out.tfevents.*": _FILE}  # CSV, TensorBoard
             for module in _MODULES},
}
_RUN_FIGURES = ("samples.png", "reconstructions.png", "pretrain-curves.png", "probes.png", "finetune-curves.png",
                "confusion-pretrained.png", "confusion-scratch.png", "predictions.png")
WRITES: dict[str, Tree] = {  # what aepretrain writes in a folder of each kind: all that --overwrite may remove
    "run": {**dict.fromkeys((SETTINGS, "data.json", "metrics.json", "report.md", "report.html")),
            "figures": dict.fromkeys(_RUN_FIGURES), **_TRAINING},
    "study": {**dict.fromkeys(("study.json", "study.csv", "study.md", "study.html")),
              "figures": {"study.png": _FILE, "study-gain.png": _FILE}, "cells": {"f*-*-seed[0-9]*": _TRAINING},
              "pretrain": {"*-seed[0-9]*": _TRAINING}},  # label_study.py: a cell, an objective's encoder
}


def read_marker(out: Path) -> dict[str, Any] | None:
    """The folder's marker, or None where there is none; one line if it is damaged."""
    path = Path(out) / MARKER
    if path.is_symlink():  # read through, it would make any file a marker; written, it would be replaced
        raise UserError(f"{path} is a symbolic link, not the marker aepretrain writes: the folder cannot be trusted "
                        "as a run; remove the link")
    if not path.is_file():
        return None
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is damaged ({first_line(exc)}): the folder cannot be trusted as a run") from None
    if not isinstance(marker, dict) or marker.get("kind") not in WRITES:
        raise UserError(f"{path} is damaged (no kind of folder in it): the folder cannot be trusted as a run")
    return marker


def _write_marker(out: Path, kind: str, **fields: Any) -> None:
    atomic_write(out / MARKER, json.dumps({"aepretrain": __version__, "kind": kind, **fields}, indent=2))


def _user_entries(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != LOCK) if out.is_dir() else []


def _check(out: Path, kind: str, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """Refuse, writing nothing, a folder this call must not use; return its marker."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    marker = read_marker(out)
    if marker is None:
        entries = _user_entries(out)
        if entries:
            raise UserError(f"{out} is not empty ({entries[0]}{', ...' if len(entries) > 1 else ''}) and holds no "
                            f"aepretrain {kind}: choose another --out (aepretrain replaces only folders it made)")
    elif marker["kind"] != kind:
        raise UserError(f"{out} holds an aepretrain {marker['kind']}, not a {kind}: choose another --out")
    elif not (resume or overwrite or _restarts(out, kind)):
        raise UserError(f"{out} already holds a {kind}: pass --resume to continue it or --overwrite to replace it")
    return marker


@contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold ``out/.aepretrain-lock`` (the process id inside) until the block ends; refuse if another holds it.
    The id is cleared on the way out, so one found there was left by a process killed while it held the lock."""
    path = out / LOCK
    try:
        fd = open_lock_file(path)
    except OSError as exc:
        raise UserError(f"cannot write in {out}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise UserError(f"{out} is in use by process {holder or '(starting)'}, which holds {path}: wait "
                            "for it to end, or choose another --out") from None
        left = os.pread(fd, 32, 0).decode(errors="replace").strip()
        say_taken_over(path, left and f"process {left}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the lock


_START: Tree = {MARKER: _FILE, SETTINGS: _FILE, "data.json": _FILE, "figures": {"samples.png": _FILE}}  # before stage 1


def unfinished_start(out: Path) -> bool:
    """Whether of what a run writes, ``out`` holds only what it writes before its first stage trains (its
    settings and the data's description): a start that failed or was stopped, with nothing to resume."""
    return _holds_only(out, {**WRITES["run"], MARKER: _FILE}, _START)


def _restarts(out: Path, kind: str) -> bool:
    return kind == "run" and unfinished_start(out)


def _holds_only(folder: Path, written: Tree, allowed: Tree) -> bool:
    """Whether, of the files and folders ``written`` names, ``folder`` holds only those ``allowed`` names."""
    with os.scandir(folder) as entries:  # closed on an early return too
        for entry in entries:
            matched, holds = _match(entry.name, written)
            if not matched:
                continue  # the user's
            known, inside = _match(entry.name, allowed)
            if not known:
                return False
            if holds is not None and inside is not None and entry.is_dir(follow_symlinks=False) and \
                    not _holds_only(Path(entry.path), holds, inside):
                return False
    return True


def _remove_own(out: Path, kind: str) -> None:
    """Remove what aepretrain wrote in ``out`` (and leftovers of its interrupted writes); nothing else."""
    _remove_matching(out, {**WRITES[kind], MARKER: _FILE})


def _remove_matching(folder: Path, tree: Tree) -> None:
    """Remove the files ``tree`` names in ``folder``, then its folders that are left empty; never follow a link."""
    with os.scandir(folder) as entries:
        listed = list(entries)
    for entry in listed:
        matched, holds = _match(entry.name, tree)
        if not matched:
            continue
        if entry.is_symlink() or (holds is None and entry.is_file(follow_symlinks=False)):
            os.unlink(entry.path)
        elif holds is not None and entry.is_dir(follow_symlinks=False):
            _remove_matching(Path(entry.path), holds)
            if not os.listdir(entry.path):
                os.rmdir(entry.path)


def _match(name: str, tree: Tree) -> tuple[bool, Tree | None]:
    """Whether aepretrain writes ``name`` where ``tree`` describes, and what it holds; a file's name also
    matches the temporary files of its interrupted writes (fileio.atomic_write: ``.NAME.PID.tmp``)."""
    for pattern, holds in tree.items():
        if fnmatchcase(name, pattern) or (holds is None and fnmatchcase(name, f".{pattern}.*.tmp")):
            return True, holds
    return False, None


@contextmanager
def run_folder(out: str | Path, kind: str = "run", resume: bool = False, overwrite: bool = False,
               before_writing: Callable[[bool], None] | None = None) -> Iterator[Path]:
    """The folder of a run or study, locked for this process while the block runs.

    A new or empty folder becomes one (a marker is written); one that holds a run of this kind is used only
    with ``resume`` or, replaced, with ``overwrite``; one that holds only a run's :func:`unfinished_start` is
    replaced without either, saying so. ``before_writing(replacing)`` (the data check, say) runs under the lock
    before anything is written or removed; if it fails, a folder this call made is removed again. Under DDP only
    the first process opens the folder.
    """
    from .fileio import is_global_zero

    out = Path(out)
    if not is_global_zero():
        yield out
        return
    _check(out, kind, resume, overwrite)  # before anything is written
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot make the folder {out}: {exc.strerror or exc}") from None
    with _lock(out):
        marker = _check(out, kind, resume, overwrite)  # again, now that no other process can change it
        restart = marker is not None and not overwrite and _restarts(out, kind)
        replacing = marker is not None and (overwrite or restart)
        if before_writing is not None:
            try:
                before_writing(replacing)
            except BaseException:
                if made:  # nothing of this call is left in the way of the next
                    with suppress(OSError):
                        (out / LOCK).unlink()
                        out.rmdir()
                raise
        if replacing:
            _remove_own(out, kind)
        if marker is None or replacing:
            _write_marker(out, kind)
        if restart:
            logging.getLogger("aepretrain").warning(f"aepretrain: {out} held only a start that never finished a "
                                                    "stage (settings, no results): this run replaces it")
        yield out


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_settings(cfg: Config, out: Path) -> None:
    """config.yaml, and its checksum in the marker, so that a damaged or cut file is never resumed from."""
    save(cfg, out / SETTINGS)
    _write_marker(out, "run", settings_sha256=_checksum(out / SETTINGS))


def saved_settings(out: str | Path) -> Config | None:
    """The settings a run in ``out`` saved, verified against their checksum; None if no run saved any."""
    out = Path(out)
    marker = read_marker(out)
    path = out / SETTINGS
    if marker is None or marker["kind"] != "run" or not path.is_file():
        return None
    if marker.get("settings_sha256") != _checksum(path):
        raise UserError(f"{path} is damaged or was edited: it does not match the checksum the run saved in "
                        f"{MARKER}, so the run's settings are unknown; pass --overwrite to start the run again")
    return load(path)
