"""Whether the Hugging Face Hub can be reached, decided quickly (its client retries for minutes offline)."""

from __future__ import annotations

import os
import socket

_HUB_HOST = "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when ``HF_HUB_OFFLINE`` is set or a TCP connection to the Hub fails within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        with socket.create_connection((_HUB_HOST, 443), timeout=timeout):
            return True
    except OSError:
        return False
