"""What the web page asks of the model: decoding settings read from form fields, uploaded files turned into
captions with scores and the sparse mask's kept prefix positions, one request at a time.

Captions come from :func:`models.captioning.caption_batches`, the routine behind ``Captioner.caption``, so that
a single caption has its score too; images are read by :func:`data.image_io.load_image`, whose checks (format,
truncation, decode size) name what is wrong with a file.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from data.image_io import ImageLoadError, load_image
from models.api import Captioner, decode_options
from models.captioning import ScoredCaption, caption_batches
from models.decoding import METHODS

logger = logging.getLogger(__name__)

MAX_BEAMS = 10
MAX_CAPTIONS = 10


class RequestError(ValueError):
    """A request the page can explain to its user (bad settings, no or too many images)."""


class BusyError(RuntimeError):
    """More requests are waiting than the queue holds."""


class RequestQueue:
    """Runs requests one at a time (they share one model, and torch already uses every core); up to
    ``max_waiting`` more wait their turn in arrival order of the lock, later ones are refused."""

    def __init__(self, max_waiting: int = 8) -> None:
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.max_waiting = max_waiting
        self._model_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._pending = 0  # running + waiting

    @contextmanager
    def slot(self) -> Iterator[None]:
        """Hold the model for the duration of the block; BusyError when the queue is full."""
        with self._count_lock:
            if self._pending > self.max_waiting:
                raise BusyError(f"busy: {self._pending} requests are running or waiting (at most "
                                f"{self.max_waiting} may wait); try again in a moment")  # fmt: skip
            self._pending += 1
        try:
            with self._model_lock:
                yield
        finally:
            with self._count_lock:
                self._pending -= 1


@dataclass(frozen=True)
class Settings:
    """Decoding chosen in the page: ``beams`` only counts for beam search, ``temperature``, ``top_p`` and
    ``seed`` only for sampling."""

    method: str
    beams: int
    num_captions: int
    temperature: float
    top_p: float
    seed: int | None

    def overrides(self) -> dict[str, Any]:
        """Keyword arguments of :func:`models.api.decode_options`."""
        if self.method == "sample":
            return {"method": "sample", "temperature": self.temperature, "top_p": self.top_p}
        if self.method == "beam":
            return {"method": "beam", "beams": self.beams}
        return {"method": "greedy"}


def parse_settings(form: Mapping[str, str], default_beams: int) -> Settings:
    """Settings from text fields; missing ones take the model's saved beam size and no truncation."""
    method = form.get("method", "beam" if default_beams > 1 else "greedy").strip()
    if method not in METHODS:
        raise RequestError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    seed_text = form.get("seed", "").strip()
    settings = Settings(
        method=method,
        beams=_number(form, "beams", int, default_beams, 1, MAX_BEAMS),
        num_captions=_number(form, "num_captions", int, 1, 1, MAX_CAPTIONS),
        temperature=_number(form, "temperature", float, 1.0, 0.01, 10.0),
        top_p=_number(form, "top_p", float, 1.0, 0.01, 1.0),
        seed=_number(form, "seed", int, 0, 0, 2**63 - 1) if seed_text else None,
    )
    if method == "greedy" and settings.num_captions > 1:
        raise RequestError("greedy decoding gives one caption per image: choose beam search or sampling")
    if method == "beam" and settings.num_captions > settings.beams:
        count = settings.num_captions
        raise RequestError(f"beam search returns one caption per beam: {count} captions need a beam size of at "
                           f"least {count}, got {settings.beams}")  # fmt: skip
    return settings


def _number(form: Mapping[str, str], name: str, kind: type, default: float, low: float, high: float) -> Any:
    text = form.get(name, "").strip()
    if not text:
        return default
    what = "a whole number" if kind is int else "a number"
    try:
        value = kind(text)
    except ValueError:
        raise RequestError(f"{name} must be {what} from {low} to {high}, got {text!r}") from None
    if not low <= value <= high:
        raise RequestError(f"{name} must be {what} from {low} to {high}, got {text!r}")
    return value


class CaptionService:
    """Captions uploads with one :class:`Captioner`, through a :class:`RequestQueue`."""

    def __init__(self, captioner: Captioner, source: str, max_images: int = 16, max_waiting: int = 8) -> None:
        self.captioner, self.source, self.max_images = captioner, source, max_images
        self.queue = RequestQueue(max_waiting)

    def info(self) -> dict[str, Any]:
        """What the page shows about the model and the defaults it starts from."""
        model = self.captioner.model
        return {
            "checkpoint": self.source,
            "device": str(self.captioner.device),
            "precision": self.captioner.precision,
            "default_beams": self.captioner.decode_defaults.beams,
            "sparse_mask": self.captioner.has_sparse_mask,
            "prefix_length": model.prefix_length,
            "grid": self.captioner.spatial_grid,
            "image_size": model.encoder.image_res,
            "max_images": self.max_images,
            "max_beams": MAX_BEAMS,
            "max_captions": MAX_CAPTIONS,
        }

    def caption(self, uploads: list[tuple[str, bytes]], form: Mapping[str, str]) -> dict[str, Any]:
        """``{"results": [...], "seconds": s}``: per upload, in order, its name and either ``captions``
        (``[{"text", "score"}]``, best first, plus ``kept``, the kept prefix positions, with a sparse mask)
        or ``error``, why the file could not be read."""
        settings = parse_settings(form, self.captioner.decode_defaults.beams)
        if not uploads:
            raise RequestError("no image in the request: choose one or more photos")
        if len(uploads) > self.max_images:
            raise RequestError(f"{len(uploads)} images in one request: at most {self.max_images} (app.py --max_images)")
        results: list[dict[str, Any]] = []
        images: list[Image.Image] = []
        with tempfile.TemporaryDirectory(prefix="opg-app-") as folder:
            for index, (name, data) in enumerate(uploads):
                image, error = read_upload(name, data, Path(folder) / f"upload{index}", self.captioner.draft_size)
                if image is None:
                    results.append({"name": name, "error": error})
                else:
                    results.append({"name": name})
                    images.append(image)
        started = time.perf_counter()
        if images:
            with self.queue.slot():
                captions = self._caption(images, settings)
                kept = self.captioner.kept_positions(images) if self.captioner.has_sparse_mask else None
            readable = [result for result in results if "error" not in result]
            for i, result in enumerate(readable):
                result["captions"] = [{"text": c.text, "score": round(c.score, 4)} for c in captions[i]]
                if kept is not None:
                    result["kept"] = kept[i].tolist()
        return {"results": results, "seconds": round(time.perf_counter() - started, 3)}

    def _caption(self, images: list[Image.Image], settings: Settings) -> list[list[ScoredCaption]]:
        captioner = self.captioner
        try:
            options = decode_options(captioner.decode_defaults, settings.num_captions, **settings.overrides())
        except ValueError as err:
            raise RequestError(str(err)) from None
        generator = None
        if settings.seed is not None and options.method == "sample":
            generator = torch.Generator(captioner.device).manual_seed(settings.seed)
        batch = {"images": torch.stack([captioner.transform(image) for image in images])}
        [(_, captions)] = caption_batches(
            captioner.model, [batch], captioner.tokenizer, options, captioner.precision, generator
        )
        return captions


def read_upload(
    name: str, data: bytes, path: Path, draft_size: tuple[int, int] | None = None
) -> tuple[Image.Image | None, str | None]:
    """The uploaded file as an RGB image, or None and a one-line reason naming the file."""
    path.write_bytes(data)
    try:
        return load_image(path, draft_size=draft_size), None
    except ImageLoadError as err:
        return None, f"{name}: {err.reason}"
    except Exception as err:  # an untrusted file may trip any decoder bug: report it, keep serving
        logger.exception("unexpected error reading upload %r", name)
        return None, f"{name}: unreadable image ({type(err).__name__}: {err})"
