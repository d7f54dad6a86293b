"""The on-disk store: splits are views, damaged entries are rebuilt, builds are locked, a full disk is one line,
the cache is listed and cleared, and --pretrain-data never brings in a labelled test image under another name."""

import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from aepretrain.cli import main
from aepretrain.config import resolve
from aepretrain.data import prepare, pretrain_images
from aepretrain.data.base import Labelled
from aepretrain.data.cache import cache_root
from aepretrain.data.store import locked

from .conftest import photo

STORED = re.compile(r"^stored \d+ images of ", re.M)


def folder_of_photos(root: Path, count: int, size: tuple[int, int] = (40, 30)) -> Path:
    root.mkdir(parents=True)
    for i in range(count):
        photo(i, size).save(root / f"{i:04d}.png")
    return root


def data_cli(*args: str, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aepretrain", "data", *args], capture_output=True, text=True,
                          timeout=300, env=env, **kwargs)


def test_a_split_or_subset_copies_no_pixels(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (400, 64, 64, 3), dtype=np.uint8)  # 4.9 MB
    data = Labelled(pixels, np.arange(400) % 4, [str(i) for i in range(400)])
    tracemalloc.start()
    halves = [data.take(np.arange(0, 400, 2)), data.take(np.arange(1, 400, 2))]
    joined = Labelled.concat(halves).take(np.arange(300))
    allocated = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert allocated < 100_000, f"taking and joining subsets allocated {allocated} bytes"
    assert all(part.images.stores[0].pixels is pixels for part in [*halves, joined])
    assert np.array_equal(np.asarray(joined.images), pixels[np.r_[0:400:2, 1:400:2]][:300])

    cfg = resolve("quick", **{"data.dataset": "folder", "data.root": str(folder_of_photos(tmp_path / "f", 30)),
                              "data.image_size": 16})
    bundle = prepare(cfg.data, 0)
    stores = {id(s.images.stores[0]) for s in (bundle.train, bundle.val, bundle.test, bundle.ae)}
    store = bundle.train.images.stores[0].pixels
    assert len(stores) == 1 and isinstance(store, np.memmap) and Path(store.filename).parent == cache_root(None)
    assert len(pickle.dumps(bundle.train.images.stores[0])) < 2_000  # travels to workers as its file name
    assert np.array_equal(pickle.loads(pickle.dumps(bundle.train.images))[3], bundle.train.images[3])


def damage(kind: str, npy: Path) -> None:
    marker = npy.with_suffix(".json")
    if kind == "truncated":
        with open(npy, "r+b") as f:
            f.truncate(npy.stat().st_size // 2)
    elif kind == "flipped bytes":
        time.sleep(0.05)  # a later modification time than the build's, as any real later write has
        with open(npy, "r+b") as f:
            f.seek(npy.stat().st_size - 700)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif kind == "an npz under the name":
        np.savez(npy.with_suffix(".tmp.npz"), images=np.zeros((2, 2), np.uint8))
        os.replace(npy.with_suffix(".tmp.npz"), npy)
    elif kind == "no completeness marker":
        marker.unlink()
    elif kind == "a garbled marker":
        marker.write_bytes(marker.read_bytes()[:40])
    elif kind == "a missing pixel file":
        npy.unlink()


@pytest.mark.parametrize("kind", ["truncated", "flipped bytes", "an npz under the name", "no completeness marker",
                                  "a garbled marker", "a missing pixel file"])
def test_a_damaged_store_is_rebuilt_and_said_in_one_line(kind: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    root = folder_of_photos(tmp_path / "photos", 12)
    args = ["data", "--dataset", "folder", "--root", str(root), "--image-size", "16", "--out", str(tmp_path / "o"),
            "--json", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert len(STORED.findall(first.err)) == 1, first.err
    [npy] = (tmp_path / "cache").glob("*.npy")
    pixels = np.load(npy).copy()
    damage(kind, npy)
    assert main(args) == 0  # an exception other than a UserError would fail the test here, with its traceback
    again = capsys.readouterr()
    said = [line for line in again.err.splitlines() if "is damaged" in line]
    assert len(said) == 1 and said[0].endswith("rebuilding it") and len(STORED.findall(again.err)) == 1
    assert np.array_equal(np.load(npy), pixels)
    assert json.loads(again.out)["counts"] == json.loads(first.out)["counts"]
    assert main(args) == 0
    assert capsys.readouterr().err == ""  # rebuilt whole: mapped as it is


def test_the_digests_written_by_parallel_decoders_match_the_file(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The build is not read back: the digests its decoders computed are the record, so they must match the file.
    A later touch (new time, same bytes) makes every row be checked against them, and nothing is rebuilt."""
    root = folder_of_photos(tmp_path / "photos", 70)  # over two decoding tasks: several worker processes
    args = ["data", "--dataset", "folder", "--root", str(root), "--image-size", "16", "--out", str(tmp_path / "o"),
            "--json", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 0
    assert len(STORED.findall(capsys.readouterr().err)) == 1
    [npy] = (tmp_path / "cache").glob("*.npy")
    os.utime(npy, ns=(npy.stat().st_atime_ns, npy.stat().st_mtime_ns + 10**9))
    assert main(args) == 0
    assert capsys.readouterr().err == ""  # verified row by row, kept: neither damaged nor stored again
    recorded = json.loads(npy.with_suffix(".json").read_text())["stat"]
    assert recorded[1] == npy.stat().st_mtime_ns  # the new time is recorded: the next run checks nothing


def test_a_build_killed_midway_leaves_nothing_that_is_trusted(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    root = folder_of_photos(tmp_path / "photos", 300, size=(400, 300))
    cache = tmp_path / "cache"
    env = dict(os.environ, AEPRETRAIN_CACHE=str(cache))
    args = ["--dataset", "folder", "--root", str(root), "--image-size", "64", "--out", str(tmp_path / "o")]
    build = subprocess.Popen([sys.executable, "-m", "aepretrain", "data", *args], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not list(cache.glob(".*.tmp")) and build.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(build.pid, signal.SIGKILL)  # the decoding workers too
    build.wait()
    assert list(cache.glob(".*.tmp")) and not list(cache.glob("*.json")), "killed too late: the build finished"
    assert main(["data", *args, "--set", f"data.cache_dir={cache}"]) == 0
    err = capsys.readouterr().err
    assert len(STORED.findall(err)) == 1 and "damaged" not in err
    assert not list(cache.glob(".*.tmp")), "the killed build's temporary file was left"


def test_a_full_disk_while_building_is_one_line_and_the_previous_store_stays_usable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """RLIMIT_FSIZE makes the kernel refuse writes past a size: a real write failure, no mock."""
    root = folder_of_photos(tmp_path / "photos", 40)
    env = dict(os.environ, AEPRETRAIN_CACHE=str(tmp_path / "cache"))
    args = ["--dataset", "folder", "--root", str(root), "--image-size", "32", "--out", str(tmp_path / "o")]
    prepare(resolve("quick", **{"data.dataset": "folder", "data.root": str(root), "data.image_size": 32,
                                "data.cache_dir": str(tmp_path / "cache")}).data, 0)
    capsys.readouterr()
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    photo(999).save(root / "new.png")  # another set of files: another store

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    full = data_cli(*args, env=env, preexec_fn=small_disk)
    assert full.returncode == 2 and "Traceback" not in full.stderr
    assert full.stderr.count("\n") == 1 and "cannot write the data store folder-all-32" in full.stderr
    assert "File too large" in full.stderr and "GB are free" in full.stderr and "untouched" in full.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"} == \
        {k: v for k, v in before.items() if not k.endswith(".lock")}, "the failed build left files or changed some"
    (root / "new.png").unlink()
    assert main(["data", *args, "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 0
    assert capsys.readouterr().err == ""  # the previous store, mapped as it is


def test_a_second_process_waits_for_a_build_and_never_reads_it_half_done(tmp_path: Path) -> None:
    root = folder_of_photos(tmp_path / "photos", 20)
    cache = tmp_path / "cache"
    env = dict(os.environ, AEPRETRAIN_CACHE=str(cache))
    args = ["--dataset", "folder", "--root", str(root), "--image-size", "16", "--out", str(tmp_path / "o"), "--json"]
    prepare(resolve("quick", **{"data.dataset": "folder", "data.root": str(root), "data.image_size": 16,
                                "data.cache_dir": str(cache)}).data, 0)
    [npy] = cache.glob("*.npy")
    whole = np.load(npy).copy()
    with locked(npy.with_suffix(".lock"), "test"):  # this process builds it now: the marker is gone, rows half written
        npy.with_suffix(".json").unlink()
        with open(npy, "r+b") as f:
            f.truncate(npy.stat().st_size // 2)
        waiting = subprocess.Popen([sys.executable, "-m", "aepretrain", "data", *args], env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first_line = waiting.stderr.readline()
        assert f"is being built by process {os.getpid()} on " in first_line and "waiting for it" in first_line
        time.sleep(0.5)
        assert waiting.poll() is None, "it did not wait"
    out, err = waiting.communicate(timeout=300)
    assert waiting.returncode == 0 and len(STORED.findall(err)) == 1 and json.loads(out)["counts"]["test"] == 4
    assert np.array_equal(np.load(npy), whole)

    shutil.rmtree(cache)  # two runs at once: one builds, the other waits or finds it built; one store, built once
    runs = [subprocess.Popen([sys.executable, "-m", "aepretrain", "data", *args], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    assert sum(len(STORED.findall(err)) for _, err in results) == 1 and len(list(cache.glob("*.npy"))) == 1


def test_cache_list_and_clear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    cfg = resolve("quick", **{"data.dataset": "folder", "data.root": str(folder_of_photos(tmp_path / "p", 30)),
                              "data.image_size": 16, "data.cache_dir": str(cache)})
    prepare(cfg.data, 0)
    cfg.data.image_size = 32
    prepare(cfg.data, 0)
    (cache / "notes.txt").write_text("not ours")
    (cache / "folder-all-16.npy").write_bytes(b"not ours either: no key")
    older = cache / f"folder-all-8-{'0' * 20}"  # an older aepretrain's store: no longer read, still listed
    older.with_suffix(".npy").write_bytes(b"\0" * 192)
    older.with_suffix(".json").write_text(json.dumps({"format": 2, "shape": [1, 8, 8, 3], "rows": [0], "labels": [0],
                                                      "names": ["a"], "digests": ["0" * 16], "skipped": [],
                                                      "stat": [192, 0, 0], "source": "elsewhere"}))
    capsys.readouterr()
    assert main(["cache", "list", "--dir", str(cache), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["entries"]
    assert [(r["entry"][:13], r["images"], r["state"]) for r in listed] == [
        ("folder-all-16", 30, "ready"), ("folder-all-32", 30, "ready"), ("folder-all-8-", 1, "old format")]
    assert listed[1]["bytes"] >= 30 * 32 * 32 * 3 and listed[1]["source"] == str(tmp_path / "p")
    assert main(["cache", "list", "--dir", str(cache)]) == 0
    assert "3 entries" in capsys.readouterr().out
    with locked(cache / f"{listed[0]['entry']}.lock", "test"):
        assert main(["cache", "clear", "--dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "removed 2 entries" in out and f"kept {listed[0]['entry']}: another process is building it" in out
    assert sorted(p.name for p in cache.iterdir() if not p.name.startswith(listed[0]["entry"])) == \
        ["folder-all-16.npy", "notes.txt"]


def spellings(root: Path, tmp_path: Path) -> dict[str, tuple[str, str]]:
    (tmp_path / "link").symlink_to(root)
    shutil.copytree(root, tmp_path / "copy")
    return {"trailing slash": ("oxford-pets", f"{root}/"), "symbolic link": ("oxford-pets", str(tmp_path / "link")),
            "relative path": ("oxford-pets", os.path.relpath(root)), "a copy": ("oxford-pets", str(tmp_path / "copy")),
            "its images as a folder": ("folder", str(root / "images"))}


def test_pretrain_data_never_brings_a_labelled_test_image_under_another_spelling(tiny_pets: Path,
                                                                                tmp_path: Path) -> None:
    base = {"data.dataset": "oxford-pets", "data.root": str(tiny_pets), "data.image_size": 16}
    bundle = prepare(resolve("quick", **base).data, 0)
    test = set(bundle.test.images.digests().tolist())
    assert len(test) == len(bundle.test) == 6
    for spelling, (dataset, root) in spellings(tiny_pets, tmp_path).items():
        cfg = resolve("quick", **base, **{"pretrain.dataset": dataset, "pretrain.root": root})
        images, val, what = pretrain_images(cfg, bundle)
        other_files = spelling in ("a copy", "its images as a folder")
        assert not test & set(images.images.digests().tolist()) and not test & set(val.images.digests().tolist())
        # the labelled data set: its train + val, some held out for the validation loss; other files: all but the
        # test split's images
        assert len(images) + (0 if other_files else len(val)) == len(bundle.train) + len(bundle.val) == 12, spelling
        assert what.endswith("; no labelled test image"), spelling
        assert ("identical to labelled test images left out" in what) == other_files, spelling
    cfg = resolve("quick", **base, **{"pretrain.dataset": "folder", "pretrain.root": str(tmp_path / "copy" / "images"),
                                      "pretrain.include_test": True})
    images, _, what = pretrain_images(cfg, bundle)
    assert len(images) == 18 + 6 and "plus the 6 labelled test images" in what


def test_pretrain_data_uses_all_its_images_unless_pretrain_fraction_says_otherwise(tmp_path: Path) -> None:
    photos = folder_of_photos(tmp_path / "unlabelled", 30)
    base = {"data.dataset": "synthetic", "data.image_size": 16, "pretrain.dataset": "folder",
            "pretrain.root": str(photos)}
    cfg = resolve("quick", **base)
    bundle = prepare(cfg.data, 0)
    images, _, what = pretrain_images(cfg, bundle)
    assert len(images) == 30 and "100% of its 30 images" in what and "unlabelled" in what
    images, _, what = pretrain_images(resolve("quick", **base, **{"pretrain.fraction": 0.5}), bundle)
    assert len(images) == 15 and "50% of its 30 images" in what
    assert main(["data", "--dataset", "synthetic", "--set", "pretrain.fraction=0"]) == 2
