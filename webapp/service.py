"""What the web page asks of the model: decoding settings checked, uploaded files turned into captions with
scores and the sparse mask's kept prefix positions.

Captions come from :func:`models.captioning.caption_batches`, the routine behind ``Captioner.caption``, so that
a single caption has its score too; images are read by :func:`data.image_io.load_image`, whose checks (format,
truncation, decode size) name what is wrong with a file. Nothing here knows about Gradio.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class Settings:
    """Decoding chosen in the page: ``beams`` only counts for beam search, ``temperature``, ``top_p`` and
    ``seed`` only for sampling."""

    method: str
    beams: int = 1
    num_captions: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise RequestError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        _check_range("beams", self.beams, 1, MAX_BEAMS, whole=True)
        _check_range("num_captions", self.num_captions, 1, MAX_CAPTIONS, whole=True)
        _check_range("temperature", self.temperature, 0.01, 10.0)
        _check_range("top_p", self.top_p, 0.01, 1.0)
        if self.seed is not None:
            _check_range("seed", self.seed, 0, 2**63 - 1, whole=True)
        if self.method == "greedy" and self.num_captions > 1:
            raise RequestError("greedy decoding gives one caption per image: choose beam search or sampling")
        if self.method == "beam" and self.num_captions > self.beams:
            count = self.num_captions
            raise RequestError(f"beam search returns one caption per beam: {count} captions need a beam size of "
                               f"at least {count}, got {self.beams}")  # fmt: skip

    def overrides(self) -> dict[str, Any]:
        """Keyword arguments of :func:`models.api.decode_options`."""
        if self.method == "sample":
            return {"method": "sample", "temperature": self.temperature, "top_p": self.top_p}
        if self.method == "beam":
            return {"method": "beam", "beams": self.beams}
        return {"method": "greedy"}


def _check_range(name: str, value: float, low: float, high: float, whole: bool = False) -> None:
    what = "a whole number" if whole else "a number"
    if isinstance(value, bool) or not isinstance(value, int | float) or (whole and value != int(value)):
        raise RequestError(f"{name} must be {what} from {low} to {high}, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"{name} must be {what} from {low} to {high}, got {value!r}")


@dataclass
class ImageResult:
    """One uploaded file: ``captions`` (best first) and, with a sparse mask, ``kept`` (P bools), or ``error``."""

    name: str
    path: Path
    captions: list[ScoredCaption] = field(default_factory=list)
    kept: list[bool] | None = None
    error: str | None = None
    image: Image.Image | None = field(default=None, repr=False)  # the decoded photo, for the page's previews

    def to_json(self) -> dict[str, Any]:
        """What a script calling the app receives for this file."""
        if self.error is not None:
            return {"name": self.name, "error": self.error}
        reply: dict[str, Any] = {"name": self.name, "captions": [
            {"text": c.text, "score": round(c.score, 4)} for c in self.captions]}  # fmt: skip
        if self.kept is not None:
            reply["kept"] = self.kept
        return reply


class CaptionService:
    """Captions uploaded files with one :class:`Captioner`; requests run one at a time (Gradio's queue)."""

    def __init__(self, captioner: Captioner, source: str, max_images: int = 16) -> None:
        self.captioner, self.source, self.max_images = captioner, source, max_images

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
        }

    def default_settings(self) -> Settings:
        """The model's saved decoding: beam search with its beam size, or greedy for one beam."""
        beams = self.captioner.decode_defaults.beams
        return Settings("beam" if beams > 1 else "greedy", beams=beams, num_captions=1)

    def caption(self, paths: Sequence[str | Path], settings: Settings) -> list[ImageResult]:
        """Per file, in order, its captions (and kept positions) or why it could not be read."""
        if not paths:
            raise RequestError("no image in the request: choose one or more photos")
        if len(paths) > self.max_images:
            raise RequestError(f"{len(paths)} images in one request: at most {self.max_images} (app.py --max_images)")
        results = [ImageResult(Path(path).name, Path(path)) for path in paths]
        images: list[Image.Image] = []
        readable: list[ImageResult] = []
        for result in results:
            result.image, result.error = read_upload(result.path, result.name, self.captioner.draft_size)
            if result.image is not None:
                images.append(result.image)
                readable.append(result)
        if images:
            captions = self._caption(images, settings)
            kept = self.captioner.kept_positions(images) if self.captioner.has_sparse_mask else None
            for i, result in enumerate(readable):
                result.captions = captions[i]
                result.kept = None if kept is None else kept[i].tolist()
        return results

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
    path: Path, name: str, draft_size: tuple[int, int] | None = None
) -> tuple[Image.Image | None, str | None]:
    """The uploaded file as an RGB image, or None and a one-line reason naming the file."""
    try:
        return load_image(path, draft_size=draft_size), None
    except ImageLoadError as err:
        return None, f"{name}: {err.reason}"
    except Exception as err:  # an untrusted file may trip any decoder bug: report it, keep serving
        logger.exception("unexpected error reading upload %r", name)
        return None, f"{name}: unreadable image ({type(err).__name__}: {err})"
