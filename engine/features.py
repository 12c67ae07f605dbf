"""Encoder features computed once, for runs whose frozen encoder sees every image the same way.

The features live on disk in a :class:`FeatureStore` folder and are read through a memory map, so host
memory does not grow with the data set (COCO: 123k images x 50 x 1024 in half precision = 12.6 GB of file,
not of RAM). The folder is named by a digest of everything the features depend on (encoder weights, image
root, transform, image list, storage dtype), so later runs (SCST after XE, a restarted job) reuse it.

Writing is resumable: images are encoded in batches, their rows written in place, and a status byte per
image (0 = to do, 1 = done, 2 = unreadable) is written only after the rows have reached the disk, so an
interrupted build continues where it stopped. The processes of one node share the work: local rank 0
creates the folder, every local rank encodes its share of the missing batches into the same files, and
after a barrier all of them read the finished store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from data.datasets import ImageFiles, ImageReader, collate_images
from engine.config import FEATURE_CACHE_DTYPES
from utils import distributed
from utils.io import install_folder, read_json, staged_folder, write_json
from utils.precision import autocast
from utils.progress import progress

logger = logging.getLogger(__name__)

TODO, DONE, UNREADABLE = 0, 1, 2
_META, _DATA, _STATUS = "meta.json", "features.bin", "status.bin"
_FAILURES = "failures_{rank}.json"  # why each unreadable image could not be read, per encoding rank
_COMMIT_EVERY = 2048  # images between flushes of the status bytes (and of the rows before them)


class FeatureStore(Mapping[str, torch.Tensor]):
    """Read side of a finished store: ``store[path]`` is that image's features, float32 N x C, read from
    the memory-mapped file; unreadable images are absent (``store.get(path)`` is None)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        meta = read_json(self.directory / _META)
        self.paths: list[str] = meta["paths"]
        self.shape: tuple[int, int] = tuple(meta["shape"])
        self.dtype = np.dtype(meta["dtype"])
        self._row = {path: i for i, path in enumerate(self.paths)}
        self._data: np.ndarray | None = None
        self._status: np.ndarray | None = None

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        # Opened lazily, so that a store handed to DataLoader workers maps the file in each of them.
        if self._data is None or self._status is None:
            shape = (len(self.paths), *self.shape)
            self._data = np.memmap(self.directory / _DATA, dtype=self.dtype, mode="r", shape=shape)
            self._status = np.fromfile(self.directory / _STATUS, dtype=np.uint8)
        return self._data, self._status

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None, "_status": None}

    def __getitem__(self, path: str) -> torch.Tensor:
        data, status = self._arrays()
        row = self._row[path]
        if status[row] != DONE:
            raise KeyError(path)
        return torch.from_numpy(np.array(data[row])).float()

    def __len__(self) -> int:
        return int((self._arrays()[1] == DONE).sum())

    def __iter__(self) -> Iterator[str]:
        status = self._arrays()[1]
        return (path for path, s in zip(self.paths, status, strict=True) if s == DONE)

    def is_complete(self) -> bool:
        return bool((self._arrays()[1] != TODO).all())

    def failures(self) -> dict[str, str]:
        """Image path -> why it could not be read, for the unreadable images."""
        reasons: dict[str, str] = {}
        for file in sorted(self.directory.glob(_FAILURES.format(rank="*"))):
            reasons.update(read_json(file))
        return reasons


def cache_key(encoder: nn.Module, reader: ImageReader, paths: Sequence[str], dtype: str) -> str:
    """Digest of everything the features depend on: encoder weights, image root, transform and JPEG draft
    size, images, dtype."""
    digest = hashlib.sha256()
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(str(reader.image_root.resolve()).encode())
    digest.update(f"{reader.transform!r} draft {reader.draft_size}".encode())
    digest.update("\n".join(paths).encode())
    digest.update(dtype.encode())
    return digest.hexdigest()[:32]


def create_store(directory: Path, paths: Sequence[str], shape: tuple[int, int], dtype: str) -> None:
    """Lay out an empty store (sparse feature file, all status bytes 0) unless ``directory`` exists.

    Built in a temporary sibling folder and renamed, so that a reader never sees half a layout and two
    creators (e.g. nodes sharing a file system) cannot clobber each other."""
    if directory.exists():
        return
    meta = {"version": 1, "paths": list(paths), "shape": list(shape), "dtype": dtype}
    with staged_folder(directory) as staging:
        write_json(staging / _META, meta)
        with open(staging / _DATA, "wb") as file:
            file.truncate(len(paths) * shape[0] * shape[1] * np.dtype(dtype).itemsize)
        with open(staging / _STATUS, "wb") as file:
            file.truncate(len(paths))
        if not install_folder(staging, directory) and not (directory / _META).is_file():
            raise FileExistsError(f"{directory} appeared while laying out a feature store and is not one")


def pending_batches(status: np.ndarray, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's share of the fixed batches (``batch_size`` consecutive images) that are not done yet.

    The batches are the same whichever run or rank encodes them, so the features do not depend on when
    the build was interrupted or how many processes share it."""
    starts = range(rank * batch_size, len(status), world * batch_size)  # shares fixed whatever is done
    batches = [list(range(i, min(i + batch_size, len(status)))) for i in starts]
    return [b for b in batches if (status[b] == TODO).any()]


@torch.no_grad()
def encode_into_store(
    encoder: nn.Module,
    reader: ImageReader,
    directory: Path,
    device: torch.device,
    batch_size: int,
    num_workers: int = 0,
    precision: str = "fp32",
    rank: int = 0,
    world: int = 1,
    show_progress: bool = False,
    commit_every: int = _COMMIT_EVERY,
) -> int:
    """Encode this rank's share of the missing images of the store in ``directory``; returns how many
    batches it encoded. Rows are written first, status bytes after them (every ``commit_every`` images
    and at the end), so an interruption at any point loses at most the uncommitted batches."""
    store = FeatureStore(directory)
    status = np.fromfile(directory / _STATUS, dtype=np.uint8)
    batches = pending_batches(status, batch_size, rank, world)
    if not batches:
        return 0
    row_bytes = store.shape[0] * store.shape[1] * store.dtype.itemsize
    # An own generator keeps the global RNG (and so the training run) the same with or without a cache hit.
    loader = DataLoader(
        ImageFiles(reader, store.paths), batch_sampler=batches, num_workers=num_workers,
        collate_fn=collate_images, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    data_fd = os.open(directory / _DATA, os.O_WRONLY)
    status_fd = os.open(directory / _STATUS, os.O_WRONLY)
    failures_file = directory / _FAILURES.format(rank=rank)
    reasons: dict[str, str] = read_json(failures_file) if failures_file.is_file() else {}
    pending: dict[int, int] = {}
    try:
        bar = progress(zip(batches, loader, strict=True), desc="encoding images", disable=not show_progress,
                       leave=False, total=len(batches))  # fmt: skip
        for indices, batch in bar:
            if "images" in batch:
                _write_rows(encoder, batch, data_fd, row_bytes, store.dtype, device, precision)
            pending.update({i: UNREADABLE for i in indices} | {i: DONE for i in batch.get("indices", [])})
            reasons.update({failure.path: failure.kind for failure in batch["failures"]})
            if len(pending) >= commit_every:
                write_json(failures_file, reasons)  # before the status bytes that refer to it
                _commit(data_fd, status_fd, pending)
        write_json(failures_file, reasons)
        _commit(data_fd, status_fd, pending)
    finally:
        os.close(data_fd)
        os.close(status_fd)
    return len(batches)


def _write_rows(
    encoder: nn.Module,
    batch: dict[str, Any],
    data_fd: int,
    row_bytes: int,
    dtype: np.dtype,
    device: torch.device,
    precision: str,
) -> None:
    """Encode the batch's images (B x 3 x R x R) and write each one's features (N x C) at its row."""
    with autocast(precision, device):
        out = encoder(batch["images"].to(device)).float().cpu().numpy().astype(dtype)
    for index, row in zip(batch["indices"], out, strict=True):
        os.pwrite(data_fd, row.tobytes(), index * row_bytes)


def _commit(data_fd: int, status_fd: int, pending: dict[int, int]) -> None:
    """Make the written rows durable, then mark them done."""
    os.fdatasync(data_fd)
    for index, value in pending.items():
        os.pwrite(status_fd, bytes([value]), index)
    pending.clear()


def _feature_shape(encoder: nn.Module, device: torch.device) -> tuple[int, int]:
    res = encoder.image_res
    with torch.no_grad():
        out = encoder(torch.zeros(1, 3, res, res, device=device))
    return tuple(out.shape[1:])


def open_store(
    encoder: nn.Module,
    reader: ImageReader,
    paths: Sequence[str],
    cache_dir: Path,
    dtype: str,
    device: torch.device,
    batch_size: int,
    num_workers: int,
    precision: str,
    local_rank: int = 0,
    local_world: int = 1,
    show_progress: bool = False,
) -> FeatureStore:
    """The finished store of ``paths`` under ``cache_dir``, built (or its build resumed) first if needed.

    Every process of the job calls this: with ``local_world`` > 1 the processes of a node split the
    encoding and meet at barriers, so all of them must call it with the same arguments."""
    if dtype not in FEATURE_CACHE_DTYPES:
        raise ValueError(f"data.feature_cache_dtype must be one of {FEATURE_CACHE_DTYPES}, got {dtype!r}")
    directory = cache_dir / f"features_{cache_key(encoder, reader, paths, dtype)}"
    if local_rank == 0 and not directory.exists():
        create_store(directory, paths, _feature_shape(encoder, device), dtype)
    distributed.barrier()
    if not FeatureStore(directory).is_complete():
        done = encode_into_store(encoder, reader, directory, device, batch_size, num_workers, precision,
                                 local_rank, local_world, show_progress)  # fmt: skip
        logger.info("encoded %d batches of images into %s", done, directory)
    distributed.barrier()  # unconditional: a rank with no share may see the store complete early
    store = FeatureStore(directory)
    if not store.is_complete():
        raise RuntimeError(f"feature store {directory} is incomplete after encoding: was a process stopped?")
    return store


def _remove_if_owner(directory: Path, owner: int) -> None:
    # DataLoader workers are forks holding a copy of the store: only the process that made it cleans up.
    if os.getpid() == owner:
        shutil.rmtree(directory, ignore_errors=True)


def cache_features(
    encoder: nn.Module,
    datasets: list[Any],
    device: torch.device,
    batch_size: int,
    num_workers: int,
    precision: str,
    dist: distributed.DistInfo | None = None,
    cache_dir: Path | None = None,
    dtype: str = "float16",
) -> None:
    """Encode every image of ``datasets`` once and make their readers return the features (N x C per
    image) from a memory-mapped :class:`FeatureStore`. Unreadable images stay missing, so the data sets
    skip them as before. With ``cache_dir`` the store is kept there and shared by the processes of a node
    and by later runs; without, each process builds a private one in a temporary folder."""
    encoder.eval()
    shared = cache_dir is not None
    rank, world = (dist.local_rank, distributed.local_world_size()) if shared and dist else (0, 1)
    show = dist is None or dist.is_main
    for dataset in datasets:
        reader: ImageReader = dataset.reader
        reader.features = None
        paths = dataset.image_paths()
        directory = cache_dir if shared else Path(tempfile.mkdtemp(prefix="opg_features_"))
        store = open_store(encoder, reader, paths, directory, dtype, device, batch_size, num_workers,
                           precision, rank, world, show)  # fmt: skip
        if not shared:
            weakref.finalize(store, _remove_if_owner, directory, os.getpid())
        reader.features = store
        reader.failures = store.failures()
        logger.info("encoder features of %d images in %s (%d unreadable)", len(store), store.directory,
                    len(paths) - len(store))  # fmt: skip
