"""The captioning page in a real browser: ``python app.py`` started on a free local port with a tiny model,
driven by headless Chromium (Debian's ``chromium`` package, through Playwright). Every request the page makes
is recorded: none may leave 127.0.0.1. Skipped where either is missing, except in CI (``CI`` set), where
``.ci/run`` installs both and a missing one is a failure."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from app_server import PHOTO, REPO, app_command, app_env, make_checkpoint, running

from models import load_captioner

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
PAGE_TIMEOUT_MS = 60_000
LOCAL_HOSTS = ("127.0.0.1", "localhost")


def _find_chromium() -> tuple[str | None, str | None]:
    """The browser's executable, or why there is none usable."""
    chosen = os.environ.get("OPG_CHROMIUM")
    if chosen:
        return (chosen, None) if Path(chosen).is_file() else (None, f"OPG_CHROMIUM={chosen} is no file")
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    return (found, None) if found else (None, "no chromium executable (apt-get install chromium, or set OPG_CHROMIUM)")


def _browser_problem() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -r requirements-dev.txt)"
    return _find_chromium()[1]


CHROMIUM = _find_chromium()[0]
pytestmark = pytest.mark.optional_tool(_browser_problem(), ci_requires=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("browser") / "tiny.pt")


@pytest.fixture(scope="module")
def captioner(checkpoint):
    return load_captioner(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def app_url(checkpoint: Path) -> Iterator[str]:
    with running(app_command(checkpoint), REPO, app_env()) as url:
        yield url


@pytest.fixture
def outside_requests() -> list[str]:
    """URLs the test's page requested from any host but this machine (it must stay empty: the page works
    offline)."""
    return []


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app_url: str, outside_requests: list[str]):
    """A new page at the app with its default settings (the tests share the server and the browser only)."""

    def record(request) -> None:
        parts = urlsplit(request.url)
        if parts.scheme not in ("blob", "data") and parts.hostname not in LOCAL_HOSTS:
            outside_requests.append(request.url)

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.on("request", record)
    page.goto(app_url)
    page.wait_for_selector("#caption")
    yield page
    context.close()


def caption(page, *paths: Path) -> None:
    """Upload ``paths`` and press Caption."""
    page.set_input_files("#files input[type=file]", [str(p) for p in paths])
    for path in paths:
        page.wait_for_selector(f"#files >> text={path.stem}")  # the page splits name and suffix
    page.click("#caption")


def card(page, panel: str, name: str):
    return page.wait_for_selector(f'#{panel} .card[data-name="{name}"]', state="attached")


def test_a_real_photo_gets_the_python_api_captions_and_its_mask(page, captioner, outside_requests) -> None:
    caption(page, PHOTO)
    result = card(page, "captions", PHOTO.name)
    texts = [node.text_content() for node in result.query_selector_all(".caption")]
    expected = captioner.caption(PHOTO, beams=2)  # the page starts from the model's 2 beams, one caption
    assert texts == expected and texts[0].strip()
    scores = [float(node.text_content()) for node in result.query_selector_all(".score")]
    best = captioner.caption(PHOTO, beams=2, num_captions=2)[0][0]
    assert scores == pytest.approx([best.score], abs=1e-4)

    page.get_by_role("tab", name="Sparse mask").click()
    mask = card(page, "mask", PHOTO.name)
    kept = captioner.kept_positions(PHOTO)[0].tolist()
    cells = [node.get_attribute("class") for node in mask.query_selector_all(".grid .cell")]
    assert cells == ["cell kept" if k else "cell dropped" for k in kept[1:]]
    assert mask.query_selector(".badge").text_content() == ("kept" if kept[0] else "dropped")
    count = mask.query_selector(".kept-count").text_content()
    assert count == f"GPT-2 reads {sum(kept)} of {len(kept)} prefix positions."
    assert outside_requests == []


def test_a_text_file_gets_an_error_message_in_the_page(page, tmp_path, outside_requests) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("these are not pixels\n")
    caption(page, notes)
    error = card(page, "captions", "notes.txt").query_selector(".error").text_content()
    assert error == "notes.txt: not a recognised image format (supported: JPEG, PNG, WEBP, BMP, DIB, GIF, TIFF)"
    page.wait_for_selector("#message >> text=1 of 1 file could not be read: see below.")
    assert outside_requests == []


def test_an_example_captioned_greedily_and_no_request_left_the_machine(page, captioner, outside_requests) -> None:
    page.get_by_label("greedy").check()
    page.wait_for_selector("#beams", state="hidden")
    assert not page.is_visible("#num-captions")
    name = sorted(p.name for p in (REPO / "assets" / "examples").glob("*.jpg"))[0]
    page.get_by_text(name, exact=True).first.click()
    page.wait_for_selector(f"#files >> text={Path(name).stem}")
    page.click("#caption")
    texts = [node.text_content() for node in card(page, "captions", name).query_selector_all(".caption")]
    assert texts == captioner.caption(REPO / "assets" / "examples" / name, method="greedy")
    assert outside_requests == []
