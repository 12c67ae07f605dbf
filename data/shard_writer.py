"""Write a training split as WebDataset shards in img2dataset's layout (``data.prepare_* --shards OUT``).

``OUT/00000.tar``, ``OUT/00001.tar``, ... each hold up to ``shard_size`` samples of three members:
``KEY.jpg`` (the image file's own bytes; ``.png`` and ``.webp`` files keep their format, others are
re-encoded as JPEG), ``KEY.txt`` (the first caption) and ``KEY.json`` (``key``, ``caption``, ``url``,
``status``, ``error_message`` as img2dataset writes them; ``caption`` is a list when the image has several
references, an extension of img2dataset's string that SCST reads as the references). Beside each shard,
``00000_stats.json`` holds img2dataset's counts (``count``, ``successes``, ...), from which training takes
the epoch length. Keys are img2dataset's: the shard number, then the sample's index in it, zero-padded.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from data.image_io import ImageLoadError, load_image
from utils.io import ImageId, atomic_write, write_json

logger = logging.getLogger(__name__)

_KEPT_FORMATS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
# A fixed member time makes the same data give byte-identical shards.
_MTIME = 0.0


class ImageRecord(Protocol):
    """An image with its references (``data.prepare_coco.ImageRecord``); ``path`` is under the image root."""

    path: str
    image_id: ImageId
    captions: list[str]


def require_webdataset() -> Any:
    """The ``webdataset`` module, or an ImportError that says how to install it."""
    try:
        import webdataset
    except ImportError as err:
        raise ImportError("shards need the webdataset package: pip install webdataset") from err
    return webdataset


def image_member(path: Path) -> tuple[str, bytes]:
    """(member extension, bytes) of an image file: its own bytes for JPEG, PNG and WebP, else a JPEG."""
    extension = _KEPT_FORMATS.get(path.suffix.lower())
    if extension is not None:
        return extension, path.read_bytes()
    buffer = io.BytesIO()
    load_image(path).save(buffer, format="JPEG", quality=95)
    return "jpg", buffer.getvalue()


def sample_of(record: ImageRecord, key: str, image_root: Path) -> dict[str, Any]:
    """One shard sample (webdataset's dict: ``__key__`` and one entry per member)."""
    extension, data = image_member(image_root / record.path)
    caption: str | list[str] = record.captions if len(record.captions) > 1 else record.captions[0]
    meta = {"key": key, "caption": caption, "url": record.path, "image_id": record.image_id, "status": "success",
            "error_message": None}  # fmt: skip
    return {"__key__": key, extension: data, "txt": record.captions[0], "json": meta}


def write_shards(records: Sequence[ImageRecord], image_root: Path, out: Path, shard_size: int = 1000) -> list[Path]:
    """Write ``records`` (in order) into shards of ``shard_size`` samples under ``out``; returns their paths.
    An image that cannot be read stops the writing with an error naming it (the data set was checked)."""
    if shard_size < 1:
        raise ValueError(f"--shard_size must be >= 1, got {shard_size}")
    wds = require_webdataset()
    count = math.ceil(len(records) / shard_size)
    digits = max(4, len(str(shard_size - 1)))  # img2dataset: 4 digits for its 10,000 samples per shard
    paths = []
    for shard in range(count):
        chunk = records[shard * shard_size : (shard + 1) * shard_size]
        path = out / f"{shard:05d}.tar"
        started = time.time()
        with atomic_write(path, binary=True, what="shard") as handle, wds.TarWriter(handle, mtime=_MTIME) as tar:
            for index, record in enumerate(chunk):
                try:
                    tar.write(sample_of(record, f"{shard:05d}{index:0{digits}d}", image_root))
                except (OSError, ImageLoadError) as err:
                    raise ImageLoadError(image_root / record.path, f"cannot be written to {path}: {err}") from err
        write_json(out / f"{shard:05d}_stats.json", _stats(len(chunk), started), indent=2)
        paths.append(path)
    logger.info("%d training images written to %d shard(s) in %s", len(records), count, out)
    return paths


def _stats(count: int, started: float) -> dict[str, Any]:
    """img2dataset's per-shard statistics: every sample written is a success here."""
    ended = time.time()
    return {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
            "duration": ended - started, "start_time": started, "end_time": ended,
            "status_dict": {"success": count}}  # fmt: skip
