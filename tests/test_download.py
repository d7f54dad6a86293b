"""Tests for aepretrain.data.download against a real HTTP server on 127.0.0.1."""

import hashlib
import http.server
import io
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
from PIL import Image

from aepretrain.data.download import download_oxford_pets
from aepretrain.errors import UserError

IMAGE_NAMES = ["Abyssinian_1", "Abyssinian_2", "american_bulldog_1"]


@dataclass
class PetsServer:
    base_url: str
    folder: Path
    archives: dict[str, tuple[str, int]]
    requests: list[str] = field(default_factory=list)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _expected(path: Path) -> tuple[str, int]:
    """What download_oxford_pets is told to expect of a file: its md5 and size."""
    return hashlib.md5(path.read_bytes()).hexdigest(), path.stat().st_size


def _write_fake_archives(folder: Path) -> dict[str, tuple[str, int]]:
    with tarfile.open(folder / "images.tar.gz", "w:gz") as tar:
        for i, name in enumerate(IMAGE_NAMES):
            jpeg = io.BytesIO()
            Image.new("RGB", (8, 8), (40 * i, 100, 200)).save(jpeg, format="JPEG")
            _add_bytes(tar, f"images/{name}.jpg", jpeg.getvalue())

    rows = "".join(f"{name} {i % 2 + 1} {i % 2 + 1} 1\n" for i, name in enumerate(IMAGE_NAMES))
    with tarfile.open(folder / "annotations.tar.gz", "w:gz") as tar:
        header = "#Image CLASS-ID SPECIES BREED ID\n"
        _add_bytes(tar, "annotations/list.txt", (header + rows).encode())
        _add_bytes(tar, "annotations/trainval.txt", rows.encode())
        _add_bytes(tar, "annotations/test.txt", rows.encode())

    return {name: _expected(folder / name) for name in ("images.tar.gz", "annotations.tar.gz")}


@contextmanager
def serving(folder: Path, requests: list[str]) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 for the files in ``folder``, recording each request's path; its base URL."""

    class RecordingHandler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(RecordingHandler, directory=str(folder))
    )
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        host, port = httpd.server_address[:2]
        yield f"http://{host}:{port}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PetsServer]:
    folder = tmp_path / "served"
    folder.mkdir()
    archives = _write_fake_archives(folder)
    requests: list[str] = []
    with serving(folder, requests) as base_url:
        yield PetsServer(base_url, folder, archives, requests)


def test_download_extracts_verified_archives(
    server: PetsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "out" / "pets"
    result = download_oxford_pets(root, server.base_url, server.archives, progress=True)

    assert result == root
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{n}.jpg" for n in IMAGE_NAMES]
    for name in IMAGE_NAMES:
        with Image.open(root / "images" / f"{name}.jpg") as image:
            assert image.size == (8, 8)
    assert {p.name for p in (root / "annotations").iterdir()} == {"list.txt", "trainval.txt", "test.txt"}
    assert "Abyssinian_1 1 1 1" in (root / "annotations" / "trainval.txt").read_text()
    assert not list(root.glob("*.part"))
    assert (root / "images.tar.gz").is_file() and (root / "annotations.tar.gz").is_file()
    assert "images.tar.gz" in capsys.readouterr().err


def test_second_call_does_not_download_again(server: PetsServer, tmp_path: Path) -> None:
    root = tmp_path / "pets"
    download_oxford_pets(root, server.base_url, server.archives, progress=False)
    assert sorted(server.requests) == ["/annotations.tar.gz", "/images.tar.gz"]

    download_oxford_pets(root, server.base_url, server.archives, progress=False)
    assert len(server.requests) == 2
    assert (root / "images" / "Abyssinian_1.jpg").is_file()


def test_wrong_md5_raises_and_extracts_nothing(server: PetsServer, tmp_path: Path) -> None:
    root = tmp_path / "pets"
    archives = {**server.archives, "annotations.tar.gz": ("0" * 32, server.archives["annotations.tar.gz"][1])}

    with pytest.raises(UserError, match=r"md5.*annotations\.tar\.gz") as excinfo:
        download_oxford_pets(root, server.base_url, archives, progress=False)

    assert "\n" not in str(excinfo.value)
    assert not (root / "images").exists()
    assert not (root / "annotations").exists()
    assert not (root / "annotations.tar.gz").exists()
    assert not list(root.glob("*.part"))


def test_missing_archive_raises_naming_the_url(server: PetsServer, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="404") as excinfo:
        download_oxford_pets(tmp_path / "pets", server.base_url, {"missing.tar.gz": ("0" * 32, 1)}, progress=False)

    assert server.base_url + "missing.tar.gz" in str(excinfo.value)
    assert not (tmp_path / "pets" / "missing.tar.gz.part").exists()


def _evil_member(kind: str) -> tarfile.TarInfo:
    if kind == "dotdot":
        return tarfile.TarInfo("../evil.txt")
    if kind == "absolute":
        return tarfile.TarInfo("/tmp/evil.txt")
    link = tarfile.TarInfo("images/evil_link")
    link.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
    link.linkname = "../../evil.txt" if kind == "symlink" else "../evil.txt"
    return link


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink"])
def test_unsafe_member_is_refused(server: PetsServer, tmp_path: Path, kind: str) -> None:
    evil = server.folder / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        _add_bytes(tar, "images/ok.txt", b"fine")
        member = _evil_member(kind)
        if member.isfile():
            _add_bytes(tar, member.name, b"pwned")
        else:
            tar.addfile(member)
    parent = tmp_path / "out"
    root = parent / "pets"

    with pytest.raises(UserError, match="evil"):
        download_oxford_pets(root, server.base_url, {"evil.tar.gz": _expected(evil)}, progress=False)

    assert [p.name for p in parent.iterdir()] == ["pets"]
    assert not (root / "images").exists()


def test_corrupt_archive_raises(server: PetsServer, tmp_path: Path) -> None:
    corrupt = server.folder / "corrupt.tar.gz"
    corrupt.write_bytes(b"this is not a gzip file")

    with pytest.raises(UserError, match=r"cannot read archive .*corrupt\.tar\.gz"):
        download_oxford_pets(tmp_path / "pets", server.base_url, {"corrupt.tar.gz": _expected(corrupt)}, progress=False)
