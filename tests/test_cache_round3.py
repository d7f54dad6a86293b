"""The cache, round three (issue 19): `cache clear` deletes only files aepretrain wrote, told by their content;
`cache verify` checks every image whatever the file's times; a change with the time set back is noticed on the
next use; a garbled header, a dangling link, a folder named like an entry and a read-only cache are one line or
quietly left alone. Real files, real processes, a real read-only mount where the machine allows one."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aepretrain.cli import main
from aepretrain.data.store import allocate

from .test_hostile import one_line_error
from .test_store import STORED, folder_of_photos

KEY = "0123456789abcdef0123"


def build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[list[str], Path, np.ndarray]:
    """A store of 12 photos built by `aepretrain data`: the command's arguments, the store's .npy and its pixels."""
    args = ["data", "--dataset", "folder", "--root", str(folder_of_photos(tmp_path / "photos", 12)),
            "--image-size", "16", "--out", str(tmp_path / "o"), "--json", "--set", f"data.cache_dir={tmp_path / 'c'}"]
    assert main(args) == 0
    assert len(STORED.findall(capsys.readouterr().err)) == 1
    [npy] = (tmp_path / "c").glob("*.npy")
    return args, npy, np.load(npy)


def cache_cli(*args: str, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["cache", *args]) == 0
    return capsys.readouterr().out


def flip_a_byte_keeping_size_and_times(npy: Path) -> None:
    before = npy.stat()
    with open(npy, "r+b") as f:
        f.seek(before.st_size - 700)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(npy, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert npy.stat().st_mtime_ns == before.st_mtime_ns and npy.stat().st_size == before.st_size


def older_entries(cache: Path) -> dict[str, list[Path]]:
    """Entries older versions of aepretrain wrote (format 2: SHA-1 digests, format 1: one .npz), and what a build
    killed part way leaves: its lock file naming it, its temporary pixel file and a cut-short temporary index."""
    format_2 = cache / f"folder-all-8-{'2' * 20}"
    np.save(format_2.with_suffix(".npy"), np.zeros((1, 8, 8, 3), np.uint8))
    format_2.with_suffix(".json").write_text(json.dumps(
        {"format": 2, "shape": [1, 8, 8, 3], "rows": [0], "labels": [0], "names": ["a.png"],
         "digests": ["0123456789abcdef"], "source": "/photos", "skipped": [], "stat": [320, 1, 2]}))
    format_2.with_suffix(".lock").write_text("")
    format_1 = cache / f"folder-all-8-{'1' * 20}.npz"
    np.savez(format_1, images=np.zeros((1, 8, 8, 3), np.uint8), labels=np.zeros(1, np.int64),
             meta=np.array(json.dumps({"names": ["a.png"], "skipped": []})))
    killed = f"folder-all-8-{'4' * 20}"
    (cache / f"{killed}.lock").write_text("process 4242 on elsewhere")
    allocate(cache / f".{killed}.npy.4242.tmp", (3, 8, 8, 3))
    (cache / f".{killed}.json.4242.tmp").write_text('{"aepretrain": "0.1.0", "format": 3, "sha')
    return {"format 2": [format_2.with_suffix(s) for s in (".npy", ".json", ".lock")], "format 1": [format_1],
            "killed": [cache / f"{killed}.lock", cache / f".{killed}.npy.4242.tmp", cache / f".{killed}.json.4242.tmp"]}


def look_alikes(cache: Path) -> dict[Path, bytes]:
    """A user's files named like entries: none holds what aepretrain writes (the .npy has no index or lock of
    aepretrain's beside it, though it is a uint8 image array), so all must stay."""
    (cache / f"invoice-{KEY}.json").write_text(json.dumps({"format": 2, "total": 42, "rows": [1, 2]}))
    np.savez(cache / f"backup-{KEY}.npz", images=np.ones((2, 8, 8, 3), np.uint8), labels=np.ones(2))
    np.save(cache / f"photos-{KEY}.npy", np.ones((2, 8, 8, 3), np.uint8))
    (cache / f"notes-{KEY}.lock").write_text("my notes")
    (cache / f".draft-{KEY}.npy.12.tmp").write_text("a draft")
    (cache / f".draft-{KEY}.json.12.tmp").write_text('{"format": 3}')
    return {path: path.read_bytes() for path in cache.iterdir() if KEY in path.name}


def test_clear_deletes_only_entries_that_carry_aepretrains_mark(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    _, npy, _ = build(tmp_path, capsys)
    cache = npy.parent
    older = older_entries(cache)
    users = look_alikes(cache)
    listed = json.loads(cache_cli("list", "--dir", str(cache), "--json", capsys=capsys))["entries"]
    assert [(row["entry"], row["images"], row["state"]) for row in listed] == [
        (f"folder-all-16-{npy.stem[-20:]}", 12, "ready"), (f"folder-all-8-{'1' * 20}", None, "old format"),
        (f"folder-all-8-{'2' * 20}", 1, "old format"), (f"folder-all-8-{'4' * 20}", None, "unfinished")]
    assert sorted(map(Path, listed[3]["files"])) == sorted(older["killed"])
    assert npy.with_suffix(".json").read_bytes().startswith(b'{"aepretrain": "')  # the mark, first

    out = cache_cli("clear", "--dir", str(cache), capsys=capsys)
    assert out.startswith(f"removed 4 entries from {cache}, ")
    assert {path: path.read_bytes() for path in cache.iterdir()} == users  # the user's, byte for byte; ours, gone


def test_verify_finds_a_same_size_change_below_the_file_system(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A change the file system did not see (a bad disk block, a write to the device): size, times and inode are
    those recorded. Only reading every image finds it: `cache verify`."""
    args, npy, pixels = build(tmp_path, capsys)
    assert cache_cli("verify", "--dir", str(npy.parent), capsys=capsys).splitlines() == [
        f"{npy.parent}: checked 1 entry: 1 ok, 0 removed, 0 kept", f"  ok       {npy.stem}, 12 images"]
    flip_a_byte_keeping_size_and_times(npy)
    index = npy.with_suffix(".json")
    stat = npy.stat()
    index.write_text(json.dumps(json.loads(index.read_text()) | {
        "stat": [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns]}))
    assert "ready" in cache_cli("list", "--dir", str(npy.parent), capsys=capsys)  # list reads headers only

    found = json.loads(cache_cli("verify", "--dir", str(npy.parent), "--json", capsys=capsys))["entries"]
    assert found == [{"entry": npy.stem, "images": 12, "outcome": "removed",
                      "reason": "row 11 does not match its checksum"}]
    assert sorted(p.name for p in npy.parent.iterdir()) == []  # removed: the next run builds it again
    assert main(args) == 0
    assert len(STORED.findall(capsys.readouterr().err)) == 1 and np.array_equal(np.load(npy), pixels)


def test_a_same_size_change_with_its_time_set_back_is_noticed_on_the_next_use(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The change time moves on every write, and no one can set it back: the next use checks every image."""
    args, npy, pixels = build(tmp_path, capsys)
    flip_a_byte_keeping_size_and_times(npy)
    assert main(args) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"aepretrain: the cached data store {npy} is damaged (row 11 does not match its checksum); " \
                     "rebuilding it" and STORED.match(err[1]) and len(err) == 2
    assert np.array_equal(np.load(npy), pixels)  # the changed pixels were not served: rebuilt from the photos

    flip_a_byte_keeping_size_and_times(npy)
    out = cache_cli("verify", "--dir", str(npy.parent), capsys=capsys).splitlines()
    assert out == [f"{npy.parent}: checked 1 entry: 0 ok, 1 removed, 0 kept",
                   f"  removed  {npy.stem}: row 11 does not match its checksum; the next run that uses it builds it "
                   "again"]


@pytest.mark.parametrize("garble", [(60, b"(9, 9, 9, 9, 9, 9)"), (10, b"{'descr': '<f8',"), (0, b"\x00NUMPY")],
                         ids=["an unclosed tuple", "another dtype", "no magic"])
def test_a_garbled_npy_header_is_one_line_and_rebuilt(garble: tuple[int, bytes], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    args, npy, pixels = build(tmp_path, capsys)
    at, text = garble

    def damage() -> None:
        with open(npy, "r+b") as f:
            f.seek(at)
            f.write(text)

    damage()
    assert main(args) == 0  # a traceback here (any exception) fails the test
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith(f"aepretrain: the cached data store {npy} is damaged (its pixel file")
    assert err[0].endswith("; rebuilding it") and np.array_equal(np.load(npy), pixels)
    assert main(args) == 0 and capsys.readouterr().err == ""  # every later command maps it as it is

    damage()
    listed = json.loads(cache_cli("list", "--dir", str(npy.parent), "--json", capsys=capsys))["entries"]
    assert [(row["entry"], row["state"]) for row in listed] == [(npy.stem, "damaged")]
    [row] = json.loads(cache_cli("verify", "--dir", str(npy.parent), "--json", capsys=capsys))["entries"]
    assert row["outcome"] == "removed" and row["reason"].startswith("its pixel file") and not npy.exists()


def test_links_and_folders_named_like_entries_are_left_alone(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    _, npy, _ = build(tmp_path, capsys)
    cache = npy.parent
    (cache / f"gone-{KEY}.npy").symlink_to(tmp_path / "nowhere")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(npy.with_suffix(".json"), elsewhere / "index.json")  # an aepretrain index, reached by a link
    (cache / f"linked-{KEY}.json").symlink_to(elsewhere / "index.json")
    (cache / f"x-{KEY}.npy").mkdir()
    (cache / f"x-{KEY}.npy" / "mine.txt").write_text("keep")
    for action in ("list", "verify"):
        out = cache_cli(action, "--dir", str(cache), capsys=capsys)
        assert "1 entry" in out and KEY not in out
    assert cache_cli("clear", "--dir", str(cache), capsys=capsys).startswith(f"removed 1 entry from {cache}")
    assert sorted(p.name for p in cache.iterdir()) == [f"gone-{KEY}.npy", f"linked-{KEY}.json", f"x-{KEY}.npy"]
    assert (cache / f"x-{KEY}.npy" / "mine.txt").read_text() == "keep" and (elsewhere / "index.json").is_file()


def read_only(cache: Path, command: str) -> subprocess.CompletedProcess:
    """``command`` with ``cache`` mounted read-only, in a mount namespace of its own (nothing leaks)."""
    return subprocess.run(["unshare", "--mount", "sh", "-c", f"mount --bind -o ro {cache} {cache} && {command}"],
                          capture_output=True, text=True, timeout=120)


def test_clear_and_verify_in_a_read_only_cache_are_one_line(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    _, npy, _ = build(tmp_path, capsys)
    cache, files = npy.parent, sorted(p.name for p in npy.parent.iterdir())
    if shutil.which("unshare") is None or read_only(cache, f"! touch {cache}/x").returncode != 0:
        pytest.skip("no read-only bind mount here: it needs unshare and the right to mount (root)")
    for action in ("clear", "verify"):
        done = read_only(cache, f"exec {sys.executable} -m aepretrain cache {action} --dir {cache}")
        assert done.returncode == 2 and done.stderr == f"aepretrain: error: cannot open {npy.with_suffix('.lock')}: " \
            "Read-only file system (0 entries of the cache removed before it)\n"
    assert sorted(p.name for p in cache.iterdir()) == files


def test_a_file_that_cannot_be_deleted_is_one_line_naming_it(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """An immutable file (chattr +i): not even root may delete it."""
    _, npy, _ = build(tmp_path, capsys)
    if subprocess.run(["chattr", "+i", str(npy)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is refused here (not root, or a file system without the immutable flag)")
    try:
        assert main(["cache", "clear", "--dir", str(npy.parent)]) == 2
        one_line_error(capsys, f"cannot delete {npy}: Operation not permitted "
                               "(0 entries of the cache removed before it)")
        assert npy.with_suffix(".json").is_file()  # the index goes last: what is left is still known as aepretrain's
        assert "ready" in cache_cli("list", "--dir", str(npy.parent), capsys=capsys)
    finally:
        subprocess.run(["chattr", "-i", str(npy)], check=True)
