"""Hostile settings, study grids and study checkpoints (issue 19): a crafted settings file ends in one short line at
once; a study refuses a grid that lists a cell twice, counts its step budget per DDP process and records the seed of
its split; `finetune --encoder` takes any greedy stage and checks it before writing; a damaged resume checkpoint is
one whole sentence."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from aepretrain.cli import main

from .test_hostile import one_line_error


def aepretrain(*args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess[str], float]:
    """The CLI in a process of its own: its exit code, output and seconds, as a user sees them."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "aepretrain", *args], capture_output=True, text=True, timeout=timeout)
    return done, time.perf_counter() - started


def last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.splitlines()
    assert lines and "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-2000:]
    return lines[-1]


# 8. a settings file or --set value crafted to take all memory and time


def laughs(depth: int) -> str:
    """A 'billion laughs' settings file: each list holds nine aliases of the one before; a few hundred bytes that
    expand to 9 ** depth items."""
    lists = ["&a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for name, previous in zip("bcdefghijk"[:depth - 1], "abcdefghij"):
        lists.append(f"&{name} [{', '.join([f'*{previous}'] * 9)}]")
    return f"seed: [{', '.join(lists)}]\n"


def test_a_file_of_nested_aliases_ends_in_one_line_at_once(tmp_path: Path) -> None:
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs(9))
    assert len(path.read_bytes()) < 400
    done, seconds = aepretrain("summary", "--config", str(path), timeout=30)  # before: a MemoryError after 47 s
    assert done.returncode == 2 and seconds < 5, (done.returncode, seconds)
    assert last_line(done) == f"aepretrain: error: {path}, line 1: an alias (*a) is not accepted in settings; " \
                              "write the value out"
    done, seconds = aepretrain("summary", "--set", laughs(9).replace(": ", "=", 1).strip(), timeout=30)
    assert done.returncode == 2 and seconds < 5 and "an alias (*a) is not accepted" in last_line(done)


def test_an_oversized_settings_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("seed: 1\n# " + "x" * 5_000_000 + "\n")  # before: read and parsed whole, exit 0
    done, seconds = aepretrain("summary", "--config", str(path), timeout=60)
    assert done.returncode == 2 and seconds < 5, (done.returncode, seconds)
    assert last_line(done) == f"aepretrain: error: {path} is larger than 65,536 bytes, more than any settings " \
                              "file holds (a full one is 3 kB)"


@pytest.mark.parametrize("text, message", [
    ("seed: " + "[" * 3000 + "]" * 3000, "line 1: lists or mappings nested more than 16 deep are not settings"),
    ("seed: " + "1" * 5000, "holds a value YAML cannot read: Exceeds the limit (4300 digits) for integer string "
                            "conversion: value has 5000 digits"),
    ("data:\n  root: 2024-13-01\n", "holds a value YAML cannot read: month must be in 1..12"),
])
def test_a_file_python_cannot_read_as_settings_is_one_line(text: str, message: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    assert main(["summary", "--config", str(path)]) == 2  # before: RecursionError, ValueError tracebacks
    assert one_line_error(capsys, message).startswith(f"aepretrain: error: {path}")


@pytest.mark.parametrize("args, start", [
    (["--set", "seed=" + "x" * 10_000], "aepretrain: error: --set seed=" + "x" * 75 + "...: seed must be a whole "
                                        "number, got '" + "x" * 79 + "..."),
    (["--set", "model.init=" + "keras" * 2000], "aepretrain: error: unknown init '" + "keras" * 15 + "kera... for "
                                                "model.init (closest valid: keras)"),
    (["--set", "y" * 5000 + "=1"], "aepretrain: error: unknown setting '" + "y" * 80 + "...' in --set "),
    (["--preset", "p" * 5000], "aepretrain: error: unknown preset '" + "p" * 80 + "...' (closest valid: "),
    (["--set", "seed=" + "1" * 200_000], "aepretrain: error: --set seed=" + "1" * 75 + "...: the value is longer "
                                         "than 65,536 characters"),
])
def test_a_long_bad_value_is_quoted_cut(args: list[str], start: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["summary", *args]) == 2
    line = one_line_error(capsys)
    assert line.startswith(start) and len(line) < 300, line[:400]


def test_a_long_bad_value_in_a_file_is_quoted_cut(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "long.yaml"
    path.write_text("study:\n  label_fractions: [" + ", ".join(["0.5"] * 5000) + ", 2]\nfinetune:\n  arms: "
                    + "x" * 20_000 + "\n")
    assert main(["summary", "--config", str(path)]) == 2
    line = one_line_error(capsys, f"{path}: finetune.arms must be a list, got '" + "x" * 79 + "...")
    assert len(line) < 300


# 10. a study grid that lists a cell twice


@pytest.mark.parametrize("args, message", [
    (["--label-fractions", "0.5,0.5"], "study.label_fractions lists 0.5 more than once (to 6 significant digits); "
                                       "give each once"),
    (["--label-fractions", "0.5,.5,1"], "study.label_fractions lists 0.5 more than once"),
    (["--set", "study.label_fractions=[0.1234567, 0.1234568]"], "lists 0.123457 more than once (to 6 significant "
                                                                "digits)"),
    (["--label-fractions", "1", "--objectives", "greedy,end-to-end,greedy"],
     "study.objectives lists greedy more than once; give each once"),
])
def test_a_study_refuses_a_cell_listed_twice_before_writing(args: list[str], message: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out, absent = tmp_path / "study", tmp_path / "no-data"  # refused before the data is looked for
    assert main(["study", "--out", str(out), "--preset", "tiny", "--quiet", "--dataset", "folder", "--root",
                 str(absent), *args]) == 2  # before: with data, exit 0 and every cell twice in study.csv
    one_line_error(capsys, message)
    assert not out.exists()
