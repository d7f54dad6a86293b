"""One atomic write, one JSON writer, one way to quote an exception."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aepretrain.fileio import atomic_write, first_line, write_json


def test_a_failed_write_leaves_the_previous_file_and_no_temporary_one(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json(path, {"a": 1})

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"a": 1} and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_first_line_of_an_exception() -> None:
    assert first_line(ValueError("bad\nmore")) == "bad"
    assert first_line(KeyError()) == "KeyError"
