"""`aepretrain serve`: a real server on 127.0.0.1, real uploads, and the page in headless Chromium."""

import base64
import http.client
import io
import json
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aepretrain.cli import main
from aepretrain.prediction import prepare_image, predict

from .browser import CHROMIUM, Chromium, served
from .conftest import PETS_SAMPLE, photo

pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install 'aepretrain[serve]'")


def checkpoint(run: Path) -> Path:
    return run / "checkpoints" / "classifier-pretrained.safetensors"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The server's working folder and temporary folder, watched for what uploads leave behind."""
    return {name: tmp_path_factory.mktemp(name) for name in ("cwd", "tmp")}


@pytest.fixture(scope="module")
def url(small_run: Path, folders: dict[str, Path]) -> Iterator[str]:
    with served(checkpoint(small_run), "--top-k", "3", "--max-upload-mb", "1", "--max-pixels", "1000000",
                cwd=folders["cwd"], env={"TMPDIR": str(folders["tmp"])}) as address:
        yield address


def post(url: str, content: bytes, filename: str = "image.png", field: str = "file",
         query: str = "") -> tuple[int, bytes]:
    boundary = "aepretrain-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "predict" + query, data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def good_photo() -> bytes:
    return png(photo(5, size=(300, 200)))


def assert_one_line_error(status: int, body: bytes, expected_status: int, words: str) -> None:
    assert status == expected_status, body
    assert b"\n" not in body.strip() and set(json.loads(body)) == {"error"}
    assert words in json.loads(body)["error"]


def test_predict_answers_as_the_predict_command(url: str, small_run: Path, tmp_path: Path) -> None:
    status, body = post(url, good_photo(), "cat.png")
    assert status == 200
    answer = json.loads(body)
    (tmp_path / "cat.png").write_bytes(good_photo())
    expected = predict([tmp_path / "cat.png"], checkpoint(small_run), 3)[0]["top"]
    assert [t["class"] for t in answer["top"]] == [t["class"] for t in expected]
    assert [t["probability"] for t in answer["top"]] == pytest.approx([t["probability"] for t in expected], abs=1e-9)
    assert answer["image_size"] == 32 and "input" not in answer


def test_views_show_the_input_and_each_stage(url: str, tmp_path: Path) -> None:
    status, body = post(url, good_photo(), query="?views=1")
    answer = json.loads(body)
    assert status == 200 and [r["stage"] for r in answer["reconstructions"]] == [1, 2, 3]
    for data_url in [answer["input"]] + [r["image"] for r in answer["reconstructions"]]:
        assert data_url.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
        assert image.size == (32, 32)
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["input"].split(",", 1)[1]))))
    (tmp_path / "photo.png").write_bytes(good_photo())
    assert np.array_equal(seen, prepare_image(tmp_path / "photo.png", 32, 3))  # as the classifier took it


@pytest.mark.parametrize("content, filename, status, words", [
    (b"hello, not an image", "notes.txt", 422, "cannot use notes.txt: not an image"),
    (good_photo()[:300], "cut.png", 422, "cannot use cut.png: damaged image"),
    (png(Image.new("L", (1200, 1000))), "bomb.png", 422, "1200x1000 pixels is over the limit of 1000000"),
    (np.random.default_rng(0).bytes(1_200_000), "big.jpg", 413, "over the limit of 1 MB"),
])
def test_a_bad_upload_gets_a_4xx_and_the_next_request_succeeds(url: str, content: bytes, filename: str,
                                                                status: int, words: str) -> None:
    assert_one_line_error(*post(url, content, filename), status, words)
    assert post(url, good_photo())[0] == 200


def test_requests_without_an_image_or_over_the_limit_unannounced(url: str) -> None:
    assert_one_line_error(*post(url, good_photo(), field="picture"), 400, "no image in the form field 'file'")
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jpg\"\r\n\r\n"
            + bytes(1_200_000) + b"\r\n--b--\r\n")
    connection.request("POST", "/predict", body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                       headers={"Content-Type": "multipart/form-data; boundary=b"}, encode_chunked=True)
    response = connection.getresponse()  # no Content-Length: the limit holds while the body streams in
    assert_one_line_error(response.status, response.read(), 413, "over the limit of 1 MB")
    connection.close()
    assert post(url, good_photo())[0] == 200


def test_the_page_works_offline(url: str) -> None:
    with urllib.request.urlopen(url, timeout=60) as response:
        page = response.read().decode()
    assert '<input id="file" type="file"' in page and '"image_size": 32' in page
    assert "http://" not in page and "https://" not in page and "//cdn" not in page  # nothing from outside


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed here (Debian: apt-get install chromium; "
                                             ".ci/run installs it): the page is not tried in a real browser")
def test_the_page_in_headless_chromium(url: str, tmp_path: Path) -> None:
    if PETS_SAMPLE.is_dir():
        image = PETS_SAMPLE / "images" / "Bengal_105.jpg"
    else:
        image = tmp_path / "photo.png"
        image.write_bytes(good_photo())
    expected = json.loads(post(url, image.read_bytes())[1])["top"][0]["class"]
    (tmp_path / "notes.txt").write_text("not an image")
    with Chromium() as browser:
        browser.open(url)
        assert "4 classes" in browser.evaluate("document.getElementById('about').textContent")
        browser.choose_file("#file", tmp_path / "notes.txt")
        assert browser.wait_for("document.body.dataset.state === 'error' && "
                                "document.getElementById('status').textContent") == \
            "notes.txt: cannot use notes.txt: not an image (no decoder recognises its content)"
        browser.choose_file("#file", image)
        browser.wait_for("document.body.dataset.state === 'done'")
        assert browser.evaluate("document.querySelector('#top .name').textContent") == expected
        assert browser.evaluate("document.querySelectorAll('#top li').length") == 3
        assert browser.evaluate("document.querySelectorAll('#stages figure').length") == 3
        widths = browser.evaluate("[...document.querySelectorAll('#top .bar span')].map((s) => s.offsetWidth)")
        assert widths == sorted(widths, reverse=True) and widths[0] > 0


def test_uploads_leave_nothing_behind(url: str, folders: dict[str, Path]) -> None:
    assert post(url, good_photo())[0] == 200
    assert list(folders["cwd"].iterdir()) == [] and list(folders["tmp"].iterdir()) == []


def test_serve_refusals_are_one_line(small_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["serve", "--checkpoint", str(checkpoint(small_run)), "--port", "70000"]) == 2
    assert "--port is 0 (any free port) to 65535, not 70000" in capsys.readouterr().err
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = str(taken.getsockname()[1])
        assert main(["serve", "--checkpoint", str(checkpoint(small_run)), "--port", port]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path / "none.safetensors"), "--port", "0"]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as where the extra is not installed
    assert main(["serve", "--checkpoint", str(checkpoint(small_run))]) == 2
    assert capsys.readouterr().err == ("aepretrain: error: serve needs uvicorn, which is not installed: "
                                       "pip install 'aepretrain[serve]'\n")
