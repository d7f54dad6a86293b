"""`aepretrain serve` under hostile conditions: its numbers, a checkpoint replaced while serving, a damaged stage,
parallel uploads, idle connections, and stopping with uploads in flight. Real servers on 127.0.0.1 only."""

from __future__ import annotations

import io
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aepretrain.cli import main

from .test_hostile import one_line_error
from .test_serve import checkpoint, good_photo, png, post

pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'aepretrain[serve]'")

from aepretrain import serve as serve_module  # noqa: E402  (needs the serve extra)


@contextmanager
def serving(model: Path, tmp: Path | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """`aepretrain serve --port 0` in a subprocess (its temporary folder ``tmp``): (the process, the page's URL).
    Its stderr stays readable: after the block, ``proc.stderr.read()``."""
    env = {**os.environ, **({"TMPDIR": str(tmp)} if tmp else {})}
    proc = subprocess.Popen([sys.executable, "-m", "aepretrain", "serve", "--checkpoint", str(model), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 180)
        line = proc.stdout.readline() if ready else ""
        if "http://" not in line:
            proc.kill()
            raise RuntimeError(f"aepretrain serve did not start: {line}{proc.stderr.read()[-2000:]}")
        yield proc, line.split(" at ")[1].split()[0]
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run / "checkpoints", to / "checkpoints", ignore=shutil.ignore_patterns("resume"))
    return to


def gradient_png(side: int) -> bytes:
    """A real image that takes a while to decode (side x side RGB) yet is small to send."""
    ramp = np.add.outer(np.arange(side) % 256, np.arange(side) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.stack([ramp, ramp.T, ramp[::-1]], -1)).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def port_of(url: str) -> int:
    return int(url.rstrip("/").rsplit(":", 1)[1])


# item 12, 15: every number of serve refused in one line, before anything listens (the taken port would say so)
@pytest.mark.parametrize("flag, value, words", [
    ("--max-pixels", "0", "--max-pixels must be above 0, not 0"),
    ("--max-pixels", "-5", "--max-pixels must be above 0, not -5"),
    ("--max-upload-mb", "inf", "--max-upload-mb must be a number of megabytes above 0, not inf"),
    ("--max-upload-mb", "nan", "--max-upload-mb must be a number of megabytes above 0, not nan"),
    ("--max-upload-mb", "-1", "--max-upload-mb must be a number of megabytes above 0, not -1"),
    ("--max-upload-mb", "0", "--max-upload-mb must be a number of megabytes above 0, not 0"),
    ("--top-k", "0", "--top-k must lie in [1, 1000], got 0"),
    ("--port", "-1", "--port is 0 (any free port) to 65535, not -1"),
])
def test_serve_numbers_out_of_range_are_one_line(small_run: Path, capsys: pytest.CaptureFixture[str],
                                                 flag: str, value: str, words: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = "-1" if flag == "--port" else str(taken.getsockname()[1])
        args = ["serve", "--checkpoint", str(checkpoint(small_run)), "--port", port]
        assert main(args + ([] if flag == "--port" else [flag, value])) == 2
    assert one_line_error(capsys, words) == f"aepretrain: error: {words}\n"


# item 6: the weights are in memory; the file changed or cut short under the server changes nothing
def test_replacing_the_checkpoint_while_serving_changes_no_answer(small_run: Path, tmp_path: Path) -> None:
    model = checkpoint(copy_run(small_run, tmp_path / "run"))
    size = model.stat().st_size
    with serving(model, tmp_path) as (proc, url):
        first = post(url, good_photo())
        with open(model, "r+b") as f:  # other bytes in place, as a copy over the file does
            f.write(bytes(size))
        assert post(url, good_photo()) == first
        with open(model, "r+b") as f:  # cut short: reading a mapped page past the end is a bus error
            f.truncate(0)
        assert post(url, good_photo()) == first
        assert first[0] == 200 and proc.poll() is None
        proc.terminate()
        assert proc.wait(40) == 128 + signal.SIGTERM  # the CLI takes SIGTERM as Ctrl-C: status 143, no traceback
        assert proc.stderr.read() == "aepretrain: interrupted\n"  # and on 127.0.0.1 no warning of being open to
        # the network
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("aepretrain-")]


# item 6: the upload folders of requests in flight are removed when the server is stopped
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGHUP])
def test_stopping_the_server_mid_upload_leaves_no_upload_folder(small_run: Path, tmp_path: Path,
                                                                 stop: signal.Signals) -> None:
    slow = gradient_png(4000)
    answers: list[int] = []
    with serving(checkpoint(small_run), tmp_path) as (proc, url):
        upload = threading.Thread(target=lambda: answers.append(post(url, slow)[0]))
        upload.start()
        deadline = time.monotonic() + 60
        while not any(p.name.startswith("aepretrain-upload-") and any(p.iterdir()) for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline, "the upload never reached its folder"
            time.sleep(0.01)
        proc.send_signal(stop)  # while the upload decodes
        upload.join(120)
        assert proc.wait(60) == 128 + signal.SIGTERM
    assert answers == [200]  # the request in flight finished first
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("aepretrain-")]


# item 16: a damaged stage checkpoint costs its reconstructions only, said in one line
def test_a_damaged_stage_is_left_out_with_one_line(small_run: Path, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    run = copy_run(small_run, tmp_path / "run")
    stage2 = run / "checkpoints" / "pretrain-stage2.safetensors"
    stage2.write_bytes(stage2.read_bytes()[:100])
    analyst = serve_module.Analyst(checkpoint(run))
    assert [stage for stage, _ in analyst.stages] == [1, 3]
    assert caplog.messages == [
        f"aepretrain: warning: serving without the reconstructions of stage 2: {stage2} is not an aepretrain "
        "checkpoint (safetensors): Error while deserializing header: invalid header length"]
    (tmp_path / "photo.png").write_bytes(good_photo())
    assert [r["stage"] for r in analyst(tmp_path / "photo.png", views=True)["reconstructions"]] == [1, 3]


# item 16: a word when the page is open to the network, none on this machine's own address (and the server on
# 127.0.0.1 says nothing: test_replacing_the_checkpoint_while_serving_changes_no_answer)
def test_a_listening_address_other_machines_reach_is_warned_of() -> None:
    assert serve_module.exposure_warning("127.0.0.1") is None and serve_module.exposure_warning("::1") is None
    for address in ("0.0.0.0", "::", "192.168.1.20"):
        assert serve_module.exposure_warning(address) == (
            f"aepretrain: warning: listening on {address}, open to other machines: whoever reaches it can use the "
            "model (no password)")


# item 7: no more uploads decode at once than there are cores, counted in the real decoder on real images
@contextmanager
def in_process(app: object) -> Iterator[str]:
    import uvicorn

    sock = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def memory_kb(field: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(field + ":")).split()[1])


def test_parallel_uploads_decode_one_per_core_at_once(small_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted in the real decoder on real images, and the memory they take against the ceiling README states:
    cores x pixels x 9 bytes (a palette image, the costliest: 1 byte a pixel, then RGBA, then RGB)."""
    from aepretrain.data import images

    decode, lock = images.open_rgb, threading.Lock()
    count = {"now": 0, "most": 0, "calls": 0}

    def counted(*args: object, **kwargs: object) -> object:  # the real decoder, counted
        with lock:
            count["now"] += 1
            count["most"], count["calls"] = max(count["most"], count["now"]), count["calls"] + 1
        try:
            return decode(*args, **kwargs)
        finally:
            with lock:
                count["now"] -= 1

    monkeypatch.setattr(images, "open_rgb", counted)
    side, bound, answers = 3000, serve_module.cpu_cores(), []
    ramp = Image.fromarray(np.add.outer(np.arange(side) % 256, np.arange(side) % 256).astype(np.uint8), "P")
    ramp.putpalette(list(range(256)) * 3)
    slow = png(ramp)  # a second to decode on a 2020 core, 130 kB to send
    with in_process(serve_module.build_app(checkpoint(small_run))) as url:
        uploads = [threading.Thread(target=lambda: answers.append(post(url, slow)[0])) for _ in range(bound + 3)]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) from now
        before = memory_kb("VmRSS")
        for upload in uploads:
            upload.start()
        for upload in uploads:
            upload.join(300)
        grown = (memory_kb("VmHWM") - before) * 1024
    assert answers == [200] * (bound + 3) and count["calls"] == bound + 3
    assert count["most"] <= bound and (count["most"] >= 2 or bound == 1)  # bounded, yet in parallel
    assert grown <= bound * side * side * 9 + 32 * 2**20, f"{grown / 2**20:.0f} MB for {bound} decodes at once"


# item 16: connections that send no whole request head are closed; at most MAX_CONNECTIONS are served at once
def closing_times(socks: list[socket.socket], trickling: list[socket.socket], start: float, until: float
                  ) -> dict[socket.socket, float]:
    """When the server closed each socket, in seconds since ``start``, while the ``trickling`` ones are sent a
    byte a second; a socket still open at ``until`` is left out."""
    closed: dict[socket.socket, float] = {}
    while len(closed) < len(socks) and time.monotonic() < until:
        for sock in (s for s in trickling if s not in closed):
            try:
                sock.sendall(b"X")
            except OSError:
                pass
        tick = time.monotonic() + 1
        while (left := tick - time.monotonic()) > 0 and len(closed) < len(socks):
            for sock in select.select([s for s in socks if s not in closed], [], [], left)[0]:
                try:
                    ended = sock.recv(1 << 16) == b""
                except OSError:
                    ended = True
                if ended:
                    closed[sock] = time.monotonic() - start
    return closed


def test_idle_and_trickling_connections_are_closed_in_time(small_run: Path) -> None:
    limit = serve_module.HEADER_TIMEOUT_S
    with serving(checkpoint(small_run)) as (proc, url):
        address = ("127.0.0.1", port_of(url))
        answered = socket.create_connection(address, timeout=30)  # an answer first, then a head a byte a second
        answered.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answered.recv(12) == b"HTTP/1.1 200"
        while select.select([answered], [], [], 0.5)[0]:
            answered.recv(1 << 16)
        start = time.monotonic()
        idle = [socket.create_connection(address, timeout=30) for _ in range(serve_module.MAX_CONNECTIONS + 6)]
        for sock in idle[::2]:
            sock.sendall(b"GET / HTTP/1.1\r\n")  # half a head, then a byte a second; the other half: nothing
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                beyond_the_limit = response.status
        except urllib.error.HTTPError as exc:
            beyond_the_limit = exc.code
        closed = closing_times([answered, *idle], [answered, *idle[::2]], start, start + limit + 5)
        assert len(closed) == len(idle) + 1, f"{len(idle) + 1 - len(closed)} connections open after {limit + 5} s"
        assert min(closed[sock] for sock in idle) > limit - 1  # not before the stated time
        assert beyond_the_limit == 503  # while they were held
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200
        for sock in [answered, *idle]:
            sock.close()
