"""Encoder features computed once, for runs whose frozen encoder sees every image the same way."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.datasets import ImageReader
from utils.precision import autocast

logger = logging.getLogger(__name__)


class _Images(Dataset):
    def __init__(self, reader: ImageReader, paths: list[str]) -> None:
        self.reader, self.paths = reader, paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        image = self.reader.read(self.paths[index])
        return None if image is None else (image, index)


def _collate(items: list) -> tuple[torch.Tensor, list[int]] | None:
    good = [item for item in items if item is not None]
    if not good:
        return None
    return torch.stack([image for image, _ in good]), [index for _, index in good]


@torch.no_grad()
def cache_features(
    encoder: nn.Module,
    datasets: list[Any],
    device: torch.device,
    batch_size: int,
    num_workers: int,
    precision: str,
    show_progress: bool = True,
) -> None:
    """Encode every image of ``datasets`` once and make their readers return the features (N x C per
    image, kept on the CPU: images x tokens x width x 4 bytes of memory). Unreadable images stay missing,
    so the data sets skip them as before."""
    encoder.eval()
    for dataset in datasets:
        reader: ImageReader = dataset.reader
        paths = dataset.image_paths()
        loader = DataLoader(
            _Images(reader, paths), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
        )
        features: dict[str, torch.Tensor] = {}
        for batch in tqdm(loader, desc="encoding images", disable=not show_progress, leave=False):
            if batch is None:
                continue
            images, indices = batch
            with autocast(precision, device):
                out = encoder(images.to(device)).float().cpu()
            features.update({paths[i]: row for i, row in zip(indices, out, strict=True)})
        reader.features = features
        logger.info("cached encoder features of %d images (%d unreadable)", len(features), len(paths) - len(features))
