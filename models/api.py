"""Captioning from Python in two lines::

    from models import load_captioner
    captioner = load_captioner("runs/scst/best.pt")        # or an exported folder, or a Hub repo id
    captioner.caption(["a.jpg", pil_image], beams=3)       # -> ["a dog on a couch", ...]
    captioner.caption(images, num_captions=5)              # -> [[ScoredCaption(text, score), ...], ...]

Captions come from :func:`models.captioning.caption_batches`, the routine behind validation, the test
split, ``predict.py`` and SCST's greedy baseline.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.functional import to_pil_image

from data.datasets import draft_size_for
from data.image_io import load_image, to_rgb
from data.transforms import build_transform
from models.captioner import OPGCaptioner
from models.captioning import ScoredCaption, caption_batches
from models.config import DecodeConfig, SavedCaptionerConfig
from models.decoding import DecodeOptions, eval_mode
from models.mapper import MLPMapper
from models.pretrained import load_model
from models.tokenizer import load_tokenizer
from utils.distributed import resolve_device
from utils.precision import PRECISIONS, autocast, resolve_precision

ImageInput = str | os.PathLike | Image.Image | torch.Tensor


def load_captioner(source: str | Path, device: str = "auto", precision: str = "auto") -> Captioner:
    """A :class:`Captioner` for a training checkpoint (``.pt``), an exported folder or a Hub repository id.

    ``device``: auto (CUDA when present), cpu, cuda, cuda:N. ``precision``: auto (the run's evaluation
    precision: bf16 on CUDA unless the run used another; fp32 off CUDA), bf16, fp16 or fp32 (as asked, on
    the CPU too).
    """
    target = resolve_device(device)
    model, cfg = load_model(source, target)
    return Captioner(model, load_tokenizer(cfg.model.tokenizer), cfg, target, precision)


def resolve_run_precision(name: str, cfg: SavedCaptionerConfig, device: torch.device) -> str:
    """``auto`` -> the run's own ``train.precision`` (itself possibly auto) on CUDA, fp32 elsewhere (a run's
    reduced precision was chosen for its GPU); an explicit precision runs as asked (``resolve_precision``)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {name!r}")
    if name == "auto":
        return resolve_precision(cfg.precision, device) if device.type == "cuda" else "fp32"
    return resolve_precision(name, device)


def decode_options(decode_cfg: DecodeConfig, num_captions: int = 1, **overrides: object) -> DecodeOptions:
    """The saved decoding defaults with ``overrides`` (None values keep the default).

    ``method`` greedy or sample without ``beams`` means one beam; ``beams`` without ``method`` means
    beam search when > 1. ``num_captions`` > 1 samples that many captions with ``method='sample'``,
    otherwise returns the best ``num_captions`` beams (widening the default beam to at least that).
    Raises ValueError for contradictory or invalid settings.
    """
    values = {key: value for key, value in overrides.items() if value is not None}
    method, beams = values.get("method"), values.get("beams")
    if method in ("greedy", "sample") and beams is None:
        values["beams"] = 1
    if beams is not None and method is None:
        values["method"] = "beam" if beams > 1 else "greedy"
    if num_captions < 1:
        raise ValueError(f"num_captions must be >= 1, got {num_captions}")
    if num_captions > 1:
        if values.get("method") == "greedy":
            raise ValueError("greedy decoding gives one caption per image: use beam search or sampling")
        if values.get("method") == "sample":
            values["num_samples"] = num_captions
        else:
            values.update(method="beam", num_return=num_captions)
            values.setdefault("beams", max(decode_cfg.beams, num_captions))
    return DecodeOptions.from_config(decode_cfg, **values)


class Captioner:
    """A loaded model with its tokenizer, image transform, device and precision."""

    def __init__(
        self,
        model: OPGCaptioner,
        tokenizer: object,
        cfg: SavedCaptionerConfig,
        device: torch.device,
        precision: str = "auto",
    ) -> None:
        self.model, self.tokenizer, self.cfg, self.device = model, tokenizer, cfg, device
        self.precision = resolve_run_precision(precision, cfg, device)
        self.transform = build_transform(model.encoder.image_res, train=False)
        # image files decoded as evaluation and predict.py decode them (JPEGs at a reduced size)
        self.draft_size = draft_size_for(self.transform)

    @property
    def decode_defaults(self) -> DecodeConfig:
        """The saved decoding settings that :meth:`caption` starts from."""
        return self.cfg.decode

    def caption(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        num_captions: int = 1,
        method: str | None = None,
        beams: int | None = None,
        max_len: int | None = None,
        min_len: int | None = None,
        length_penalty: float | None = None,
        no_repeat_ngram: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        batch_size: int = 16,
    ) -> list[str] | list[list[ScoredCaption]]:
        """Caption images: paths, PIL images or RGB tensors (3 x H x W or B x 3 x H x W, float in [0, 1] or
        uint8), one or a sequence; they are resized and normalised like files at test time.

        ``method``: greedy, beam or sample (with ``temperature``, ``top_k``, ``top_p``, ``seed``); unset
        settings are the model's saved ones. Returns one caption per image, or with ``num_captions`` > 1
        that many :class:`ScoredCaption` per image, best first (the best beams, or scored samples).
        """
        options = decode_options(
            self.cfg.decode, num_captions, method=method, beams=beams, max_len=max_len, min_len=min_len,
            length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram, temperature=temperature,
            top_k=top_k, top_p=top_p,
        )  # fmt: skip
        generator = None
        if seed is not None and options.method == "sample":
            generator = torch.Generator(self.device).manual_seed(seed)
        batches = ({"images": batch} for batch in self._batches(images, batch_size))
        results: list[list[ScoredCaption]] = []
        for _, captions in caption_batches(self.model, batches, self.tokenizer, options, self.precision, generator):
            results += captions
        return [captions[0].text for captions in results] if num_captions == 1 else results

    @torch.no_grad()
    def kept_positions(self, images: ImageInput | Sequence[ImageInput], batch_size: int = 16) -> list[torch.Tensor]:
        """Per image, a bool tensor (P) of the prefix positions the sparse mask lets GPT-2 read (all True
        without a mask). See :attr:`spatial_grid` for which image region each position stands for."""
        kept = []
        with eval_mode(self.model), autocast(self.precision, self.device):
            for batch in self._batches(images, batch_size):
                kept += list(self.model.encode(batch).keep.cpu())
        return kept

    @property
    def has_sparse_mask(self) -> bool:
        return self.model.masks_prefix

    @property
    def spatial_grid(self) -> int | None:
        """Side G of the image grid behind the prefix: with the MLP mapper, position 0 reads the whole
        image (mean token) and position 1 + r * G + c the grid cell at row r, column c. None with the
        transformer mapper, whose prefix positions are learned queries, not image regions."""
        return self.model.encoder.grid_size if isinstance(self.model.mapper, MLPMapper) else None

    def _batches(self, images: ImageInput | Sequence[ImageInput], batch_size: int) -> Iterator[torch.Tensor]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        pending: list[torch.Tensor] = []
        for image in _as_pil_images(images, self.draft_size):
            pending.append(self.transform(image))
            if len(pending) == batch_size:
                yield torch.stack(pending).to(self.device)
                pending = []
        if pending:
            yield torch.stack(pending).to(self.device)


def _as_pil_images(
    images: ImageInput | Sequence[ImageInput], draft_size: tuple[int, int] | None = None
) -> Iterator[Image.Image]:
    """RGB PIL images from one input or a sequence of them (a 4-D tensor is a batch)."""
    if isinstance(images, str | os.PathLike | Image.Image) or (torch.is_tensor(images) and images.dim() == 3):
        images = [images]
    for image in images:
        if isinstance(image, str | os.PathLike):
            yield load_image(image, draft_size=draft_size)
        elif isinstance(image, Image.Image):
            yield to_rgb(image)
        elif torch.is_tensor(image):
            yield _tensor_to_pil(image)
        else:
            raise TypeError(f"cannot caption a {type(image).__name__}: give paths, PIL images or tensors")


def _tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """3 x H x W (or 1 x H x W) RGB tensor, uint8 or float in [0, 1], as a PIL image; floats are rounded
    so that a ``to_tensor``'d image comes back with its exact pixels."""
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image tensors must be 3 x H x W or 1 x H x W, got {list(image.shape)}")
    image = image.detach().cpu()
    if image.is_floating_point():
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    if image.dtype != torch.uint8:
        raise ValueError(f"image tensors must be uint8 or float in [0, 1], got {image.dtype}")
    return to_pil_image(image.expand(3, -1, -1))
