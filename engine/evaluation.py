"""Caption a split with :func:`models.captioning.caption_batches` and score it with the COCO metrics."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils.data import DataLoader

from data.datasets import CaptionImageDataset, collate_images
from data.sampler import ShardedSampler
from data.shard_eval import ShardEvalData
from engine.preemption import LoaderBatches, ignore_stop_signals
from metrics.coco_eval import CaptionScorer, EvalReport, evaluate_results
from models.captioner import OPGCaptioner
from models.captioning import caption_batches
from models.decoding import DecodeOptions
from utils.distributed import DistInfo, gather_objects
from utils.io import ImageId
from utils.progress import progress

logger = logging.getLogger(__name__)


@torch.no_grad()
def generate_captions(
    model: OPGCaptioner,
    dataset: CaptionImageDataset,
    tokenizer: Any,
    options: DecodeOptions,
    dist: DistInfo,
    batch_size: int,
    num_workers: int = 0,
    precision: str = "fp32",
    desc: str = "captioning",
) -> dict[ImageId, str]:
    """Caption every readable image of ``dataset`` (files, or :class:`~data.shard_eval.ShardEvalData`),
    sharded over processes; every process gets all captions. Unreadable images are logged and left out."""
    loader = _loader(dataset, dist, batch_size, num_workers)
    local: dict[ImageId, str] = {}
    with LoaderBatches(loader) as batches:
        shown = progress(batches, desc=desc, disable=not dist.is_main, leave=False, total=len(loader))
        for batch, captions in caption_batches(model, shown, tokenizer, options, precision):
            for index, best in zip(batch.get("indices", []), captions, strict=True):
                local[dataset.ids[index]] = best[0].text
    merged: dict[ImageId, str] = {}
    for part in gather_objects(local):
        merged.update(part)
    return merged


def _loader(dataset: CaptionImageDataset | ShardEvalData, dist: DistInfo, batch_size: int, workers: int) -> DataLoader:
    """This process's share of the split: every ``world_size``-th image, or of shards every ``world_size``-th
    shard (at most one data-loader worker per shard)."""
    if isinstance(dataset, ShardEvalData):
        stream = dataset.stream(dist.rank, dist.world_size)
        sampler, workers = None, min(workers, len(stream.shards))
    else:
        stream, sampler = dataset, ShardedSampler(len(dataset), dist.rank, dist.world_size, shuffle=False, pad=False)
    return DataLoader(
        stream, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_images,
        generator=torch.Generator().manual_seed(0),  # leaves the training RNG untouched
        worker_init_fn=ignore_stop_signals,  # a stop signal to the job waits for the main process
    )  # fmt: skip


def score_split(
    captions: dict[ImageId, str],
    dataset: CaptionImageDataset,
    scorer: CaptionScorer,
    spice: bool,
    meteor: bool = True,
) -> EvalReport:
    """COCO metrics of ``captions`` against the split's references. Images that could not be read have
    no caption: they are reported (coverage) rather than silently ignored."""
    missing = len(dataset.references) - len(captions)
    if missing:
        logger.warning("%d of %d images could not be read and are not scored", missing, len(dataset))
    return evaluate_results(
        captions, dataset.references, allow_partial=missing > 0, spice=spice, scorer=scorer, meteor=meteor
    )
