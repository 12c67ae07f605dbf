"""The captioning page in a real browser: ``python app.py`` started on a free local port with a tiny model,
driven by headless Chromium (Debian's ``chromium`` package, through Playwright). Skipped where either is
missing, except in CI (``CI`` set), where ``.ci/run`` installs both and a missing one is a failure."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_app import PHOTO, make_checkpoint

from models import load_captioner

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("OPG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
START_TIMEOUT_S = 120
PAGE_TIMEOUT_MS = 30_000


def _require_browser() -> None:
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "Playwright is not installed (pip install -r requirements-dev.txt)"
    if CHROMIUM is None:
        problem = "no chromium executable (apt-get install chromium, or set OPG_CHROMIUM)"
    if problem and os.environ.get("CI"):
        pytest.fail(problem)
    if problem:
        pytest.skip(problem)


_require_browser()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("browser") / "tiny.pt")


@pytest.fixture(scope="module")
def captioner(checkpoint):
    return load_captioner(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def app_url(checkpoint: Path) -> Iterator[str]:
    """``python app.py`` on a free port of 127.0.0.1; stopped (SIGTERM, clean exit) after the module."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "app.py", "--checkpoint", str(checkpoint), "--port", "0", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read_output() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)  # end of output: the process has exited

    threading.Thread(target=read_output, daemon=True).start()
    output: list[str] = []
    try:
        while not output or "open http://127.0.0.1:" not in output[-1]:
            try:
                line = lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                pytest.fail(f"app.py did not start within {START_TIMEOUT_S} s:\n" + "".join(output))
            if line is None:
                pytest.fail("app.py exited before serving:\n" + "".join(output))
            output.append(line)
        yield output[-1].split("open ", 1)[1].split()[0]
    finally:
        process.terminate()
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
    assert code == 0, f"app.py did not stop cleanly ({code})"


@pytest.fixture(scope="module")
def outside_requests() -> list[str]:
    """URLs the page requested from anywhere but the app (it must stay empty: the page works offline)."""
    return []


@pytest.fixture(scope="module")
def page(app_url: str, outside_requests: list[str]):
    from playwright.sync_api import sync_playwright

    def record(request) -> None:
        if not request.url.startswith((app_url, "blob:", "data:")):
            outside_requests.append(request.url)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        page.on("request", record)
        page.goto(app_url)
        page.wait_for_selector("#examples img")
        yield page
        browser.close()


def card(page, panel: str, name: str):
    return page.wait_for_selector(f'#{panel} .card[data-name="{name}"]')


def test_a_real_photo_gets_the_python_api_captions_and_its_mask(page, captioner) -> None:
    page.set_input_files("#files", str(PHOTO))
    result = card(page, "captions", PHOTO.name)
    texts = [node.text_content() for node in result.query_selector_all(".caption")]
    expected = captioner.caption(PHOTO, beams=2, num_captions=2)[0]  # the page starts from the model's 2 beams
    assert texts == [c.text for c in expected] and texts[0].strip()
    scores = [float(node.text_content()) for node in result.query_selector_all(".score")]
    assert scores == pytest.approx([c.score for c in expected], abs=1e-3)

    page.click("#tab-mask")
    mask = card(page, "mask", PHOTO.name)
    kept = captioner.kept_positions(PHOTO)[0].tolist()
    cells = [node.get_attribute("class") for node in mask.query_selector_all(".grid .cell")]
    assert cells == ["cell kept" if k else "cell dropped" for k in kept[1:]]
    assert mask.query_selector(".badge").text_content() == ("kept" if kept[0] else "dropped")
    count = mask.query_selector(".kept-count").text_content()
    assert count == f"GPT-2 reads {sum(kept)} of {len(kept)} prefix positions."
    page.click("#tab-captions")


def test_a_text_file_gets_an_error_message_in_the_page(page, tmp_path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("these are not pixels\n")
    page.set_input_files("#files", str(notes))
    error = card(page, "captions", "notes.txt").query_selector(".error").text_content()
    assert error == "notes.txt: not a recognised image format (supported: JPEG, PNG, WEBP, BMP, DIB, GIF, TIFF)"
    assert page.text_content("#message") == "1 of 1 file could not be read: see below."


def test_an_example_captioned_greedily(page, captioner, outside_requests) -> None:
    page.check("input[name=method][value=greedy]")
    assert not page.is_visible("#beams") and not page.is_visible("#num-captions")
    button = page.query_selector("#examples button")
    name = button.query_selector("img").get_attribute("alt")
    button.click()
    texts = [node.text_content() for node in card(page, "captions", name).query_selector_all(".caption")]
    assert texts == captioner.caption(REPO / "assets" / "examples" / name, method="greedy")
    assert outside_requests == []
