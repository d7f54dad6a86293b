"""A real `aepretrain serve` in a subprocess, and headless Chromium driven over the DevTools protocol.

Chromium speaks the protocol on a pipe (``--remote-debugging-pipe``: commands in on fd 3, answers out on
fd 4, each message JSON ending in a NUL byte), so no WebSocket client and no driver download is needed.

The README's screenshot is made with it:

    python -m tests.browser --checkpoint runs/pets/checkpoints/classifier-pretrained.safetensors \\
        --image ../shared/data/oxford-pets-sample/images/Bengal_105.jpg --out docs/serve.png
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextmanager
def served(checkpoint: Path, *flags: str, cwd: Path | None = None, env: dict[str, str] | None = None,
           timeout: float = 180) -> Iterator[str]:
    """`aepretrain serve --port 0` on 127.0.0.1 until the block ends; yields the page's URL."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen([sys.executable, "-m", "aepretrain", "serve", "--checkpoint", str(checkpoint),
                                 "--port", "0", *flags], stdout=subprocess.PIPE, stderr=log, text=True, cwd=cwd,
                                env=None if env is None else {**os.environ, **env})
        try:
            ready, _, _ = select.select([proc.stdout], [], [], timeout)
            line = proc.stdout.readline() if ready else ""
            if "http://" not in line:
                log.seek(0)
                raise RuntimeError(f"aepretrain serve did not start: {line}{log.read()[-2000:]}")
            yield line.split(" at ")[1].split()[0]
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Chromium:
    """Headless Chromium with one page, driven by DevTools protocol commands over a pipe."""

    def __init__(self, width: int = 1100, height: int = 780, timeout: float = 60) -> None:
        if CHROMIUM is None:
            raise RuntimeError("chromium is not installed")
        self.timeout, self.next_id, self.buffer, self.events = timeout, 0, b"", []
        self.profile = tempfile.TemporaryDirectory(prefix="aepretrain-chromium-")
        commands_r, self.commands = os.pipe()
        self.answers, answers_w = os.pipe()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--remote-debugging-pipe",
                 f"--user-data-dir={self.profile.name}", f"--window-size={width},{height}", "about:blank"]
        # bash puts the pipe ends where Chromium looks for them, fd 3 and fd 4 (dash takes one-digit fds only)
        self.proc = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{commands_r} 4>&{answers_w}', CHROMIUM, *flags],
                                     pass_fds=(commands_r, answers_w), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(commands_r)
        os.close(answers_w)
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *_: Any) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        finally:
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            os.close(self.commands)
            os.close(self.answers)
            self.profile.cleanup()

    def _message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            ready, _, _ = select.select([self.answers], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self.answers, 1 << 20) if ready else b""
            if not chunk:
                raise RuntimeError("Chromium closed the pipe" if ready else "Chromium did not answer in time")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        command = {"id": self.next_id, "method": method, "params": params}
        if session:
            command["sessionId"] = self.session
        os.write(self.commands, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._message(deadline)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    def wait_event(self, method: str) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        while True:
            for event in self.events:
                if event.get("method") == method:
                    self.events.remove(event)
                    return event
            self.events.append(self._message(deadline))

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)["result"].get("value")

    def choose_file(self, selector: str, path: Path) -> None:
        """What picking a file in the page's file input does (it fires the input's change event)."""
        root = self.call("DOM.getDocument", session=True)["root"]["nodeId"]
        node = self.call("DOM.querySelector", session=True, nodeId=root, selector=selector)["nodeId"]
        self.call("DOM.setFileInputFiles", session=True, nodeId=node, files=[str(Path(path).resolve())])

    def wait_for(self, expression: str, seconds: float | None = None) -> Any:
        """Polls ``expression`` until it is truthy; returns its value."""
        deadline = time.monotonic() + (seconds or self.timeout)
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.1)
        raise RuntimeError(f"the page never made this true: {expression}")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", session=True, format="png")["data"]))


def main() -> None:
    parser = argparse.ArgumentParser(description="screenshot of `aepretrain serve` with a prediction on the page")
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--image", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    with served(args.checkpoint) as url, Chromium() as browser:
        browser.open(url)
        browser.choose_file("#file", args.image)
        state = browser.wait_for("document.body.dataset.state !== 'busy' && document.body.dataset.state !== 'ready'"
                                 " && document.body.dataset.state", 120)
        browser.wait_for("[...document.images].every((img) => img.complete)")
        browser.screenshot(args.out)
    print(f"{args.out}: page state {state}")


if __name__ == "__main__":
    main()
