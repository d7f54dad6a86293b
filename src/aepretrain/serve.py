"""A local web page and a JSON endpoint over a classifier checkpoint (Starlette on uvicorn).

    GET  /          the page: drop or pick an image, see the top-k classes as bars, the image as the network
                    sees it and each autoencoder stage's reconstruction (when the run folder has the stages);
                    everything it needs is in the page, so it works offline
    POST /predict   multipart/form-data with the image in the field ``file``
                    -> {"top": [{"class": ..., "probability": ...}, ...], "image_size": S}
                    ``?views=1`` adds "input" and "reconstructions": PNG data URLs

Errors are a 4xx with one line of JSON, ``{"error": "..."}``: 400 a request without the field ``file``, 413 an
upload over the size limit, 422 a file that is not a usable image (not an image, damaged, over the pixel limit:
a possible decompression bomb). An upload is copied into a new temporary folder, decoded there by the same
code as ``aepretrain predict`` and deleted with the folder when the answer is ready (also when the server is
stopped: Ctrl-C, SIGTERM or SIGHUP let the requests in flight finish first, for up to SHUTDOWN_GRACE_S seconds).

Limits, so that memory and connections have a ceiling whatever clients send: at most one upload per core is
decoded at once (a decode holds at most about 9 bytes a pixel: under ``max_pixels`` x 9 bytes), at most
MAX_CONNECTIONS connections are served (a request beyond gets 503), and a connection must send a whole request
head within HEADER_TIMEOUT_S seconds of opening or of its last answer, or it is closed. The model is read into
memory whole: the checkpoint file can be replaced while serving.

Usage (``aepretrain serve`` does the second; tests/test_serve.py drives both with a real server and browser)::

    app = build_app("runs/quick/checkpoints/classifier-pretrained.safetensors")  # an ASGI app, for any server
    serve("runs/quick/checkpoints/classifier-pretrained.safetensors", port=8000)  # until Ctrl-C
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .checkpoints import load_autoencoder, load_classifier, read_metadata
from .data.images import DEFAULT_MAX_PIXELS
from .errors import UserError
from .fileio import cpu_cores, first_line
from .prediction import prepare_image, top_k
from .pretrain import reconstruct, stage_path
from .transforms import pixels

HEADER_TIMEOUT_S = 10  # a client that opens a connection and sends no whole request head is dropped after this
KEEP_ALIVE_S = 5  # an idle connection after an answer is closed after this (uvicorn's timeout_keep_alive)
MAX_CONNECTIONS = 64  # served at once (uvicorn's limit_concurrency): uploads spool up to 1 MB each in memory
SHUTDOWN_GRACE_S = 30  # requests in flight when the server is stopped get this long to finish


class UploadTooLarge(Exception):
    """The request body went over the upload limit."""


class Analyst:
    """The classifier of a checkpoint and the autoencoder stages of its run folder, applied to image files."""

    def __init__(self, checkpoint: str | Path, top_k: int = 5, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        checkpoint = Path(checkpoint)
        self.classifier, self.meta = load_classifier(checkpoint)
        self.top_k, self.max_pixels = top_k, max_pixels
        self.size, self.channels = self.meta["image_size"], self.meta["in_channels"]
        self.stages: list[tuple[int, torch.nn.Module]] = []
        run = checkpoint.parent.parent  # a run folder keeps every model in checkpoints/
        for stage in range(1, len(self.meta["config"].model.blocks) + 1):
            path = stage_path(run, stage)
            if not path.is_file():
                continue
            try:  # the stages only draw reconstructions: a damaged one is left out, the classifier still serves
                if read_metadata(path).get("kind") != "autoencoder":
                    continue  # a contrastive objective's stage reconstructs nothing
                autoencoder, _encoder, meta = load_autoencoder(path)
            except UserError as exc:
                logging.getLogger("aepretrain").warning(f"aepretrain: warning: serving without the reconstructions "
                                                        f"of stage {stage}: {first_line(exc)}")
                continue
            if (int(meta["image_size"]), int(meta["in_channels"])) == (self.size, self.channels):
                self.stages.append((stage, autoencoder))
        self.name = checkpoint.name

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "classes": len(self.meta["classes"]), "image_size": self.size,
                "channels": self.channels, "stages": [stage for stage, _ in self.stages], "top_k": self.top_k}

    def __call__(self, path: Path, views: bool) -> dict[str, Any]:
        image = prepare_image(path, self.size, self.channels, self.max_pixels)
        batch = np.stack([image])  # a batch of one, writable (torch warns on read-only arrays)
        answer: dict[str, Any] = {"top": top_k(self.classifier, self.meta["classes"], batch, self.top_k)[0],
                                  "image_size": self.size}
        if views:
            x = pixels(batch)
            with torch.no_grad():
                outputs = reconstruct([autoencoder for _, autoencoder in self.stages], x)
            answer["input"] = png_data_url(image)
            answer["reconstructions"] = [
                {"stage": stage, "image": png_data_url((out[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))}
                for (stage, _), out in zip(self.stages, outputs)]
        return answer


def png_data_url(pixels: np.ndarray) -> str:
    """H x W x C uint8 pixels (C = 1 or 3) as a PNG ``data:`` URL."""
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _require_serve() -> None:
    try:
        import python_multipart  # noqa: F401  (Starlette parses uploads with it)
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise UserError(f"serve needs {exc.name}, which is not installed: pip install 'aepretrain[serve]'") from None


class LimitedBody:
    """An ASGI ``receive`` that raises UploadTooLarge once the body passes ``limit`` bytes, before it is all read."""

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]], limit: int) -> None:
        self.receive, self.limit, self.received, self.finished = receive, limit, 0, False

    async def __call__(self) -> dict[str, Any]:
        message = await self.receive()
        self.received += len(message.get("body", b""))
        self.finished = message["type"] != "http.request" or not message.get("more_body", False)
        if self.received > self.limit:
            raise UploadTooLarge
        return message

    async def drop_rest(self, budget: int) -> None:
        """Read and drop what is left of a refused body, up to ``budget`` bytes more, so that a client still
        sending it reads the answer rather than a reset connection."""
        stop = self.received + budget
        while not self.finished and self.received < stop:
            try:
                await self()
            except UploadTooLarge:
                pass


async def _analyse_upload(upload: Any, analyst: Analyst, views: bool, decoders: Any) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON answer) for the form's file: the analysis, or what is wrong with the upload. At most
    ``decoders`` (an anyio CapacityLimiter) analyses run at once; the others wait, holding no decoded pixels."""
    from anyio.to_thread import run_sync
    from starlette.datastructures import UploadFile

    if not isinstance(upload, UploadFile):
        return 400, {"error": "no image in the form field 'file' (send multipart/form-data)"}
    with tempfile.TemporaryDirectory(prefix="aepretrain-upload-") as folder:
        path = Path(folder) / "upload"
        with open(path, "wb") as f:
            while chunk := await upload.read(1 << 20):
                f.write(chunk)
        try:
            return 200, await run_sync(analyst, path, views, limiter=decoders)
        except UserError as exc:  # not an image, damaged, too many pixels: the user's file, by its name
            return 422, {"error": str(exc).replace(str(path), upload.filename or "the upload")}


def build_app(checkpoint: str | Path, top_k: int = 5, max_upload_mb: float = 20.0,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> Any:
    """The Starlette application: the page at ``/`` and the JSON endpoint at ``/predict``; uploads are decoded
    and analysed one per core at once, at most."""
    _require_serve()
    check_limits(top_k, max_upload_mb, max_pixels)
    from anyio import CapacityLimiter
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    analyst = Analyst(checkpoint, top_k, max_pixels)
    decoders = CapacityLimiter(cpu_cores())  # as many uploads decoded at once as there are cores
    limit = int(max_upload_mb * 1024 * 1024)
    too_large = f"the upload is over the limit of {max_upload_mb:g} MB"
    model = dict(analyst.describe(), max_upload_mb=max_upload_mb)
    page = resources.files(__package__).joinpath("serve.html").read_text(encoding="utf-8")
    page = page.replace("{{MODEL}}", json.dumps(model).replace("<", "\\u003c"))

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": " ".join(message.split())}, status_code=status)

    async def index(_request: Request) -> HTMLResponse:
        return HTMLResponse(page)

    async def predict(request: Request) -> JSONResponse:
        body = LimitedBody(request.receive, limit)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            await body.drop_rest(10 * limit)
            return error(413, too_large)
        views = request.query_params.get("views", "") in ("1", "true")
        try:
            async with Request(request.scope, body).form(max_files=1, max_fields=8) as form:
                status, answer = await _analyse_upload(form.get("file"), analyst, views, decoders)
                return JSONResponse(answer) if status == 200 else error(status, answer["error"])
        except UploadTooLarge:
            await body.drop_rest(10 * limit)
            return error(413, too_large)

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        return error(exc.status_code, str(exc.detail))

    async def server_error(_request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error: {first_line(exc)}")

    return Starlette(routes=[Route("/", index), Route("/predict", predict, methods=["POST"])],
                     exception_handlers={HTTPException: http_error, Exception: server_error})


def check_limits(top_k: int, max_upload_mb: float, max_pixels: int | None) -> None:
    """The server's numbers, each refused in one line unless it is above 0 (and the upload limit finite)."""
    for flag, value in (("--top-k", top_k), ("--max-pixels", max_pixels)):
        if value is not None and not value > 0:
            raise UserError(f"{flag} must be above 0, not {value}")
    if not (math.isfinite(max_upload_mb) and max_upload_mb > 0):
        raise UserError(f"--max-upload-mb must be a number of megabytes above 0, not {max_upload_mb:g}")


def header_deadline_protocol() -> type:
    """uvicorn's HTTP/1.1 protocol (h11) with a deadline for each request head. uvicorn times a connection out
    only after an answer, and every byte restarts that wait, so clients that open connections and send nothing,
    or a byte at a time, would hold them for ever; here each is closed HEADER_TIMEOUT_S seconds after it opened
    or got its last answer unless a whole request head has come in."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        deadline: Any = None  # the asyncio TimerHandle while a request head is awaited

        def wait_for_head(self) -> None:
            self.stop_waiting()
            self.deadline = self.loop.call_later(HEADER_TIMEOUT_S, self.drop_if_no_head)

        def stop_waiting(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def drop_if_no_head(self) -> None:
            self.deadline = None
            if self.conn.their_state is h11.IDLE:
                self.transport.close()

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.wait_for_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is in: the request is being served
                self.stop_waiting()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self.wait_for_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self.stop_waiting()
            super().connection_lost(exc)

    return HeaderDeadline


@contextmanager
def hangup_stops_gracefully() -> Iterator[None]:
    """A closed terminal (SIGHUP) stops the server as SIGTERM does: the requests in flight finish and remove their
    upload folders. Python's default would end the process at once and leave them."""
    if not hasattr(signal, "SIGHUP") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGHUP, lambda _signal, _frame: signal.raise_signal(signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


def exposure_warning(address: str) -> str | None:
    """The warning for a listening address other machines can reach; None for this machine's own (loopback).

    >>> exposure_warning("127.0.0.1") is None and exposure_warning("::1") is None
    True
    >>> exposure_warning("0.0.0.0")[:67]
    'aepretrain: warning: listening on 0.0.0.0, open to other machines: '
    """
    if ipaddress.ip_address(address).is_loopback:
        return None
    return (f"aepretrain: warning: listening on {address}, open to other machines: whoever reaches it can use the "
            "model (no password)")


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, top_k: int = 5,
          max_upload_mb: float = 20.0, max_pixels: int | None = None) -> None:
    """Serve the page until Ctrl-C; port 0 takes a free one. The first line printed is the page's address."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port is 0 (any free port) to 65535, not {port}")
    check_limits(top_k, max_upload_mb, max_pixels)
    _require_serve()
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)  # first: a taken port is said at once
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    with sock:
        app = build_app(checkpoint, top_k, max_upload_mb, DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels)
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        if warning := exposure_warning(sock.getsockname()[0]):
            logging.getLogger("aepretrain").warning(warning)
        print(f"aepretrain: serving {checkpoint} at http://{shown}:{sock.getsockname()[1]}/ (Ctrl-C stops)", flush=True)
        config = uvicorn.Config(app, log_level="warning", http=header_deadline_protocol(),
                                timeout_keep_alive=KEEP_ALIVE_S, limit_concurrency=MAX_CONNECTIONS,
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
        with hangup_stops_gracefully():
            uvicorn.Server(config).run(sockets=[sock])
