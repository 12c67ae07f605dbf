"""The web page's screenshot in docs/app.png: ``app.py`` over a checkpoint, the bundled examples and a text file
uploaded, beam search with 3 beams and 3 captions per image, in headless Chromium (Debian's ``chromium`` through
Playwright, as tests/test_app_browser.py drives it).

Usage: python scripts/app_screenshot.py [--checkpoint runs/demo/scst_mean/best.pt] [--out docs/app.png]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "assets" / "examples").glob("*.jpg"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


def start_app(checkpoint: Path) -> tuple[subprocess.Popen, str]:
    """``app.py`` on a free port of 127.0.0.1, and the URL it prints."""
    command = [sys.executable, str(ROOT / "app.py"), "--checkpoint", str(checkpoint), "--port", "0", "--device", "cpu"]
    app = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in app.stdout:
        if " open http://" in line:
            return app, line.split(" open ", 1)[1].split()[0]
    raise SystemExit(f"app.py exited before serving (status {app.wait()})")


def screenshot(url: str, out: Path, chromium: str) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as folder, sync_playwright() as playwright:
        notes = Path(folder) / "notes.txt"
        notes.write_text("these are not pixels\n")
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.get_by_label("beam search").check()
        for slider, value in (("#beams", "3"), ("#num-captions", "3")):
            page.fill(f"{slider} input[type=number]", value)
            page.press(f"{slider} input[type=number]", "Enter")
        page.set_input_files("#files input[type=file]", [str(p) for p in [*EXAMPLES, notes]])
        page.wait_for_selector("#files >> text=notes")
        page.click("#caption")
        page.wait_for_selector('#captions .card[data-name="notes.txt"]')
        page.screenshot(path=str(out), full_page=True)
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / "runs" / "demo" / "scst_mean" / "best.pt")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "app.png")
    args = parser.parse_args(argv)
    chromium = os.environ.get("OPG_CHROMIUM") or shutil.which("chromium")
    if chromium is None:
        parser.error("no chromium executable (apt-get install chromium, or set OPG_CHROMIUM)")
    if not args.checkpoint.is_file():
        parser.error(f"no checkpoint at {args.checkpoint} (make demo writes runs/demo/scst_mean/best.pt)")
    checkpoint = args.checkpoint.resolve()  # shown on the page relative to the repository when inside it
    app, url = start_app(checkpoint.relative_to(ROOT) if checkpoint.is_relative_to(ROOT) else checkpoint)
    try:
        screenshot(url, args.out.resolve(), chromium)
    finally:
        app.terminate()
        app.wait(timeout=60)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
