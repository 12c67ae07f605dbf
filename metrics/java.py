"""Java, which pycocoevalcap's PTB tokenizer and METEOR run: checked before any work that needs it."""

from __future__ import annotations

import shutil

INSTALL_HINT = "install a Java runtime (Java 8 or later, e.g. apt-get install default-jre-headless)"


def java_missing() -> str | None:
    """One line saying what to install when ``java`` is not on PATH, else None."""
    if shutil.which("java") is not None:
        return None
    return f"java not found on PATH; the COCO caption metrics (PTB tokenizer, METEOR) need it: {INSTALL_HINT}"
