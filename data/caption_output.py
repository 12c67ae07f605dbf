"""Writing predicted captions: COCO results JSON, JSON lines, CSV, and an HTML gallery to look at them.

Every file is written atomically (:func:`utils.io.write_text`).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

from data.image_io import ImageLoadError, load_image
from utils.io import ImageId, write_text

logger = logging.getLogger(__name__)

FORMATS = ("coco", "jsonl", "csv")
SUFFIX_FORMATS = {".json": "coco", ".jsonl": "jsonl", ".csv": "csv"}


@dataclass
class CaptionRecord:
    """One captioned image: ``image_id`` (see :func:`utils.io.assign_image_ids`), ``caption``, ``file_name`` and,
    for n-best output, ``captions``: ``[{"caption", "score"}, ...]`` best first (``caption`` is the first)."""

    image_id: ImageId
    caption: str
    file_name: str
    captions: list[dict] | None = field(default=None)

    def as_dict(self) -> dict:
        row = asdict(self)
        if self.captions is None:
            del row["captions"]
        return row


def match_annotated_images(
    entries: Sequence[tuple[ImageId, str]], paths: Sequence[Path]
) -> tuple[list[tuple[ImageId, Path]], list[str]]:
    """Find each annotated image ``(id, file name)`` among the files ``paths``: the file whose path ends with
    the file name (``val2014/COCO_val2014_000000000042.jpg``), else the only file of that base name.
    Returns the matches in annotation order and a message for each image not found or ambiguous."""
    by_name: dict[str, list[Path]] = {}
    for path in paths:
        by_name.setdefault(path.name, []).append(path)
    matches, problems = [], []
    for image_id, file_name in entries:
        relative = PurePosixPath(file_name.replace("\\", "/"))
        candidates = by_name.get(relative.name, [])
        exact = [p for p in candidates if p.as_posix().endswith("/" + relative.as_posix())]
        found = exact or candidates
        if len(found) == 1:
            matches.append((image_id, found[0]))
        elif not found:
            problems.append(f"{file_name} (image id {image_id}): no such file among the --images inputs")
        else:
            problems.append(f"{file_name} (image id {image_id}): several files match: {found[0]}, {found[1]}")
    return matches, problems


def format_for(path: str | os.PathLike, requested: str | None = None) -> str:
    """Output format: ``requested`` if given, else from the suffix (.json coco, .jsonl, .csv)."""
    if requested is not None:
        if requested not in FORMATS:
            raise ValueError(f"unknown output format {requested!r}; choose one of {', '.join(FORMATS)}")
        return requested
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIX_FORMATS:
        raise ValueError(
            f"cannot tell the output format of {os.fspath(path)!r} from its suffix: name it .json, .jsonl or "
            f".csv, or give --format ({', '.join(FORMATS)})"
        )
    return SUFFIX_FORMATS[suffix]


def write_results(path: str | os.PathLike, records: Sequence[CaptionRecord], fmt: str) -> None:
    """Write ``records`` as COCO results JSON (a list of objects), JSON lines or CSV (with a header; one
    caption per image only)."""
    rows = [r.as_dict() for r in records]
    if fmt == "coco":
        text = json.dumps(rows, ensure_ascii=False, indent=1) + "\n"
    elif fmt == "jsonl":
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    elif fmt == "csv":
        if any(r.captions is not None for r in records):
            raise ValueError("n-best lists need a JSON or JSON-lines output (.json or .jsonl)")
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["image_id", "file_name", "caption"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {', '.join(FORMATS)}")
    write_text(path, text)


def write_gallery(
    path: str | os.PathLike,
    records: Sequence[CaptionRecord],
    failures: Sequence[str] = (),
    thumb_px: int = 224,
    title: str = "Captions",
) -> None:
    """Self-contained HTML page: each image as a small embedded JPEG with its caption underneath, then
    ``failures`` (messages naming the files that could not be captioned and why). Images that cannot be
    re-read are listed without a thumbnail."""
    cards = [_card(record, thumb_px) for record in records]
    failed = "".join(f"<li>{html.escape(message)}</li>" for message in failures)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1em; }}
figure {{ width: {thumb_px}px; margin: 0; }}
img {{ max-width: {thumb_px}px; max-height: {thumb_px}px; display: block; }}
figcaption {{ font-size: 0.95em; margin-top: 0.3em; }}
.path {{ color: #777; font-size: 0.75em; word-break: break-all; }}
</style></head>
<body><h1>{html.escape(title)}</h1>
<p>{len(records)} captioned, {len(failures)} failed.</p>
<div class="grid">
{"".join(cards)}</div>
{f"<h2>Not captioned</h2><ul>{failed}</ul>" if failures else ""}
</body></html>
"""
    write_text(path, page)


def _card(record: CaptionRecord, thumb_px: int) -> str:
    try:
        image = load_image(record.file_name, max_pixels=4 * thumb_px * thumb_px)
        image.thumbnail((thumb_px, thumb_px))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        picture = f'<img src="data:image/jpeg;base64,{data}" alt="{html.escape(record.caption)}">'
    except ImageLoadError as err:
        logger.warning("gallery: no thumbnail for %s (%s)", record.file_name, err.reason)
        picture = "<p>(image unavailable)</p>"
    return (
        f"<figure>{picture}<figcaption>{html.escape(record.caption)}"
        f'<div class="path">{html.escape(record.file_name)}</div></figcaption></figure>\n'
    )
