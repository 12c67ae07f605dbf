"""The HTTP side of ``app.py``: the static page, the bundled examples and a JSON captioning endpoint.

    GET  /                   the page (webapp/static/index.html, with app.js and style.css)
    GET  /api/info           the model and the limits, as JSON
    GET  /api/examples       names of the bundled example images; GET /examples/NAME serves one
    POST /api/caption        multipart/form-data: files (any field name) and the decoding fields of
                             :func:`webapp.service.parse_settings` -> JSON results, or {"error": message}

Connections are served by threads (the standard library's ``ThreadingHTTPServer``); captioning itself runs
one request at a time through the service's queue. Every failure of a request becomes a JSON message with
a 4xx or 5xx status, and the server keeps serving. The page loads nothing from other hosts, and its
Content-Security-Policy says so to the browser.
"""

from __future__ import annotations

import json
import logging
import mimetypes
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from data.image_io import IMAGE_EXTENSIONS
from webapp.forms import FormError, parse_form
from webapp.service import BusyError, CaptionService, RequestError

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
_DISCARD_LIMIT = 256 << 20  # an over-size body up to this is read and dropped so that the client sees our reply
_SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def files_in(folder: Path, suffixes: frozenset[str] | None = None) -> dict[str, Path]:
    """The regular files of a folder by name (with one of ``suffixes``): the only names the server answers
    for, so that no request path reaches another file."""
    if not folder.is_dir():
        return {}
    files = (path for path in sorted(folder.iterdir()) if path.is_file())
    return {path.name: path for path in files if suffixes is None or path.suffix.lower() in suffixes}


class CaptionServer(ThreadingHTTPServer):
    """Serves one :class:`CaptionService`; ``max_upload_bytes`` bounds a request body."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], service: CaptionService, max_upload_bytes: int) -> None:
        super().__init__(address, CaptionHandler)
        self.service, self.max_upload_bytes = service, max_upload_bytes
        self.static, self.examples = files_in(STATIC_DIR), files_in(EXAMPLES_DIR, IMAGE_EXTENSIONS)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


class CaptionHandler(BaseHTTPRequestHandler):
    """One request: the routes of the module docstring; every answer carries the security headers."""

    server: CaptionServer
    server_version = "opg-app"
    timeout = 120  # seconds a client may stall while sending, before its thread gives up

    def do_GET(self) -> None:
        path = unquote(self.path.split("?", 1)[0])
        if path == "/":
            self._send_file(self.server.static["index.html"])
        elif path == "/api/info":
            self._send_json({**self.server.service.info(), "max_upload_bytes": self.server.max_upload_bytes})
        elif path == "/api/examples":
            self._send_json({"examples": list(self.server.examples)})
        elif path.startswith("/static/") and path.removeprefix("/static/") in self.server.static:
            self._send_file(self.server.static[path.removeprefix("/static/")])
        elif path.startswith("/examples/") and path.removeprefix("/examples/") in self.server.examples:
            self._send_file(self.server.examples[path.removeprefix("/examples/")])
        else:
            self._send_error(HTTPStatus.NOT_FOUND, f"no such page: {path}")

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/api/caption":
            self._send_error(HTTPStatus.NOT_FOUND, f"no such endpoint: {self.path}")
            return
        try:
            body = self._read_body()
            if body is None:
                return
            uploads, fields = parse_form(self.headers.get("Content-Type"), body)
            self._send_json(self.server.service.caption(uploads, fields))
        except (FormError, RequestError) as err:
            self._send_error(HTTPStatus.BAD_REQUEST, str(err))
        except BusyError as err:
            self._send_error(HTTPStatus.SERVICE_UNAVAILABLE, str(err))
        except Exception as err:  # a bug must cost one request, not the server
            logger.exception("request failed")
            self._send_error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(err).__name__}: {err})")

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering 411 / 413 for a missing or over-size one."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send_error(HTTPStatus.LENGTH_REQUIRED, "the upload needs a valid Content-Length header")
            return None
        limit = self.server.max_upload_bytes
        if length > limit:
            self._discard(length)
            self.close_connection = True
            self._send_error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the upload is {_megabytes(length)}: "
                             f"the limit is {_megabytes(limit)} per request (app.py --max_upload_mb)")  # fmt: skip
            return None
        return self.rfile.read(length)

    def _discard(self, length: int) -> None:
        """Read and drop an over-size body (up to a bound) so that the browser gets our reply, not a reset."""
        remaining = length if length <= _DISCARD_LIMIT else 0
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)

    def _send_file(self, path: Path) -> None:
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if content_type.startswith("text/") or content_type.endswith("javascript"):
            content_type += "; charset=utf-8"
        self._send(HTTPStatus.OK, path.read_bytes(), content_type)

    def _send_json(self, payload: dict[str, Any], status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send_error(self, status: HTTPStatus, message: str) -> None:
        logger.info("%s %s -> %d: %s", self.command, self.path, status, message)
        self._send_json({"error": message}, status)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in _SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s " + format, self.address_string(), *args)


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
