"""Tests for the web page's own logic (webapp/service.py, webapp/render.py, app.py's choice of model):
captions against the Python API, bad uploads answered with a message each while the others are captioned,
bad settings refused with a message. The Gradio page itself is exercised by test_app_client.py (scripts),
test_app_browser.py (Chromium), test_app_malformed.py (hostile requests) and test_space.py (the Space)."""

from __future__ import annotations

import socket
import struct
import zlib
from html.parser import HTMLParser

import pytest
from app_server import PHOTO, make_checkpoint

import app
import models.captioning
from models import load_captioner
from webapp.render import captions_html, mask_html
from webapp.service import CaptionService, RequestError, Settings

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def captioner(tmp_path_factory: pytest.TempPathFactory):
    return load_captioner(make_checkpoint(tmp_path_factory.mktemp("app") / "tiny.pt"), device="cpu")


@pytest.fixture(scope="module")
def service(captioner) -> CaptionService:
    return CaptionService(captioner, "tiny.pt", max_images=5)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with one tiny IDAT: huge, yet a few bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


class _Texts(HTMLParser):
    """Text of the elements with a given class, in document order."""

    def __init__(self, css_class: str) -> None:
        super().__init__()
        self.css_class, self.texts, self._open = css_class, [], False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self._open = self.css_class in (dict(attrs).get("class") or "").split()
        if self._open:
            self.texts.append("")

    def handle_data(self, data: str) -> None:
        if self._open:
            self.texts[-1] += data

    def handle_endtag(self, tag: str) -> None:
        self._open = False


def texts(html: str, css_class: str) -> list[str]:
    parser = _Texts(css_class)
    parser.feed(html)
    return parser.texts


def test_captions_and_kept_positions_equal_the_python_api(service, captioner, monkeypatch) -> None:
    # This random model's best two beams are the same for any beam width: the width is read where it
    # reaches the decoder.
    widths = []
    decode = models.captioning.decode
    monkeypatch.setattr(models.captioning, "decode", lambda *a, **k: widths.append(a[2].beams) or decode(*a, **k))
    (result,) = service.caption([PHOTO], Settings("beam", beams=3, num_captions=2))
    assert widths == [3]
    expected = captioner.caption(PHOTO, beams=3, num_captions=2)[0]
    assert [c.text for c in result.captions] == [c.text for c in expected]
    assert [c.score for c in result.captions] == pytest.approx([c.score for c in expected], abs=1e-5)
    assert result.kept == captioner.kept_positions(PHOTO)[0].tolist()
    assert 0 < sum(result.kept) < len(result.kept)
    reply = result.to_json()
    assert reply["name"] == PHOTO.name and [c["text"] for c in reply["captions"]] == [c.text for c in expected]

    sampling = Settings("sample", num_captions=3, temperature=0.8, top_p=0.9, seed=5)
    expected = captioner.caption(PHOTO, method="sample", num_captions=3, temperature=0.8, top_p=0.9, seed=5)[0]
    assert [c.text for c in service.caption([PHOTO], sampling)[0].captions] == [c.text for c in expected]
    greedy = service.caption([PHOTO], Settings("greedy"))[0].captions
    assert [c.text for c in greedy] == captioner.caption(PHOTO, method="greedy")


def test_the_page_shows_each_caption_with_its_score_and_the_kept_grid(service, captioner) -> None:
    results = service.caption([PHOTO], Settings("beam", beams=2, num_captions=2))
    html = captions_html(results)
    expected = captioner.caption(PHOTO, beams=2, num_captions=2)[0]
    assert texts(html, "caption") == [c.text for c in expected]
    assert [float(s) for s in texts(html, "score")] == pytest.approx([c.score for c in expected], abs=1e-4)
    kept = captioner.kept_positions(PHOTO)[0].tolist()
    mask = mask_html(results, captioner.spatial_grid, 32)
    assert mask.count('class="cell kept"') == sum(kept[1:]) and mask.count('class="cell dropped"') == 16 - sum(kept[1:])
    assert texts(mask, "kept-count") == [f"GPT-2 reads {sum(kept)} of {len(kept)} prefix positions."]
    assert "http" not in html + mask  # images are inlined: the page fetches nothing for them


def test_bad_uploads_get_a_message_each_and_good_ones_still_get_captions(service, captioner, tmp_path) -> None:
    photo = PHOTO.read_bytes()
    files = {"notes.txt": b"not an image\n", "cut.jpg": photo[: len(photo) // 2], "empty.png": b"",
             "huge.png": png_header_only(12_000, 12_000), PHOTO.name: photo}  # fmt: skip
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    results = service.caption([tmp_path / name for name in files], Settings("greedy"))
    errors = [result.error for result in results]
    assert errors[0] == "notes.txt: not a recognised image format (supported: JPEG, PNG, WEBP, BMP, DIB, GIF, TIFF)"
    assert errors[1].startswith("cut.jpg: corrupt or truncated image data")
    assert errors[2] == "empty.png: empty file (0 bytes)"
    assert errors[3].startswith("huge.png: 12000x12000 = 144000000 pixels exceeds the decode limit")
    assert errors[4] is None and results[4].captions[0].text == captioner.caption(PHOTO, method="greedy")[0]
    assert texts(captions_html(results), "error") == errors[:4]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(method="greedy", num_captions=3), "greedy decoding gives one caption per image"),
        (dict(method="beam", beams=2, num_captions=3), "3 captions need a beam size of at least 3, got 2"),
        (dict(method="beam", beams=2.5), "beams must be a whole number from 1 to 10, got 2.5"),
        (dict(method="sample", top_p=0), "top_p must be a number from 0.01 to 1.0, got 0"),
        (dict(method="nucleus"), "method must be one of"),
        (dict(method="sample", seed=-1), "seed must be a whole number"),
    ],
)
def test_contradictory_or_out_of_range_settings_are_refused_with_a_message(settings, message) -> None:
    with pytest.raises(RequestError, match=message):
        Settings(**settings)


def test_no_images_or_too_many_are_refused(service) -> None:
    with pytest.raises(RequestError, match="no image in the request"):
        service.caption([], Settings("greedy"))
    with pytest.raises(RequestError, match=r"6 images in one request: at most 5 \(app.py --max_images\)"):
        service.caption([PHOTO] * 6, Settings("greedy"))


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


def test_a_port_in_use_is_explained(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = make_checkpoint(tmp_path / "tiny.pt")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert app.main(["--checkpoint", str(checkpoint), "--port", str(port), "--device", "cpu"]) == 2
    assert f"error: cannot listen on 127.0.0.1:{port}: the address is in use" in capsys.readouterr().err
