"""Tests for the web page's server (app.py, webapp/): form parsing, captions against the Python API, bad
uploads and bad requests answered with messages while the server keeps serving, the request queue, and the
choice of model. test_app_browser.py drives the same page in a real browser."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import pytest
import torch
import urllib3
from helpers import save_model, tiny_config

import app
from models import load_captioner
from models.build import build_captioner
from webapp.forms import FormError, parse_form
from webapp.server import CaptionServer
from webapp.service import BusyError, CaptionService, RequestQueue

SHARED = Path(os.environ.get("OPG_SHARED_DIR", Path(__file__).resolve().parent.parent.parent / "shared"))
PHOTO = SHARED / "real_images" / "COCO_val2014_000000060623.jpg"
MAX_UPLOAD = 1_000_000

pytestmark = pytest.mark.usefixtures("single_thread")


def make_checkpoint(path: Path) -> Path:
    """A tiny random model with a sparse mask that drops some positions (threshold 0.5)."""
    torch.manual_seed(0)
    cfg = tiny_config(**{"decode.beams": 2, "decode.max_len": 8, "decode.min_len": 1, "model.threshold": 0.5})
    model = build_captioner(cfg)
    save_model(path, model, cfg)
    return path


@pytest.fixture(scope="module")
def captioner(tmp_path_factory: pytest.TempPathFactory):
    return load_captioner(make_checkpoint(tmp_path_factory.mktemp("app") / "tiny.pt"), device="cpu")


@pytest.fixture(scope="module")
def url(captioner) -> str:
    service = CaptionService(captioner, "tiny.pt", max_images=5, max_waiting=2)
    server = CaptionServer(("127.0.0.1", 0), service, MAX_UPLOAD)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def post(url: str, fields: dict, content_type: str | None = None, body: bytes | None = None) -> tuple[int, dict]:
    """POST a form (fields: name -> text or (filename, bytes)) to /api/caption: (status, JSON reply)."""
    if body is None:
        body, content_type = urllib3.encode_multipart_formdata(list(fields.items()))
    request = urllib.request.Request(url + "api/caption", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with one tiny IDAT: huge, yet a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_form_parsing_matches_the_urllib3_encoder() -> None:
    binary = bytes(range(256)) * 50 + b"\r\n--\r\n\r\n--x"
    fields = [("method", "beam"), ("images", ("a b.jpg", binary)), ("seed", "7"), ("images", ("ü.txt", b""))]
    body, content_type = urllib3.encode_multipart_formdata(fields)
    uploads, form = parse_form(content_type, body)
    assert uploads == [("a b.jpg", binary), ("ü.txt", b"")]
    assert form == {"method": "beam", "seed": "7"}
    with pytest.raises(FormError, match="no closing boundary"):
        parse_form(content_type, body[: len(body) // 2])
    with pytest.raises(FormError, match="multipart/form-data"):
        parse_form("application/json", b"{}")


def test_captions_and_kept_positions_equal_the_python_api(url, captioner) -> None:
    status, reply = post(url, {"images": (PHOTO.name, PHOTO.read_bytes()), "method": "beam", "beams": "3",
                               "num_captions": "2"})  # fmt: skip
    assert status == 200
    (result,) = reply["results"]
    expected = captioner.caption(PHOTO, beams=3, num_captions=2)[0]
    assert [c["text"] for c in result["captions"]] == [c.text for c in expected]
    assert [c["score"] for c in result["captions"]] == pytest.approx([c.score for c in expected], abs=1e-4)
    assert result["kept"] == captioner.kept_positions(PHOTO)[0].tolist()
    assert 0 < sum(result["kept"]) < len(result["kept"])

    sampling = {"images": (PHOTO.name, PHOTO.read_bytes()), "method": "sample", "num_captions": "3",
                "temperature": "0.8", "top_p": "0.9", "seed": "5"}  # fmt: skip
    expected = captioner.caption(PHOTO, method="sample", num_captions=3, temperature=0.8, top_p=0.9, seed=5)[0]
    assert [c["text"] for c in post(url, sampling)[1]["results"][0]["captions"]] == [c.text for c in expected]

    status, reply = post(url, {"images": (PHOTO.name, PHOTO.read_bytes()), "method": "greedy"})
    assert [c["text"] for c in reply["results"][0]["captions"]] == captioner.caption(PHOTO, method="greedy")


def test_bad_uploads_get_a_message_each_and_good_ones_still_get_captions(url, captioner) -> None:
    photo = PHOTO.read_bytes()
    files = [("notes.txt", b"not an image\n"), ("cut.jpg", photo[: len(photo) // 2]), ("empty.png", b""),
             ("huge.png", png_header_only(12_000, 12_000)), (PHOTO.name, photo)]  # fmt: skip
    body, content_type = urllib3.encode_multipart_formdata([("images", f) for f in files] + [("method", "greedy")])
    status, reply = post(url, {}, content_type, body)
    assert status == 200
    errors = [result.get("error") for result in reply["results"]]
    assert errors[0] == "notes.txt: not a recognised image format (supported: JPEG, PNG, WEBP, BMP, DIB, GIF, TIFF)"
    assert errors[1].startswith("cut.jpg: corrupt or truncated image data")
    assert errors[2] == "empty.png: empty file (0 bytes)"
    assert errors[3].startswith("huge.png: 12000x12000 = 144000000 pixels exceeds the decode limit")
    assert errors[4] is None
    assert reply["results"][4]["captions"][0]["text"] == captioner.caption(PHOTO, method="greedy")[0]


def test_bad_requests_get_a_message_and_the_server_keeps_serving(url) -> None:
    photo = (PHOTO.name, PHOTO.read_bytes())
    status, reply = post(url, {"images": ("big.jpg", b"\xff" * (MAX_UPLOAD + 1))})
    assert status == 413 and "the limit is 1.0 MB per request (app.py --max_upload_mb)" in reply["error"]
    assert post(url, {}, "application/json", b"{}") == (400, {
        "error": "expected a multipart/form-data upload, got Content-Type 'application/json'"})  # fmt: skip
    assert post(url, {"method": "greedy", "num_captions": "3", "images": photo})[1] == {
        "error": "greedy decoding gives one caption per image: choose beam search or sampling"}  # fmt: skip
    assert post(url, {"method": "beam", "beams": "2", "num_captions": "3", "images": photo})[0] == 400
    assert post(url, {"beams": "many", "images": photo})[1] == {
        "error": "beams must be a whole number from 1 to 10, got 'many'"}  # fmt: skip
    assert post(url, {"method": "sample", "top_p": "0", "images": photo})[0] == 400
    assert post(url, {"method": "greedy"})[1] == {"error": "no image in the request: choose one or more photos"}
    body, content_type = urllib3.encode_multipart_formdata([("images", photo)] * 6)
    assert post(url, {}, content_type, body) == (400, {
        "error": "6 images in one request: at most 5 (app.py --max_images)"})  # fmt: skip
    for path in ("../README.md", "static/../../app.py", "static/..%2F..%2Fapp.py", "examples/x.jpg", "static/x.js"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url + path, timeout=10)
        assert err.value.code == 404
    status, reply = post(url, {"images": photo})
    assert status == 200 and reply["results"][0]["captions"]


def test_page_script_style_and_examples_are_served(url) -> None:
    with urllib.request.urlopen(url, timeout=10) as response:
        page = response.read().decode()
        assert "default-src 'self'" in response.headers["Content-Security-Policy"]
    assert '<script src="/static/app.js"' in page and 'href="/static/style.css"' in page
    examples = json.loads(urllib.request.urlopen(url + "api/examples", timeout=10).read())["examples"]
    on_disk = sorted(p.name for p in (Path(app.ROOT) / "assets" / "examples").glob("*.jpg"))
    assert examples == on_disk and len(examples) >= 2
    with urllib.request.urlopen(url + "examples/" + examples[0], timeout=10) as response:
        assert response.headers["Content-Type"] == "image/jpeg"
        assert response.read() == (Path(app.ROOT) / "assets" / "examples" / examples[0]).read_bytes()
    info = json.loads(urllib.request.urlopen(url + "api/info", timeout=10).read())
    assert (info["sparse_mask"], info["grid"], info["prefix_length"], info["default_beams"]) == (True, 4, 17, 2)


def test_queue_runs_one_request_at_a_time_and_refuses_overflow() -> None:
    queue = RequestQueue(max_waiting=1)
    events: list[str] = []
    release = threading.Event()

    def first() -> None:
        with queue.slot():
            events.append("first starts")
            release.wait(10)
            events.append("first ends")

    def second() -> None:
        with queue.slot():
            events.append("second starts")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    while not events:
        time.sleep(0.01)
    threads[1].start()
    deadline = time.monotonic() + 10
    while queue._pending < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(BusyError, match="at most 1 may wait"), queue.slot():
        pass
    release.set()
    for thread in threads:
        thread.join(10)
    assert events == ["first starts", "first ends", "second starts"]
    with queue.slot():  # free again
        pass


def test_default_model_is_the_demo_s_best_and_its_absence_is_explained(tmp_path, monkeypatch, capsys) -> None:
    assert app.default_checkpoint(tmp_path) is None
    for stage in ("xe", "scst_mean"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "best.pt").write_bytes(b"")
        assert app.default_checkpoint(tmp_path) == tmp_path / stage / "best.pt"
    monkeypatch.setattr(app, "DEMO_RUNS", tmp_path / "none")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # main() sets it for local models; restore it afterwards
    assert app.main(["--port", "0"]) == 2
    message = capsys.readouterr().err
    assert "no --checkpoint given and no demo model" in message and "python demo.py" in message
    assert app.main(["--checkpoint", str(tmp_path / "xe" / "best.pt"), "--port", "0"]) == 2
    assert "error: cannot load the model" in capsys.readouterr().err
