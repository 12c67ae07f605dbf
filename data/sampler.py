"""Deterministic, resumable sharding of a data set over processes."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ShardedSampler(Sampler[int]):
    """Indices of one process for one epoch.

    Training order is a permutation seeded by ``(seed, epoch)``, padded by wrapping so that every process
    gets the same number of items, and dealt round-robin. ``skip`` drops this process's first items, so a
    run resumed mid-epoch continues with exactly the batches it had not seen. Without ``shuffle`` (and
    ``pad``), the order is the data set's and nothing is repeated, as evaluation needs.
    """

    def __init__(
        self,
        length: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        skip: int = 0,
        pad: bool = True,
    ) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size
        self.shuffle, self.seed, self.epoch, self.skip, self.pad = shuffle, seed, epoch, skip, pad

    def _indices(self) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        if self.pad and self.length % self.world_size:
            extra = self.world_size - self.length % self.world_size
            order += order[:extra]
        return order[self.rank :: self.world_size][self.skip :]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())
