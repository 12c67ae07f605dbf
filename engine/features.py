"""Encoder features computed once, for runs whose frozen encoder sees every image the same way."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.datasets import ImageReader, Unreadable
from utils.checkpoint import atomic_save
from utils.precision import autocast

logger = logging.getLogger(__name__)


class _Images(Dataset):
    def __init__(self, reader: ImageReader, paths: list[str]) -> None:
        self.reader, self.paths = reader, paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Unreadable, int]:
        return self.reader.read(self.paths[index]), index


def _collate(items: list) -> tuple[torch.Tensor | None, list[int], dict[int, str]]:
    """(readable images stacked, their indices, {index: failure reason} of the others)."""
    good = [(image, index) for image, index in items if not isinstance(image, Unreadable)]
    failures = {index: image.reason for image, index in items if isinstance(image, Unreadable)}
    images = torch.stack([image for image, _ in good]) if good else None
    return images, [index for _, index in good], failures


def _cache_key(encoder: nn.Module, reader: ImageReader, paths: list[str]) -> str:
    """Digest of everything the features depend on: encoder weights, image root, transform, images."""
    digest = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(str(reader.image_root.resolve()).encode())
    digest.update(repr(reader.transform).encode())
    digest.update("\n".join(paths).encode())
    return digest.hexdigest()[:32]


@torch.no_grad()
def _encode_all(
    encoder: nn.Module,
    reader: ImageReader,
    paths: list[str],
    device: torch.device,
    batch_size: int,
    num_workers: int,
    precision: str,
    show_progress: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    # An own generator keeps the global RNG (and so the training run) the same with or without a cache hit.
    loader = DataLoader(
        _Images(reader, paths), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    features: dict[str, torch.Tensor] = {}
    failures: dict[str, str] = {}
    for images, indices, failed in tqdm(loader, desc="encoding images", disable=not show_progress, leave=False):
        failures.update({paths[i]: reason for i, reason in failed.items()})
        if images is None:
            continue
        with autocast(precision, device):
            out = encoder(images.to(device)).float().cpu()
        features.update({paths[i]: row for i, row in zip(indices, out, strict=True)})
    return features, failures


def cache_features(
    encoder: nn.Module,
    datasets: list[Any],
    device: torch.device,
    batch_size: int,
    num_workers: int,
    precision: str,
    is_main: bool = True,
    cache_dir: Path | None = None,
) -> None:
    """Encode every image of ``datasets`` once and make their readers return the features (N x C per
    image, kept on the CPU: images x tokens x width x 4 bytes of memory). Unreadable images stay missing,
    so the data sets skip them as before. With ``cache_dir`` the features are also stored there, keyed by
    the encoder weights, transform and image list (written by the main process), so that later runs
    (e.g. SCST after XE) reuse them."""
    encoder.eval()
    for dataset in datasets:
        reader: ImageReader = dataset.reader
        reader.features = None
        paths = dataset.image_paths()
        file = cache_dir / f"features_{_cache_key(encoder, reader, paths)}.pt" if cache_dir else None
        if file is not None and file.is_file():
            stored = torch.load(file, map_location="cpu", weights_only=True)
            features = dict(zip(stored["paths"], stored["features"], strict=True))
            failures = stored.get("failures", {})
            logger.info("encoder features of %d images read from %s", len(features), file)
        else:
            features, failures = _encode_all(
                encoder, reader, paths, device, batch_size, num_workers, precision, is_main
            )
            if file is not None and is_main:
                names = list(features)
                stacked = torch.stack([features[n] for n in names]) if names else torch.zeros(0)
                atomic_save({"paths": names, "features": stacked, "failures": failures}, file)
        reader.features = features
        reader.failures = failures
        logger.info("cached encoder features of %d images (%d unreadable)", len(features), len(paths) - len(features))
