"""Hostile and broken requests to the running page: an upload cut off mid-way, a multipart body that ends
early, the wrong content type, files one byte over and at the upload limit, a body ten times the limit, a
zip-bomb image, a file named ``../../etc/passwd`` and a request naming a file of the server. Each gets a
message (or, for a dropped connection, nothing at all), the server keeps serving, nothing changes on disk
outside Gradio's upload folder, and what failed uploads leave in it the server's own sweeper deletes."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from app_server import PHOTO, app_command, app_env, make_checkpoint, running

from webapp.uploads import remove_failed_uploads

MAX_UPLOAD_MB = 2
MAX_UPLOAD_BYTES = 2_000_000  # what Gradio is given: int(MAX_UPLOAD_MB * 1e6)
# The server deletes failed uploads once untouched this long (600 s by default), checking as often.
FAILED_UPLOAD_AGE_S = 15
BOUNDARY = "opg-test-boundary"
ETC_PASSWD = Path("/etc/passwd")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folders the app may write to: its working folder, home, temporary files and Gradio's uploads."""
    root = tmp_path_factory.mktemp("malformed")
    for name in ("work", "home", "tmp", "uploads"):
        (root / name).mkdir()
    return root


@pytest.fixture(scope="module")
def app_url(sandbox: Path) -> Iterator[str]:
    checkpoint = make_checkpoint(sandbox / "work" / "tiny.pt")
    command = app_command(
        checkpoint, "--max_upload_mb", str(MAX_UPLOAD_MB), "--failed_upload_age_s", str(FAILED_UPLOAD_AGE_S)
    )
    command[1] = str(Path(__file__).resolve().parent.parent / "app.py")
    env = app_env(HOME=str(sandbox / "home"), TMPDIR=str(sandbox / "tmp"), GRADIO_TEMP_DIR=str(sandbox / "uploads"))
    with running(command, sandbox / "work", env) as url:
        still_captions(url)  # the first request fills caches (fonts, compiled code): before any snapshot
        yield url


@pytest.fixture
def unchanged_outside_uploads(sandbox: Path, app_url: str) -> Iterator[None]:
    """Fails the test if any file outside ``uploads/`` was added, removed or changed, or /etc/passwd changed."""
    before, passwd = snapshot(sandbox), fingerprint(ETC_PASSWD)
    yield
    after = snapshot(sandbox)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    assert [name for name in changed if not name.startswith("uploads/")] == []
    assert fingerprint(ETC_PASSWD) == passwd


@pytest.fixture
def stores_nothing(sandbox: Path, app_url: str) -> Iterator[None]:
    """Fails the test if the upload folder gained a stored upload (any file but the ``tmp*`` leftovers of
    failed uploads at its top, which the server's sweeper deletes) or a leftover over the upload limit."""
    uploads = sandbox / "uploads"
    before = snapshot(uploads)
    yield
    added = {name: size for name, (size, _) in snapshot(uploads).items() if name not in before}
    assert {name: size for name, size in added.items() if "/" in name or not name.startswith("tmp")} == {}
    assert all(size <= MAX_UPLOAD_BYTES for size in added.values()), added


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def fingerprint(path: Path) -> tuple[str, int]:
    return hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns


def multipart(filename: str, content: bytes, closed: bool = True) -> bytes:
    """A multipart/form-data body with one ``files`` part; ``closed=False`` leaves out the final boundary."""
    head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="files"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
    return head + content + (f"\r\n--{BOUNDARY}--\r\n".encode() if closed else b"")


def post(url: str, path: str, body: bytes, content_type: str) -> tuple[int, str]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("POST", path, body, {"Content-Type": content_type})
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def upload(url: str, filename: str, content: bytes) -> tuple[int, str]:
    return post(url, "/gradio_api/upload", multipart(filename, content), f"multipart/form-data; boundary={BOUNDARY}")


def call_caption(url: str, files: list[str]) -> tuple[str, object]:
    """The page's endpoint through Gradio's HTTP API: ("complete", outputs) or ("error", message)."""
    data = [[{"path": f, "meta": {"_type": "gradio.FileData"}} for f in files], "greedy", 1, 1, 1.0, 1.0, None]
    status, body = post(url, "/gradio_api/call/caption", json.dumps({"data": data}).encode(), "application/json")
    assert status == 200, body
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    try:
        connection.request("GET", f"/gradio_api/call/caption/{json.loads(body)['event_id']}")
        stream = connection.getresponse().read().decode()
    finally:
        connection.close()
    events = [block.splitlines() for block in stream.strip().split("\n\n")]
    event, data_line = events[-1][0], events[-1][1]
    return event.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))


def still_captions(app_url: str) -> None:
    from gradio_client import Client, handle_file

    *_, results = Client(app_url, verbose=False).predict(
        [handle_file(str(PHOTO))], "greedy", 1, 1, 1.0, 1.0, None, api_name="/caption"
    )
    assert results[0]["name"] == PHOTO.name and results[0]["captions"][0]["text"].strip()


def zip_bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A black 1-bit PNG of width x height (112 MB of pixels) compressed into about 100 kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows = 1000
    idat = b"".join(compressor.compress(row * rows) for _ in range(height // rows)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.usefixtures("unchanged_outside_uploads")
def test_an_upload_cut_off_mid_way_is_swept_away_and_the_server_serves(app_url: str, sandbox: Path) -> None:
    """Gradio keeps the unfinished part as a ``tmp*`` file at the top of its upload folder (and an empty one
    for each finished upload request); the server's sweeper deletes them once untouched for
    ``--failed_upload_age_s``, and nothing else."""
    uploads = sandbox / "uploads"
    before = set(snapshot(uploads))
    parts = urlsplit(app_url)
    body = multipart("photo.jpg", PHOTO.read_bytes())
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(
            (f"POST /gradio_api/upload HTTP/1.1\r\nHost: {parts.netloc}\r\n"
             f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
            + body[: len(body) // 2]
        )  # fmt: skip
    still_captions(app_url)  # a second request: the server has seen the first one end
    left = sorted(set(snapshot(uploads)) - before)
    unfinished = [name for name in left if name.startswith("tmp") and "/" not in name]
    sizes = sorted((uploads / name).stat().st_size for name in unfinished)
    assert 0 < sizes[-1] <= len(body) // 2 and sizes[:-1] == [0] * (len(sizes) - 1), left  # empty: Gradio's
    finished = {name for name in snapshot(uploads) if "/" in name}  # stored uploads, in their content folders
    deadline = time.monotonic() + 3 * FAILED_UPLOAD_AGE_S + 30
    while any((uploads / name).exists() for name in unfinished) and time.monotonic() < deadline:
        time.sleep(1)
    assert [name for name in unfinished if (uploads / name).exists()] == [], "the sweeper left them"
    assert finished <= set(snapshot(uploads)), "the sweeper deleted finished uploads"
    still_captions(app_url)


@pytest.mark.usefixtures("unchanged_outside_uploads", "stores_nothing")
def test_a_multipart_body_that_ends_early_stores_nothing_and_its_caption_is_a_message(app_url: str) -> None:
    body = multipart("cut.jpg", PHOTO.read_bytes()[:2000], closed=False)
    status, stored = post(app_url, "/gradio_api/upload", body, f"multipart/form-data; boundary={BOUNDARY}")
    assert (status, json.loads(stored)) == (200, [])  # the unfinished part is dropped
    event, outputs = call_caption(app_url, [])
    assert (event, outputs["error"]) == ("error", "no image in the request: choose one or more photos")


@pytest.mark.usefixtures("unchanged_outside_uploads", "stores_nothing")
def test_the_wrong_content_type_gets_a_message(app_url: str) -> None:
    invalid = (400, {"detail": "Invalid content type."})
    status, message = post(app_url, "/gradio_api/upload", b'{"files": ["a.jpg"]}', "application/json")
    assert (status, json.loads(message)) == invalid
    status, message = post(app_url, "/gradio_api/upload", PHOTO.read_bytes(), "image/jpeg")
    assert (status, json.loads(message)) == invalid
    status, message = post(app_url, "/gradio_api/call/caption", b"these are not JSON", "application/json")
    assert status == 422 and json.loads(message)["detail"][0]["msg"] == "JSON decode error", message
    still_captions(app_url)


@pytest.mark.usefixtures("unchanged_outside_uploads")
def test_a_file_one_byte_over_the_limit_is_refused_and_one_at_the_limit_stored(app_url: str, sandbox: Path) -> None:
    content = bytes(range(256)) * (MAX_UPLOAD_BYTES // 256) + b"x" * (MAX_UPLOAD_BYTES % 256)
    assert len(content) == MAX_UPLOAD_BYTES
    status, body = upload(app_url, "limit.jpg", content)
    assert status == 200, body
    [stored] = json.loads(body)
    assert Path(stored).resolve().is_relative_to((sandbox / "uploads").resolve())
    assert Path(stored).read_bytes() == content
    status, body = upload(app_url, "over.jpg", content + b"x")
    assert (status, body) == (413, f"File size exceeded maximum allowed size of {MAX_UPLOAD_BYTES} bytes.")
    still_captions(app_url)


@pytest.mark.usefixtures("unchanged_outside_uploads")
def test_a_body_ten_times_the_limit_is_refused_unread(app_url: str, sandbox: Path) -> None:
    parts = urlsplit(app_url)
    head = multipart("huge.jpg", b"", closed=False)
    tail = f"\r\n--{BOUNDARY}--\r\n".encode()
    size = 10 * MAX_UPLOAD_BYTES
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall(
            (f"POST /gradio_api/upload HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n"
             f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
             f"Content-Length: {len(head) + size + len(tail)}\r\n\r\n").encode() + head
        )  # fmt: skip
        block = b"\0" * (MAX_UPLOAD_BYTES // 2)
        try:
            for _ in range(size // len(block)):
                sock.sendall(block)
            sock.sendall(tail)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may stop reading once it has answered
        reply = sock.makefile("rb").read().decode("utf-8", "replace")
    assert reply.startswith("HTTP/1.1 413"), reply[:300]
    assert f"maximum allowed size of {MAX_UPLOAD_BYTES} bytes" in reply
    grown = {name: size for name, (size, _) in snapshot(sandbox / "uploads").items() if size > MAX_UPLOAD_BYTES}
    assert grown == {}  # the body was not written out past the limit
    still_captions(app_url)


@pytest.mark.usefixtures("unchanged_outside_uploads")
def test_a_zip_bomb_image_gets_a_message_beside_its_name(app_url: str, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(zip_bomb_png())
    assert bomb.stat().st_size < MAX_UPLOAD_MB * 1e6 / 10
    message, _, _, results = Client(app_url, verbose=False).predict(
        [handle_file(str(bomb)), handle_file(str(PHOTO))], "greedy", 1, 1, 1.0, 1.0, None, api_name="/caption"
    )
    assert results[0]["name"] == "bomb.png" and "too large" in results[0]["error"]
    assert results[1]["captions"][0]["text"].strip()
    assert message == "1 of 2 files could not be read: see below."


@pytest.mark.usefixtures("unchanged_outside_uploads")
def test_a_file_named_etc_passwd_stays_in_the_upload_folder(app_url: str, sandbox: Path) -> None:
    status, body = upload(app_url, "../../etc/passwd", b"root:x:0:0:pretend:/root:/bin/sh\n")
    assert status == 200, body
    [stored] = json.loads(body)
    stored_path = Path(stored).resolve()
    assert stored_path.is_relative_to((sandbox / "uploads").resolve()) and stored_path.name == "passwd"
    event, outputs = call_caption(app_url, [stored])
    assert event == "complete"
    message, _, _, results = outputs
    assert results == [{"name": "passwd", "error": "passwd: not a recognised image format (supported: JPEG, PNG, "
                        "WEBP, BMP, DIB, GIF, TIFF)"}]  # fmt: skip
    assert message == "1 of 1 file could not be read: see below."


@pytest.mark.usefixtures("unchanged_outside_uploads", "stores_nothing")
def test_a_request_naming_a_file_of_the_server_is_refused(app_url: str) -> None:
    event, message = call_caption(app_url, [str(ETC_PASSWD)])
    refused = "to the gradio cache dir because it was not uploaded by a user."
    assert (event, message["error"]) == ("error", f"Cannot move {ETC_PASSWD} {refused}")
    event, message = call_caption(app_url, [os.path.join("..", "..", "..", "etc", "passwd")])
    assert event == "error" and message["error"].startswith("Cannot move ") and message["error"].endswith(refused)
    still_captions(app_url)


def test_only_old_unfinished_uploads_are_removed(tmp_path: Path) -> None:
    now = time.time()
    old, fresh = tmp_path / "tmpold", tmp_path / "tmpfresh"
    kept_upload = tmp_path / "0123abcd" / "tmpphoto.jpg"  # a finished upload in its content folder
    for path in (old, fresh, kept_upload, tmp_path / "notes.txt"):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"part of an upload")
    (tmp_path / "tmplink").symlink_to(old)
    (tmp_path / "tmpdir").mkdir()
    for path in (old, kept_upload, tmp_path / "notes.txt"):
        os.utime(path, (now - 3600, now - 3600))
    os.utime(tmp_path / "tmpdir", (now - 3600, now - 3600))
    assert remove_failed_uploads(tmp_path, max_age_s=600, now=now) == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0123abcd", "notes.txt", "tmpdir", "tmpfresh", "tmplink"]
    assert kept_upload.is_file()
