"""What uploads leave on disk. Gradio streams each uploaded file into a temporary file named ``tmp*`` directly
in its upload folder and moves it into a subfolder once the upload is complete; an upload that is cut off or
refused for its size leaves that temporary file behind (up to the upload limit each time), so repeated
failed uploads could fill the disk. Those leftovers are deleted here; completed uploads stay where Gradio
keeps them (the bundled examples' copies are among them, and the page needs those)."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def remove_failed_uploads(folder: Path, max_age_s: float, now: float | None = None) -> list[Path]:
    """Delete the ``tmp*`` files directly in ``folder`` not written to for ``max_age_s`` seconds (an upload
    in progress keeps writing to its own). Returns the deleted paths; a file already gone is skipped."""
    now = time.time() if now is None else now
    removed = []
    for path in folder.glob("tmp*"):
        try:
            if path.is_file() and not path.is_symlink() and now - path.stat().st_mtime > max_age_s:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue
    return removed


def sweep_failed_uploads(folder: Path, max_age_s: float, stop: threading.Event) -> threading.Thread:
    """Start a daemon thread that runs ``remove_failed_uploads`` every ``max_age_s`` (at most every 10
    minutes) until ``stop`` is set."""

    def sweep() -> None:
        while not stop.wait(min(max_age_s, 600.0)):
            try:
                removed = remove_failed_uploads(folder, max_age_s)
            except OSError as err:  # an unreadable folder must not stop the server
                logger.warning("cannot clean the upload folder %s: %s", folder, err)
                continue
            if removed:
                logger.info("deleted %d unfinished upload(s) from %s", len(removed), folder)

    thread = threading.Thread(target=sweep, name="upload-sweeper", daemon=True)
    thread.start()
    return thread
