"""Karpathy-split caption data sets (the annotation format of X-VLM, BLIP and the reference code)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision import transforms

from data.image_io import ImageLoadError, load_image
from data.text import IGNORE_INDEX, clean_caption, strip_stop
from utils.io import (
    DataFileError,
    ImageId,
    Unreadable,
    image_id_from_path,
    normalise_image_id,
    read_json,
    split_unreadable,
)

logger = logging.getLogger(__name__)


def read_annotations(path: str | Path, split: str) -> list[dict[str, Any]]:
    """Read an annotation list; every entry needs ``image`` and ``caption`` (a string for train, a list of
    references for val/test)."""
    try:
        entries = read_json(path)
    except DataFileError as err:
        raise DataFileError(f"{split} annotations: {err}") from err
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{split} annotations {path} must be a non-empty JSON list")
    want = str if split == "train" else list
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "image" not in entry or not isinstance(entry.get("caption"), want):
            raise ValueError(
                f"{split} annotations {path}, entry {i}: expected {{'image': path, 'caption': "
                f"{'str' if split == 'train' else '[references]'}}}, got {str(entry)[:120]}"
            )
    return entries


class ImageReader:
    """Reads and transforms an image by its annotation path, or returns its precomputed encoder features
    when ``features`` holds them (a frozen encoder without augmentation sees every image identically)."""

    def __init__(self, image_root: str | Path, transform: Callable) -> None:
        self.image_root = Path(image_root)
        self.transform = transform
        self.draft_size = draft_size_for(transform)
        self.features: Mapping[str, torch.Tensor] | None = None
        self.failures: dict[str, str] = {}  # image path -> why it could not be read, when features were cached

    def read(self, relative: str) -> torch.Tensor | Unreadable:
        """Image 3 x R x R (or features N x C), or :class:`Unreadable` saying why not (logged)."""
        if self.features is not None:
            found = self.features.get(relative)
            if found is not None:
                return found
            kind = self.failures.get(relative, "unreadable")
            return Unreadable(relative, kind, kind)
        try:
            return self.transform(load_image(self.image_root / relative, draft_size=self.draft_size))
        except ImageLoadError as err:
            logger.warning("skipping image: %s", err)
            return Unreadable(relative, err.kind, err.reason)


class ImageFiles(Dataset):
    """One item per image path (relative to the reader's root, or absolute): ``(image 3 x R x R, index)``, or
    :class:`~utils.io.Unreadable`; :func:`collate_images` batches them. The one way images are read
    for captioning: validation, the test split, feature caching and ``predict.py``."""

    def __init__(self, reader: ImageReader, paths: Sequence[str]) -> None:
        self.reader = reader
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def image_paths(self) -> list[str]:
        return list(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | Unreadable:
        image = self.reader.read(self.paths[index])
        return image if isinstance(image, Unreadable) else (image, index)


def drop_empty_captions(entries: list[dict[str, Any]], ann_file: str | Path) -> list[dict[str, Any]]:
    """Training entries whose caption has a word once cleaned; the others are logged and left out."""
    kept = [e for e in entries if strip_stop(clean_caption(e["caption"]))]
    if len(kept) < len(entries):
        logger.warning("%s: %d training entries with an empty caption left out", ann_file, len(entries) - len(kept))
    if not kept:
        raise ValueError(f"train annotations {ann_file}: every caption is empty")
    return kept


def draft_size_for(transform: Callable) -> tuple[int, int] | None:
    """(width, height) a JPEG may be decoded down to for ``transform``: its output size when it starts by
    resizing the whole image to a fixed size (the test transform), else None (crops need the full image)."""
    first = transform.transforms[0] if isinstance(transform, transforms.Compose) and transform.transforms else None
    if isinstance(first, transforms.Resize) and isinstance(first.size, Sequence) and len(first.size) == 2:
        return int(first.size[1]), int(first.size[0])
    return None


class CaptionTrainDataset(Dataset):
    """One item per (image, caption) pair: ``(image 3 x R x R, cleaned caption)``, or
    :class:`~utils.io.Unreadable` when the image cannot be read (the collator drops it and counts it)."""

    def __init__(self, ann_file: str | Path, image_root: str | Path, transform: Callable, max_words: int = 30):
        entries = read_annotations(ann_file, "train")
        self.entries = drop_empty_captions(entries, ann_file)
        self.dropped = {"empty caption": len(entries) - len(self.entries)}
        self.reader = ImageReader(image_root, transform)
        self.max_words = max_words

    def __len__(self) -> int:
        return len(self.entries)

    def image_paths(self) -> list[str]:
        return list(dict.fromkeys(e["image"] for e in self.entries))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str] | Unreadable:
        entry = self.entries[index]
        image = self.reader.read(entry["image"])
        if isinstance(image, Unreadable):
            return image
        return image, clean_caption(entry["caption"], self.max_words)


class CaptionImageDataset(ImageFiles):
    """One item per image of an annotation file: ``(image 3 x R x R, index)``, or
    :class:`~utils.io.Unreadable`. ``references`` holds the raw reference captions per image, ``ids`` the
    COCO image ids."""

    def __init__(self, ann_file: str | Path, image_root: str | Path, transform: Callable, split: str):
        entries = read_annotations(ann_file, split)
        self.dropped: dict[str, int] = {}
        if split == "train":
            kept = drop_empty_captions(entries, ann_file)
            self.dropped["empty caption"] = len(entries) - len(kept)
            entries = group_by_image(kept)
        self.entries = entries
        super().__init__(ImageReader(image_root, transform), [e["image"] for e in entries])
        self.ids: list[ImageId] = [
            normalise_image_id(e["image_id"]) if "image_id" in e else image_id_from_path(e["image"])
            for e in self.entries
        ]
        self.references = {i: e["caption"] for i, e in zip(self.ids, self.entries, strict=True)}
        if len(self.references) != len(self.entries):
            raise ValueError(f"{split} annotations {ann_file} list the same image id more than once")


def group_by_image(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Training entries (one per caption) -> one entry per image with its list of captions."""
    grouped: dict[str, list[str]] = {}
    for entry in entries:
        grouped.setdefault(entry["image"], []).append(entry["caption"])
    return [{"image": image, "caption": captions} for image, captions in grouped.items()]


class CaptionCollator:
    """Batch ``(image, caption)`` items: images B x 3 x R x R, ``input_ids`` B x T right-padded,
    ``labels`` with -100 on padding, and the unreadable items dropped (:func:`utils.io.split_unreadable`)."""

    def __init__(self, tokenizer: Any, max_tokens: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.pad_id = tokenizer.eos_token_id

    def __call__(self, items: Sequence[tuple[torch.Tensor, str] | Unreadable]) -> dict[str, Any]:
        good, batch = split_unreadable(items)
        if not good:
            return batch
        ids = [self.tokenizer.encode(caption)[: self.max_tokens] for _, caption in good]
        width = max(len(seq) for seq in ids)
        input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            labels[row, : len(seq)] = torch.tensor(seq)
        batch.update(images=torch.stack([image for image, _ in good]), input_ids=input_ids, labels=labels)
        return batch


def collate_images(items: Sequence[tuple[torch.Tensor, int] | Unreadable]) -> dict[str, Any]:
    """Batch ``(image, index)`` items: ``images`` B x 3 x R x R stacked and ``indices`` (both absent when no
    item could be read), plus the accounting of the unreadable ones (:func:`utils.io.split_unreadable`)."""
    good, batch = split_unreadable(items)
    if good:
        batch["images"] = torch.stack([image for image, _ in good])
        batch["indices"] = [index for _, index in good]
    return batch
