"""``multipart/form-data`` request bodies (what a browser's ``FormData`` and ``curl -F`` send), split into
uploaded files and text fields. Parts are found by their boundary with ``bytes.split``, which is fast for
binary files; each part's headers are read by the standard library's email parser."""

from __future__ import annotations

from email import policy
from email.message import Message
from email.parser import BytesHeaderParser
from typing import NamedTuple


class FormError(ValueError):
    """A request body that is not a well-formed ``multipart/form-data`` form."""


class Upload(NamedTuple):
    """One uploaded file: the name the client gave it and its bytes."""

    name: str
    data: bytes


def boundary_of(content_type: str | None) -> bytes:
    """The boundary parameter of a ``multipart/form-data`` Content-Type header."""
    header = Message()
    header["Content-Type"] = content_type or ""
    if header.get_content_type() != "multipart/form-data":
        raise FormError(f"expected a multipart/form-data upload, got Content-Type {content_type!r}")
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        raise FormError("the multipart/form-data Content-Type has no valid boundary")
    return boundary.encode("latin-1")


def parse_form(content_type: str | None, body: bytes) -> tuple[list[Upload], dict[str, str]]:
    """Split a form body into its files (in order) and its text fields (the last value of each name)."""
    delimiter = b"\r\n--" + boundary_of(content_type)
    chunks = (b"\r\n" + body).split(delimiter)  # the first delimiter has no CRLF before it
    if len(chunks) < 2 or not chunks[-1].startswith(b"--"):
        raise FormError("malformed multipart/form-data body: no closing boundary")
    uploads: list[Upload] = []
    fields: dict[str, str] = {}
    for chunk in chunks[1:-1]:
        head, separator, content = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise FormError("malformed multipart/form-data body: a part has no header block")
        headers = BytesHeaderParser(policy=policy.HTTP).parsebytes(head.lstrip(b" \t").removeprefix(b"\r\n"))
        name = headers.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            raise FormError("malformed multipart/form-data body: a part has no field name")
        filename = headers.get_filename()
        if filename is not None:
            uploads.append(Upload(filename, content))
        else:
            fields[name] = content.decode("utf-8", errors="replace")
    return uploads, fields
