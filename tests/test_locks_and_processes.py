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
    assert main(["cache", "clear", "--dir", str(cache)]) == 0  # a link is no entry of aepretrain's: left alone
    assert "removed 0 entries" in capsys.readouterr().out
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


# 5. decoding workers die with a killed build; the next one takes its locks over


def slow_photos(root: Path, per_class: int = 32) -> Path:
    """Two classes of one 1500x1500 PNG, hard-linked: tiny on disk, a tenth of a second each to decode, so that a
    build runs its worker pool (2 x 32 files at least) for a few seconds."""
    pixels = np.zeros((1500, 1500, 3), np.uint8)
    pixels[::7, :, 0] = 200
    root.mkdir()
    Image.fromarray(pixels).save(root / "one.png")
    for name in ("cat", "dog"):
        (root / name).mkdir()
        for i in range(per_class):
            os.link(root / "one.png", root / name / f"{i}.png")
    (root / "one.png").unlink()
    return root


def _state(pid: int) -> tuple[str, int] | None:
    """(state, parent) of a live process; None for one that is gone (a zombie too: it only waits to be reaped)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else (fields[0], int(fields[1]))


def children(pid: int) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and (_state(int(p)) or ("", 0))[1] == pid]


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if _state(pid) is not None]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: the store is decoded without workers")
@pytest.mark.parametrize("command, kill", [("run", signal.SIGKILL), ("data", signal.SIGTERM)])
def test_a_killed_build_leaves_no_worker_and_the_next_run_takes_its_locks(
        command: str, kill: signal.Signals, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cache, out, root = tmp_path / "cache", tmp_path / "run", slow_photos(tmp_path / "root")
    monkeypatch.setenv("AEPRETRAIN_CACHE", str(cache))
    if command == "run":
        args = ["run", "--out", str(out), *tiny("data.dataset=folder", f"data.root={root}", "finetune.epochs=1",
                                                "probe.enabled=false")]
        again = [*args, "--resume"]  # killed while its data was prepared: no settings were saved yet
    else:
        args = again = ["data", "--dataset", "folder", "--root", str(root), "--image-size", "16", "--out", str(out)]
    with open(tmp_path / "stderr.txt", "w") as stderr:  # not a pipe: a worker left behind would hold it open
        build = subprocess.Popen([sys.executable, "-m", "aepretrain", *args], stdout=subprocess.DEVNULL,
                                 stderr=stderr, start_new_session=True)
    try:
        deadline = time.time() + 240
        while len(children(build.pid)) < 2 and build.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        workers = children(build.pid)
        assert len(workers) >= 2 and not list(cache.glob("*.json")), "no worker pool seen: killed too late?"
        os.kill(build.pid, kill)  # the parent only, as `kill PID` does
        build.wait(timeout=60)
        deadline = time.time() + 5
        while alive(workers) and time.time() < deadline:
            time.sleep(0.05)
        assert not alive(workers), f"the decoding workers {alive(workers)} outlived their parent"
    finally:
        with suppress(ProcessLookupError):  # whatever is left of its session, so that a failure leaves nothing
            os.killpg(build.pid, signal.SIGKILL)
    [lock] = cache.glob("*.lock")
    if kill == signal.SIGTERM:  # it cleaned up on the way out and let go of its lock: nothing to take over
        assert build.returncode == 128 + signal.SIGTERM and (tmp_path / "stderr.txt").read_text().splitlines()[-1] \
            == "aepretrain: interrupted"  # `data` has no run folder to resume
        took_over = []
    else:
        took_over = [f"aepretrain: took over the lock {out / LOCK}, left by process {build.pid}, which is gone",
                     f"aepretrain: took over the lock {lock}, left by process {build.pid} on {os.uname().nodename}, "
                     "which is gone"]
    capsys.readouterr()
    assert main(again) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("aepretrain: took over ")] == took_over, err
    [index] = cache.glob("folder-all-16-*.json")  # the store was built whole this time (--quiet hides its line)
    assert len(json.loads(index.read_text())["rows"]) == 64 and lock.read_text() == ""
    if command == "run":
        assert (out / "metrics.json").is_file() and (out / LOCK).read_text() == ""


# 9. a download stops at the archive's size and leaves no partial file


class Mirror(http.server.ThreadingHTTPServer):
    """A mirror that sends ``body`` bytes of zeros, or fewer if ``seconds`` pass first, in blocks of ``block``
    bytes one every ``pause`` seconds, saying no length: a body far longer than expected is, to the client, one
    without end. It counts what it sent."""

    def __init__(self, body: int, block: int = 1 << 16, pause: float = 0.0, seconds: float = 30.0) -> None:
        super().__init__(("127.0.0.1", 0), MirrorHandler)
        self.body, self.block, self.pause, self.seconds, self.sent = body, block, pause, seconds, 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # no length said: the body ends when the connection does
    server: Mirror

    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        ends = time.time() + self.server.seconds
        try:
            while self.server.sent < self.server.body and time.time() < ends:
                block = min(self.server.block, self.server.body - self.server.sent)
                self.wfile.write(b"\0" * block)
                self.server.sent += block
                time.sleep(self.server.pause)
        except OSError:  # the client hung up
            pass

    def log_message(self, format: str, *args: object) -> None:
        pass


def serving(mirror: Mirror) -> Iterator[Mirror]:
    thread = threading.Thread(target=mirror.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield mirror
    finally:
        mirror.shutdown()
        mirror.server_close()
        thread.join()


@pytest.fixture
def endless() -> Iterator[Mirror]:
    yield from serving(Mirror(64 << 20, seconds=20))


@pytest.fixture
def trickle() -> Iterator[Mirror]:
    yield from serving(Mirror(64 << 20, pause=0.05, seconds=60))


@pytest.fixture
def short() -> Iterator[Mirror]:
    yield from serving(Mirror(300_000))


def test_a_mirror_that_never_ends_is_cut_off_at_the_archives_size(endless: Mirror, tmp_path: Path) -> None:
    started = time.time()
    with pytest.raises(UserError) as raised:
        download_oxford_pets(tmp_path / "pets", endless.url, {"images.tar.gz": ("0" * 32, 1_000_000)}, progress=False)
    assert str(raised.value) == (f"{endless.url}images.tar.gz sent more than the 1000000 bytes of images.tar.gz: "
                                 f"stopped there and removed {tmp_path / 'pets' / 'images.tar.gz.part'} "
                                 "(a wrong mirror? try another --url)")
    assert time.time() - started < 10 and endless.sent < 16 << 20, "it read on past the size"
    assert list((tmp_path / "pets").iterdir()) == []


def test_a_mirror_that_sends_too_little_is_said_so(short: Mirror, tmp_path: Path) -> None:
    with pytest.raises(UserError) as raised:
        download_oxford_pets(tmp_path / "pets", short.url, {"images.tar.gz": ("0" * 32, 1_000_000)}, progress=False)
    assert str(raised.value) == (f"download of {short.url}images.tar.gz ended after 300000 of the 1000000 bytes of "
                                 "images.tar.gz (the file was removed; try again)")
    assert list((tmp_path / "pets").iterdir()) == []


def test_sigterm_during_a_download_removes_the_partial_file(trickle: Mirror, tmp_path: Path) -> None:
    root = tmp_path / "pets"
    part = root / "images.tar.gz.part"
    download = subprocess.Popen([sys.executable, "-m", "aepretrain", "download", "--root", str(root),
                                 "--url", trickle.url], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while not (part.is_file() and part.stat().st_size) and download.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert part.is_file() and part.stat().st_size, "no partial download seen"
        download.send_signal(signal.SIGTERM)
        err = download.communicate(timeout=60)[1]
    finally:
        download.kill()
    assert download.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    assert err.splitlines()[-1] == "aepretrain: interrupted"
    assert list(root.iterdir()) == []
