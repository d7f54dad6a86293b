"""Locks, markers and processes (issue 19): a lock or marker file that is a link is refused and its target never
written; decoding workers die with a killed build, and the next run takes the locks over in one line; a download
stops at the archive's size and leaves no partial file, however it ends. Real files, processes and HTTP servers."""

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aepretrain.cli import main
from aepretrain.config import resolve
from aepretrain.data.download import download_oxford_pets
from aepretrain.errors import UserError
from aepretrain.runfolder import LOCK, MARKER, run_folder, save_settings

from .conftest import tiny
from .test_hostile import TINY, folder_data, one_line_error

PRECIOUS = "the user's own file\n"


# 4. a lock or marker file that is a symbolic link


def victim(tmp_path: Path, text: str = PRECIOUS) -> Path:
    path = tmp_path / "victim.txt"
    path.write_text(text)
    return path


def test_a_run_folder_lock_that_is_a_link_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = victim(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).symlink_to(target)
    assert main(["run", "--out", str(out), *TINY]) == 2
    one_line_error(capsys, f"{out / LOCK} is a symbolic link", "remove the link")
    assert target.read_text() == PRECIOUS and sorted(p.name for p in out.iterdir()) == [LOCK]


def test_a_store_lock_that_is_a_link_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("AEPRETRAIN_CACHE", str(cache))
    args = ["data", "--dataset", "folder", "--root", str(folder_data(tmp_path / "root")), "--image-size", "16",
            "--out", str(tmp_path / "o")]
    assert main(args) == 0
    [lock] = cache.glob("*.lock")
    for built in (*cache.glob("*.npy"), *cache.glob("*.json"), lock):
        built.unlink()
    target = victim(tmp_path)
    lock.symlink_to(target)
    capsys.readouterr()
    assert main(args) == 2
    one_line_error(capsys, f"{lock} is a symbolic link", "remove the link")
    assert target.read_text() == PRECIOUS
    assert main(["cache", "clear", "--dir", str(cache)]) == 2
    one_line_error(capsys, f"{lock} is a symbolic link")
    assert target.read_text() == PRECIOUS and lock.is_symlink()


def test_a_marker_that_is_a_link_is_not_trusted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = victim(tmp_path, json.dumps({"aepretrain": "0.1.0", "kind": "run"}))
    out = tmp_path / "run"
    out.mkdir()
    (out / MARKER).symlink_to(target)
    assert main(["run", "--out", str(out), "--resume", *TINY]) == 2
    one_line_error(capsys, f"{out / MARKER} is a symbolic link", "cannot be trusted as a run")
    assert (out / MARKER).is_symlink() and sorted(p.name for p in out.iterdir()) == [MARKER]


def test_the_markers_temporary_file_is_never_written_through_a_link(tmp_path: Path) -> None:
    """atomic_write's temporary name holds this process's id: a link planted there is replaced, not followed."""
    out = tmp_path / "run"
    with run_folder(out, "run"):
        pass
    target = victim(tmp_path)
    (out / f".{MARKER}.{os.getpid()}.tmp").symlink_to(target)
    save_settings(resolve("tiny"), out)
    assert target.read_text() == PRECIOUS
    assert not (out / MARKER).is_symlink() and "settings_sha256" in (out / MARKER).read_text()
    assert not list(out.glob("*.tmp"))
