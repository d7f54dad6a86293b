"""`aepretrain download --dataset fashion-mnist` from a real HTTP server on 127.0.0.1 serving the official files, and
where runs find Fashion-MNIST: --root, Debian's folder, then the downloaded copy in the cache folder."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import aepretrain
from aepretrain.cli import main
from aepretrain.data import fashion_mnist
from aepretrain.data.download import FASHION_MNIST_FILES
from aepretrain.errors import UserError

from .test_download import serving
from .test_hostile import one_line_error

# Debian's dataset-fashion-mnist holds the official gzip streams with the header's file name and time left out. Put
# back, the files are the official ones byte for byte: their md5 are those the zalandoresearch/fashion-mnist README
# publishes (FASHION_MNIST_FILES), which the download checks.
OFFICIAL_MTIME = {"train-images-idx3-ubyte.gz": 0x59A7E9DE, "train-labels-idx1-ubyte.gz": 0x59A7E9DE,
                  "t10k-images-idx3-ubyte.gz": 0x59A7E9F3, "t10k-labels-idx1-ubyte.gz": 0x59A7E9F3}
FNAME = 0x08  # the gzip header flag: a file name follows the fixed 10 bytes


def official(data: bytes, name: str) -> bytes:
    """The official file from Debian's copy of it (or the official file itself)."""
    if data[3] & FNAME:
        return data
    return b"\x1f\x8b\x08" + bytes([FNAME]) + struct.pack("<I", OFFICIAL_MTIME[name]) + b"\x00\x03" + \
        name.removesuffix(".gz").encode() + b"\0" + data[10:]


@pytest.fixture
def mirror(fashion_root: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A base URL serving the four official files, and the folder they are served from."""
    folder = tmp_path / "served"
    folder.mkdir()
    for name in FASHION_MNIST_FILES:
        (folder / name).write_bytes(official((fashion_root / name).read_bytes(), name))
    with serving(folder, []) as base_url:
        yield base_url, folder


@pytest.fixture
def no_fashion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No Debian package (its folder points to one that does not exist) and an empty cache folder; the cache's."""
    monkeypatch.setattr(fashion_mnist, "DEBIAN_ROOT", tmp_path / "no-debian-package")
    monkeypatch.setenv("AEPRETRAIN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def counts(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, int]:
    """The image counts `aepretrain data` reads, all of train (no limit)."""
    capsys.readouterr()
    assert main(["data", "--json", "--set", "data.train_limit=null", *args]) == 0
    info = json.loads(capsys.readouterr().out)
    return {"train+val": info["counts"]["train"] + info["counts"]["val"], "test": info["counts"]["test"]}


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("where", ["cache folder", "--root"])
def test_download_checks_the_published_md5_and_runs_read_the_files(
        mirror: tuple[str, Path], no_fashion: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        where: str) -> None:
    base_url, _ = mirror
    root = no_fashion / "datasets" / "fashion-mnist" if where == "cache folder" else tmp_path / "fm"
    flags = ["--root", str(root)] if where == "--root" else []
    out = str(tmp_path / "grid")

    assert main(["download", "--dataset", "fashion-mnist", "--url", base_url, *flags]) == 0
    said = "runs find it without --root" if where == "cache folder" else f"use --root {root}"
    assert capsys.readouterr().out.splitlines()[-1] == f"Fashion-MNIST is in {root}: {said}"
    assert sorted(p.name for p in root.iterdir()) == sorted(FASHION_MNIST_FILES)
    assert {p.name: md5(p) for p in root.iterdir()} == {name: m for name, (m, _) in FASHION_MNIST_FILES.items()}

    if where == "cache folder":  # found without --root (`data --root` is test_data's)
        assert counts(capsys, "--out", out) == {"train+val": 60_000, "test": 10_000}
        assert main(["data", "--out", out]) == 0  # says where it read the data
        assert capsys.readouterr().out.splitlines()[0] == f"fashion-mnist from {root}: 10 classes, images 32x32x1"


def test_debian_folder_comes_first_but_one_missing_a_file_is_passed_over(
        mirror: tuple[str, Path], no_fashion: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base_url, served = mirror
    debian = tmp_path / "debian"
    debian.mkdir()
    (debian / "train-labels-idx1-ubyte.gz").write_bytes((served / "train-labels-idx1-ubyte.gz").read_bytes())
    monkeypatch.setattr(fashion_mnist, "DEBIAN_ROOT", debian)
    assert main(["download", "--dataset", "fashion-mnist", "--url", base_url]) == 0

    assert fashion_mnist.find_root(None) == no_fashion / "datasets" / "fashion-mnist"
    (debian / "train-images-idx3-ubyte.gz").write_bytes((served / "train-images-idx3-ubyte.gz").read_bytes())
    unpacked = gzip.decompress((served / "t10k-images-idx3-ubyte.gz").read_bytes())
    (debian / "t10k-images-idx3-ubyte").write_bytes(unpacked)
    (debian / "t10k-labels-idx1-ubyte.gz").write_bytes((served / "t10k-labels-idx1-ubyte.gz").read_bytes())
    assert fashion_mnist.find_root(None) == debian  # complete (one file unpacked): it comes first


def test_a_corrupt_file_is_refused_in_one_line_and_not_kept(
        mirror: tuple[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base_url, served = mirror
    labels = served / "train-labels-idx1-ubyte.gz"
    data = bytearray(labels.read_bytes())
    data[-20] ^= 0xFF  # same size, one byte changed
    labels.write_bytes(bytes(data))
    root = tmp_path / "fm"

    assert main(["download", "--dataset", "fashion-mnist", "--root", str(root), "--url", base_url]) == 2
    expected = FASHION_MNIST_FILES["train-labels-idx1-ubyte.gz"][0]
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1] == (
        f"aepretrain: error: md5 mismatch for train-labels-idx1-ubyte.gz from {base_url}train-labels-idx1-ubyte.gz: "
        f"expected {expected}, got {hashlib.md5(data).hexdigest()} (the file was removed; try again)")
    assert [p.name for p in root.iterdir()] == ["train-images-idx3-ubyte.gz"]  # fetched before, and verified


def test_not_found_names_both_ways_to_get_it(no_fashion: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "--out", str(tmp_path / "grid")]) == 2
    assert one_line_error(capsys) == (
        f"aepretrain: error: Fashion-MNIST not found (neither {tmp_path / 'no-debian-package'} nor "
        f"{no_fashion / 'datasets' / 'fashion-mnist'} holds its four idx files); get it with `sudo apt-get install "
        "dataset-fashion-mnist` or `aepretrain download --dataset fashion-mnist`, or pass --root to a folder holding "
        "the four idx files\n")
    assert not (no_fashion / "datasets").exists()  # looking downloads nothing


@pytest.mark.parametrize(("args", "line"), [
    (["--dataset", "mnist"], "download --dataset 'mnist': there is none to download; choose oxford-pets or "
                             "fashion-mnist"),
    (["--dataset", "oxford-pets"], "download --dataset oxford-pets needs --root DIR: where to unpack its 800 MB"),
    ([], "download --dataset oxford-pets needs --root DIR: where to unpack its 800 MB"),
])
def test_download_mistakes_are_one_line(args: list[str], line: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["download", *args]) == 2
    assert one_line_error(capsys) == f"aepretrain: error: {line}\n"


def test_without_fcntl_the_cli_says_it_needs_posix_in_one_line(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows: `import fcntl` fails
    assert main(["run", "--preset", "tiny", "--dataset", "synthetic", "--out", str(tmp_path / "run")]) == 2
    assert one_line_error(capsys) == ("aepretrain: error: aepretrain needs a POSIX system (Linux, macOS, WSL): it "
                                      "locks its run folders and data stores with fcntl.flock, which this Python "
                                      "lacks (Windows)\n")
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match=r"^aepretrain needs a POSIX system \(Linux, macOS, WSL\)"):
        aepretrain.__getattr__("bench")  # the Python API says the same where its first name is taken
