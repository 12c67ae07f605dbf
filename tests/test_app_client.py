"""Scripts call the running page with ``gradio_client`` and get the Python API's captions: ``python app.py``
started as a user starts it, called with ``Client(url).predict(..., api_name="/caption")``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gradio_client
import pytest
from app_server import PHOTO, app_command, app_env, make_checkpoint, running

from models import load_captioner

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("client") / "tiny.pt")


@pytest.fixture(scope="module")
def client(checkpoint: Path) -> Iterator[gradio_client.Client]:
    with running(app_command(checkpoint, "--max_images", "3"), REPO, app_env()) as url:
        yield gradio_client.Client(url, verbose=False)


def predict(client, files: list[Path], method: str, beams=2, num_captions=1, temperature=1.0, top_p=1.0, seed=None):
    """The app's /caption endpoint: (message, captions HTML, mask HTML, per-file JSON)."""
    uploads = [gradio_client.handle_file(str(path)) for path in files]
    return client.predict(uploads, method, beams, num_captions, temperature, top_p, seed, api_name="/caption")


@pytest.mark.usefixtures("single_thread")
def test_the_client_gets_the_python_api_s_captions(client, checkpoint, tmp_path) -> None:
    captioner = load_captioner(checkpoint, device="cpu")
    notes = tmp_path / "notes.txt"
    notes.write_text("not pixels\n")
    message, _, _, results = predict(client, [PHOTO, notes], "beam", beams=3, num_captions=3)
    expected = captioner.caption(PHOTO, beams=3, num_captions=3)[0]
    assert [c["text"] for c in results[0]["captions"]] == [c.text for c in expected]
    assert [c["score"] for c in results[0]["captions"]] == pytest.approx([c.score for c in expected], abs=1e-4)
    assert results[0]["kept"] == captioner.kept_positions(PHOTO)[0].tolist()
    assert results[1] == {"name": "notes.txt", "error": "notes.txt: not a recognised image format (supported: "
                          "JPEG, PNG, WEBP, BMP, DIB, GIF, TIFF)"}  # fmt: skip
    assert message == "1 of 2 files could not be read: see below."

    *_, results = predict(client, [PHOTO], "sample", num_captions=2, temperature=0.7, top_p=0.9, seed=11)
    expected = captioner.caption(PHOTO, method="sample", num_captions=2, temperature=0.7, top_p=0.9, seed=11)[0]
    assert [c["text"] for c in results[0]["captions"]] == [c.text for c in expected]
    *_, results = predict(client, [PHOTO], "greedy")
    assert [c["text"] for c in results[0]["captions"]] == captioner.caption(PHOTO, method="greedy")


def test_a_bad_request_is_answered_with_its_message(client) -> None:
    with pytest.raises(gradio_client.exceptions.AppError, match="greedy decoding gives one caption per image"):
        predict(client, [PHOTO], "greedy", num_captions=2)
    with pytest.raises(gradio_client.exceptions.AppError, match="4 images in one request: at most 3"):
        predict(client, [PHOTO] * 4, "greedy")
    *_, results = predict(client, [PHOTO], "greedy")  # and it keeps serving
    assert results[0]["captions"][0]["text"]
