"""A validation split read from WebDataset shards (``data.val_shards``), e.g. a held-out part of a web-scale
data set, in place of ``data.val_file``.

Set-up reads the text members of every shard once (no image is decoded) for the image ids (the ``json``'s
``image_id``, else the sample key) and the references (``json`` ``caption``, a string or a list, else
``txt``). Captioning then streams the images: shard ``i`` goes to process ``i mod processes`` and, within
it, to data-loader worker ``j mod workers`` by its place ``j`` in the process's share, so that every image
is captioned once. A shard that cannot be read stops the set-up with its name.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data.datasets import draft_size_for
from data.image_io import ImageLoadError, load_image_bytes
from data.shards import IMAGE_MEMBERS, NO_IMAGE, ShardError, expand_shards, read_shard, sample_captions
from utils.io import ImageId, Unreadable, normalise_image_id

logger = logging.getLogger(__name__)


def sample_image_id(sample: dict[str, Any]) -> ImageId:
    """The ``json``'s ``image_id`` when it has one (``data.prepare_* --shards`` writes it), else the key."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else {}
    except ValueError:
        meta = {}
    value = meta.get("image_id") if isinstance(meta, dict) else None
    return normalise_image_id(value if value is not None else sample["__key__"])


class ShardEvalData:
    """Validation images in shards: ``ids`` (one per sample with a caption, in shard order), ``references``
    (image id -> raw reference captions) and :meth:`stream` per process, as
    :class:`~data.datasets.CaptionImageDataset` offers them for files."""

    def __init__(self, spec: str, transform: Callable) -> None:
        self.shards = expand_shards(spec)
        self.transform = transform
        self.ids: list[ImageId] = []
        self.references: dict[ImageId, list[str]] = {}
        self.index: dict[tuple[str, str], int] = {}  # (shard, key) -> position in ids
        self.per_shard: dict[str, int] = dict.fromkeys(self.shards, 0)
        without = 0
        for sample in (s for shard in self.shards for s in read_shard(shard)):
            if "__bad__" in sample:
                raise ShardError(f"data.val_shards: {sample['__bad__']}")
            references = [c.strip() for c in sample_captions(sample) if c.strip()]
            if not references:
                without += 1
                continue
            self._add(sample, references)
        if without:
            logger.warning("data.val_shards: %d samples without a caption left out", without)
        if not self.ids:
            raise ShardError(f"data.val_shards {spec!r}: no sample with a caption")

    def _add(self, sample: dict[str, Any], references: list[str]) -> None:
        image_id = sample_image_id(sample)
        if image_id in self.references:
            raise ShardError(f"data.val_shards: image id {image_id!r} appears twice (again in {sample['__url__']})")
        self.index[(sample["__url__"], sample["__key__"])] = len(self.ids)
        self.ids.append(image_id)
        self.references[image_id] = references
        self.per_shard[sample["__url__"]] += 1

    def __len__(self) -> int:
        return len(self.ids)

    def shards_of(self, rank: int, world_size: int) -> list[str]:
        return self.shards[rank::world_size]

    def stream(self, rank: int, world_size: int) -> ShardEvalStream:
        return ShardEvalStream(self, self.shards_of(rank, world_size))


class ShardEvalStream(IterableDataset):
    """``(image 3 x R x R, index into ids)`` items of some shards, or :class:`~utils.io.Unreadable`."""

    def __init__(self, data: ShardEvalData, shards: list[str]) -> None:
        self.data, self.shards = data, shards
        self.draft_size = draft_size_for(data.transform)

    def __len__(self) -> int:
        return sum(self.data.per_shard[s] for s in self.shards)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int] | Unreadable]:
        info = get_worker_info()
        mine = self.shards if info is None else self.shards[info.id :: info.num_workers]
        for sample in (s for shard in mine for s in read_shard(shard)):
            index = self.data.index.get((sample["__url__"], sample.get("__key__", "")))
            if index is not None:  # samples without caption (and a shard's end marker) have none
                yield self._decode(sample, index)

    def _decode(self, sample: dict[str, Any], index: int) -> tuple[torch.Tensor, int] | Unreadable:
        name = f"{sample['__url__']}:{sample['__key__']}"
        data = next((sample[k] for k in IMAGE_MEMBERS if k in sample), None)
        if data is None:
            return Unreadable(name, NO_IMAGE, f"{name}: no {'/'.join(IMAGE_MEMBERS)} member")
        try:
            return self.data.transform(load_image_bytes(data, name, draft_size=self.draft_size)), index
        except ImageLoadError as err:
            logger.warning("skipping image: %s", err)
            return Unreadable(name, err.kind, err.reason)
