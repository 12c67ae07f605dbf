"""Training samples streamed from WebDataset shards in img2dataset's layout (``data.train_shards``).

A sample is ``KEY.jpg`` (or ``jpeg``/``png``/``webp``) with its caption in ``KEY.json`` (``caption``: a string,
or a list of references) or ``KEY.txt``. Tar files are read sequentially by the ``webdataset`` library.

How an epoch is read (the plan is a pure function of the seed, the epoch and the process layout):

* Its length is ``data.train_samples``, else the sum of img2dataset's ``successes`` in the ``*_stats.json``
  files beside the shards. Every process takes ``samples // train.batch_size`` steps.
* The shards are shuffled by (seed, epoch) and dealt to the reading slots, one per (rank, data-loader
  worker), each to the slot that still needs the most samples, so that every sample is read by one process.
  A slot whose shards hold fewer samples than its steps need starts over on them (a few samples of the epoch
  are then read twice); samples beyond the steps' needs are left for the next epoch's order.
* Each slot shuffles its raw samples in a buffer seeded by (seed, epoch, slot), then decodes them.
* A run resumed at step ``k`` of an epoch skips, before decoding anything, the raw samples its slots handed
  out in the first ``k`` steps: it continues with the samples the uninterrupted run read next, as long as the
  number of processes and ``data.num_workers`` are the same.

Items are what :class:`~data.datasets.CaptionTrainDataset` yields, ``(image, caption)`` (for SCST: a
:class:`ShardImage` with the sample's references, the ``json``'s ``caption`` list), or
:class:`~utils.io.Unreadable` (an image that cannot be decoded, a sample without caption, and a shard that
cannot be read: counted by the training loop as today's unreadable images). A shard that cannot be read
stops the run unless ``data.on_bad_shard`` is ``skip`` (:func:`check_shard_failures`).
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data.datasets import draft_size_for, stack_inputs
from data.image_io import ImageLoadError, load_image_bytes
from data.shard_writer import require_webdataset
from data.text import clean_caption, strip_stop
from utils.io import DataFileError, Unreadable, split_unreadable

logger = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
BAD_SHARD = "unreadable shard"
NO_CAPTION = "no caption"
NO_IMAGE = "no image"


class ShardError(DataFileError):
    """A shard that cannot be read (missing, truncated, not a tar file); the message names it."""


# ----- the shard list and the epoch length -----------------------------------------------------------------
def expand_shards(spec: str) -> list[str]:
    """Shard files of ``spec``: brace notation (``cc3m/{00000..00331}.tar``), several specs joined by
    ``::`` (webdataset's list notation). Every file must exist."""
    wds = require_webdataset()
    shards = [str(Path(s).expanduser()) for s in wds.shardlists.expand_urls(spec)]
    missing = [s for s in shards if not Path(s).is_file()]
    if not shards or missing:
        raise ShardError(f"data.train_shards {spec!r}: {len(missing)} of {len(shards)} shard files not found "
                         f"(first: {missing[0] if missing else 'none given'})")  # fmt: skip
    return shards


def stats_path(shard: str) -> Path:
    """img2dataset's statistics file of a shard: ``00012.tar`` -> ``00012_stats.json``."""
    path = Path(shard)
    return path.with_name(path.name.split(".")[0] + "_stats.json")


def shard_sizes(shards: Sequence[str]) -> list[int] | None:
    """Samples per shard from img2dataset's ``*_stats.json`` (``successes``), or None if one is missing."""
    sizes = []
    for shard in shards:
        path = stats_path(shard)
        if not path.is_file():
            return None
        try:
            sizes.append(int(json.loads(path.read_text(encoding="utf-8"))["successes"]))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ShardError(f"{path}: expected img2dataset's statistics with 'successes' ({err})") from err
    return sizes


@dataclass
class ShardSet:
    """The shards of a training split, their sizes (None without statistics) and the samples per epoch."""

    shards: list[str]
    sizes: list[int] | None
    samples: int

    @classmethod
    def open(cls, spec: str, train_samples: int | None) -> ShardSet:
        shards = expand_shards(spec)
        sizes = shard_sizes(shards)
        if train_samples is None and sizes is None:
            raise ShardError(f"data.train_shards {spec!r}: no *_stats.json beside every shard (e.g. "
                             f"{stats_path(shards[0])}) to count the samples: give data.train_samples")  # fmt: skip
        samples = train_samples if train_samples is not None else sum(sizes or [])
        return cls(shards, sizes, samples)


# ----- the reading plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamPlan:
    """Which samples one process reads in one epoch: ``steps`` batches of ``batch`` items, from
    ``workers`` reading slots (data-loader workers; 0 reads in the process), skipping ``skip_steps``."""

    seed: int
    epoch: int
    rank: int
    world_size: int
    workers: int
    batch: int
    steps: int
    skip_steps: int = 0

    @property
    def slots_per_rank(self) -> int:
        return max(1, self.workers)

    def batches_of(self, local_slot: int, before: int | None = None) -> int:
        """Batches of the epoch (or of its first ``before`` steps) that slot ``local_slot`` of a rank
        delivers: the data loader takes batch ``i`` from worker ``i mod workers``."""
        end = self.steps if before is None else before
        per = self.slots_per_rank
        return max(0, (end - local_slot + per - 1) // per)


def assign_shards(plan: StreamPlan, sizes: Sequence[int]) -> list[list[int]]:
    """Shard indices per global slot (``rank * slots_per_rank + worker``): the shards in a (seed, epoch)
    order, each given to the slot that still needs the most samples (the first such slot on ties)."""
    order = list(range(len(sizes)))
    random.Random(f"shards:{plan.seed}:{plan.epoch}").shuffle(order)
    per = plan.slots_per_rank
    need = [plan.batches_of(slot % per) * plan.batch for slot in range(plan.world_size * per)]
    assigned: list[list[int]] = [[] for _ in need]
    for shard in order:
        slot = max(range(len(need)), key=lambda s: (need[s], -s))
        assigned[slot].append(shard)
        need[slot] -= sizes[shard]
    return assigned


def usable_workers(workers: int, shards: int, world_size: int) -> int:
    """Data-loader workers per process: at most one per shard of the process's share."""
    if shards < world_size:
        raise ShardError(f"{shards} shard(s) cannot feed {world_size} processes: write more, smaller shards "
                         "(--shard_size)")  # fmt: skip
    usable = min(workers, shards // world_size)
    if usable < workers:
        logger.warning("data.num_workers %d lowered to %d: %d shards over %d process(es) give each worker one "
                       "shard at least", workers, usable, shards, world_size)  # fmt: skip
    return usable


# ----- reading ---------------------------------------------------------------------------------------------
def read_shard(shard: str) -> Iterator[dict[str, Any]]:
    """Raw samples of one shard (webdataset's dicts of member bytes, with ``__key__`` and ``__url__``); a
    shard that cannot be read ends with a ``{"__bad__": reason}`` marker after the samples read before."""
    wds = require_webdataset()
    try:
        with open(shard, "rb") as stream:
            members = wds.tariterators.tar_file_iterator(stream)
            tagged = ({**member, "__url__": shard} for member in members)
            yield from wds.tariterators.group_by_keys(tagged)
    except Exception as err:  # any failure of the tar reader on a bad file must name the file, not end the run
        # webdataset appends " @ <stream object>" to the message; the shard is named already
        detail = str(err).splitlines()[0].split(" @ ")[0] if str(err) else "no message"
        reason = f"shard {shard} is truncated or unreadable ({type(err).__name__}: {detail})"
        yield {"__bad__": reason, "__url__": shard, "__key__": ""}


def _one_pass(shards: Sequence[str], counted: list[int]) -> Iterator[dict[str, Any]]:
    for shard in shards:
        for sample in read_shard(shard):
            counted[0] += 1
            yield sample


def slot_samples(shards: Sequence[str], rng: random.Random, buffer: int) -> Iterator[dict[str, Any]]:
    """The raw samples of a slot's shards, shuffled in a buffer of ``buffer`` samples, starting over when
    they run out. Each pass is shuffled on its own, so that a pass holds every sample once."""
    wds = require_webdataset()
    while shards:
        counted = [0]
        yield from wds.shuffle(buffer, buffer, rng=rng)(_one_pass(shards, counted))
        if not counted[0]:
            raise ShardError(f"shards {', '.join(shards)} hold no sample")


class ShardStream(IterableDataset):
    """One process's items of one epoch (:class:`StreamPlan`), decoded with ``transform``."""

    def __init__(self, shard_set: ShardSet, plan: StreamPlan, transform: Callable, max_words: int = 30,
                 shuffle_buffer: int = 1000, references: bool = False) -> None:  # fmt: skip
        self.shard_set, self.plan, self.transform = shard_set, plan, transform
        self.max_words, self.shuffle_buffer, self.references = max_words, shuffle_buffer, references
        self.draft_size = draft_size_for(transform)

    def raw_samples(self, worker: int) -> Iterator[dict[str, Any]]:
        """The raw samples data-loader worker ``worker`` hands out this epoch from the resume point on."""
        plan = self.plan
        local = (worker + plan.skip_steps) % plan.slots_per_rank  # batch k comes from the k-th worker
        slot = plan.rank * plan.slots_per_rank + local
        sizes = self.shard_set.sizes or [max(1, self.shard_set.samples // len(self.shard_set.shards))] * len(
            self.shard_set.shards
        )
        mine = [self.shard_set.shards[i] for i in assign_shards(plan, sizes)[slot]]
        rng = random.Random(f"buffer:{plan.seed}:{plan.epoch}:{slot}")
        shuffled = slot_samples(mine, rng, self.shuffle_buffer)
        skip = plan.batches_of(local, plan.skip_steps) * plan.batch
        take = plan.batches_of(local) * plan.batch
        return itertools.islice(shuffled, skip, take)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, str] | Unreadable]:
        info = get_worker_info()
        for sample in self.raw_samples(info.id if info is not None else 0):
            yield self.decode(sample)

    def decode(self, sample: dict[str, Any]) -> tuple[torch.Tensor, str] | ShardImage | Unreadable:
        """``(image 3 x R x R, cleaned caption)`` of a raw sample (a :class:`ShardImage` with ``references``),
        or :class:`Unreadable` saying why not."""
        if "__bad__" in sample:
            return Unreadable(sample["__url__"], BAD_SHARD, sample["__bad__"])
        name = f"{sample['__url__']}:{sample['__key__']}"
        captions = [c for c in sample_captions(sample) if strip_stop(clean_caption(c))]
        if not captions:
            return Unreadable(name, NO_CAPTION, f"{name}: no caption in its json or txt member")
        data = next((sample[k] for k in IMAGE_MEMBERS if k in sample), None)
        if data is None:
            return Unreadable(name, NO_IMAGE, f"{name}: no {'/'.join(IMAGE_MEMBERS)} member")
        try:
            image = load_image_bytes(data, name, draft_size=self.draft_size)
        except ImageLoadError as err:
            logger.warning("skipping image: %s", err)
            return Unreadable(name, err.kind, err.reason)
        # The augmentation's draws depend on (seed, epoch, key) alone: the same after a resume, whichever
        # worker reads the sample; the caller's random state is left as it was.
        seed = random.Random(f"augment:{self.plan.seed}:{self.plan.epoch}:{sample['__key__']}").getrandbits(63)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            image = self.transform(image)
        if self.references:
            cleaned = [strip_stop(clean_caption(c, self.max_words)) for c in captions]
            return ShardImage(image, sample_index(sample["__key__"]), cleaned)
        # Several references: one per epoch, drawn from (seed, epoch, key) so that resuming draws the same.
        pick = random.Random(f"caption:{self.plan.seed}:{self.plan.epoch}:{sample['__key__']}")
        return image, clean_caption(captions[pick.randrange(len(captions))], self.max_words)


class ShardImage(NamedTuple):
    """An SCST item: the image (3 x R x R), the number that seeds its samples, its cleaned references."""

    image: torch.Tensor
    index: int
    references: list[str]


def sample_index(key: str) -> int:
    """A sample's number for seeding: img2dataset's keys are numbers; other keys are hashed."""
    return int(key) if key.isdigit() else zlib.crc32(key.encode("utf-8"))


def collate_references(items: Sequence[ShardImage | Unreadable]) -> dict[str, Any]:
    """Batch SCST items: ``images`` B x 3 x R x R, ``indices`` and ``references`` (absent when no item could
    be read), plus the accounting of the unreadable ones (:func:`utils.io.split_unreadable`)."""
    good, batch = split_unreadable(items)
    if good:
        batch.update(stack_inputs([item.image for item in good]))
        batch["indices"] = [item.index for item in good]
        batch["references"] = [item.references for item in good]
    return batch


def sample_captions(sample: dict[str, Any]) -> list[str]:
    """The references of a raw sample: ``json``'s ``caption`` (a string or a list), else ``txt``."""
    if "json" in sample:
        try:
            caption = json.loads(sample["json"]).get("caption")
        except (ValueError, AttributeError):
            caption = None
        if isinstance(caption, str):
            return [caption]
        if isinstance(caption, list):
            return [c for c in caption if isinstance(c, str)]
    if "txt" in sample:
        return [sample["txt"].decode("utf-8", errors="replace")]
    return []


def check_shard_failures(batches: Iterable[dict[str, Any]], policy: str) -> Iterator[dict[str, Any]]:
    """Pass batches on; a shard that could not be read stops the run with its one-line reason (``error``)
    or is logged and counted (``skip``: the batch's ``skipped_why`` counts it)."""
    for batch in batches:
        for failure in batch.get("failures", []):
            if failure.kind != BAD_SHARD:
                continue
            if policy == "error":
                raise ShardError(f"{failure.reason}: stopping (--data.on_bad_shard skip leaves it out)")
            logger.warning("%s: skipped (data.on_bad_shard=skip)", failure.reason)
        yield batch


class ShardTrainData:
    """The training split in shards: its epoch length (``len``) and one :class:`ShardStream` per epoch
    and process. ``dropped`` is empty (shards have no annotation entries to leave out)."""

    def __init__(self, spec: str, train_samples: int | None, transform: Callable, max_words: int = 30,
                 shuffle_buffer: int = 1000, references: bool = False) -> None:  # fmt: skip
        self.shard_set = ShardSet.open(spec, train_samples)
        self.transform, self.max_words, self.shuffle_buffer = transform, max_words, shuffle_buffer
        self.references = references  # SCST: items carry their references (ShardImage)
        self.dropped: dict[str, int] = {}

    def __len__(self) -> int:
        return self.shard_set.samples

    def stream(self, plan: StreamPlan) -> ShardStream:
        return ShardStream(self.shard_set, plan, self.transform, self.max_words, self.shuffle_buffer,
                           self.references)  # fmt: skip
