"""Images per second delivered to the model from WebDataset shards against the same images as JPEG files
named in a JSON list, with the same training transform, batch and data-loader workers, in one run; and the
memory of the shard pipeline (main process plus its workers) over several epochs.

The images are COCO-like (``benchmarks/coco_like.py``: real-size JPEGs cut from real COCO photos, 640 x 480
most often), one caption each; the shards are written by ``data.shard_writer`` (img2dataset's layout). Each
pipeline reads one whole epoch (every batch collated: images stacked, captions tokenised) while nothing else
consumes the batches, so the figure is the loader's delivery rate. The order alternates (files, shards) per
round and the best round of each counts.

    python benchmarks/bench_shards.py [--images 3000] [--workers 2] [--batch 30] [--rounds 1] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.coco_like import make_coco_like  # noqa: E402
from data.datasets import CaptionCollator, CaptionTrainDataset  # noqa: E402
from data.prepare_coco import ImageRecord  # noqa: E402
from data.sampler import ShardedSampler  # noqa: E402
from data.shard_writer import write_shards  # noqa: E402
from data.shards import ShardTrainData, StreamPlan  # noqa: E402
from data.transforms import build_transform  # noqa: E402
from models.tokenizer import load_tokenizer  # noqa: E402


def memory_mib(pid: int) -> tuple[float, float]:
    """(resident memory of ``pid``, proportional memory of ``pid`` and its children, the data-loader workers),
    MiB, from /proc: the proportional figure (PSS) shares the pages a forked worker shares with the main
    process between them, where adding the workers' resident memory would count those pages once per worker."""
    main = _field(pid, "status", "VmRSS:")
    return main, sum(_field(proc, "smaps_rollup", "Pss:") for proc in [pid, *_children(pid)])


def _field(pid: int, name: str, key: str) -> float:
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def timed(batches: Iterable[dict], memory: list[tuple[float, float]] | None = None) -> tuple[float, int]:
    """(seconds, images) to draw every batch; ``memory`` gets :func:`memory_mib` at every 10th batch."""
    started, images = time.perf_counter(), 0
    for step, batch in enumerate(batches):
        images += len(batch["images"])
        if memory is not None and step % 10 == 0:
            memory.append(memory_mib(os.getpid()))
    return time.perf_counter() - started, images


def make_data(root: Path, count: int) -> tuple[Path, Path, int]:
    """COCO-like images, a JSON list with one caption per image, and the same pairs in shards of
    ``count // 12`` samples (12 shards: 6 per worker of 2). Returns (image root, list, shard count)."""
    annotations = make_coco_like(root, count, 1, 1)
    first: dict[str, dict] = {}
    for entry in json.loads((annotations / "train.json").read_text()):
        first.setdefault(entry["image"], entry)
    listing = annotations / "train_one_caption.json"
    listing.write_text(json.dumps(list(first.values())))
    records = [ImageRecord(e["image"], e["image_id"], "train", [e["caption"]]) for e in first.values()]
    shards = write_shards(records, root, root / "shards", max(1, count // 12))
    return listing, root / "shards", len(shards)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of shards for the memory figures")
    parser.add_argument("--root", type=Path, help="data folder (default: a temporary one)")
    args = parser.parse_args(argv)
    root = args.root or Path(tempfile.mkdtemp(prefix="bench_shards_"))
    listing, shard_dir, shard_count = make_data(root, args.images)
    transform, collate = build_transform(224, train=True), CaptionCollator(load_tokenizer("gpt2"), 30)
    files = CaptionTrainDataset(listing, root, transform)
    shards = ShardTrainData(str(shard_dir / f"{{00000..{shard_count - 1:05d}}}.tar"), None, transform)
    steps = len(files) // args.batch

    def file_loader(epoch: int) -> DataLoader:
        sampler = ShardedSampler(len(files), seed=0, epoch=epoch)
        return DataLoader(files, args.batch, sampler=sampler, num_workers=args.workers, collate_fn=collate,
                          drop_last=True)  # fmt: skip

    def shard_loader(epoch: int) -> DataLoader:
        plan = StreamPlan(0, epoch, 0, 1, args.workers, args.batch, steps)
        return DataLoader(shards.stream(plan), args.batch, num_workers=args.workers, collate_fn=collate)

    best = {"files": 0.0, "shards": 0.0}
    for _ in range(args.rounds):
        for name, loader in (("files", file_loader(0)), ("shards", shard_loader(0))):
            seconds, images = timed(loader)
            best[name] = max(best[name], images / seconds)
            print(f"{name:>6}: {images} images in {seconds:.1f} s = {images / seconds:.1f} images/s")
    print(f"{args.images} images, {args.workers} workers, batch {args.batch}, training transform, "
          f"{shard_count} shards: shards / files = {best['shards'] / best['files']:.2f}")  # fmt: skip
    for epoch in range(args.epochs):
        memory: list[tuple[float, float]] = []
        timed(shard_loader(epoch), memory)
        rss, pss = zip(*memory, strict=True)
        print(f"shards epoch {epoch + 1}: main process resident {min(rss):.0f}-{max(rss):.0f} MiB; main + "
              f"workers proportional (PSS) {min(pss):.0f}-{max(pss):.0f} MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
