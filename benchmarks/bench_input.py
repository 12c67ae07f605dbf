"""Where a data-loader worker's time goes: JPEG decode, each transform step, collation.

Runs in one process with one thread, as a DataLoader worker does, over real-size JPEGs: a COCO-like set
(``benchmarks/coco_like.py``: crops of real COCO photos at COCO's usual sizes, 640 x 480 most often) and the
real photos of ``shared/real_images``. For the training transform and the test transform it prints the
milliseconds per image of every step, and the images/s of one worker, for the full-size decode and for the
reduced JPEG decode (``draft_size``: the decoder scales by 1/2, 1/4 or 1/8 while both sides stay at or above
the transform's output size; used where the transform resizes the whole image to a fixed size). It also
prints how much the reduced decode changes what the model sees: the largest and mean absolute difference
of the normalised test-transform tensors (CLIP units; one 8-bit grey level is about 0.015).

    python benchmarks/bench_input.py [--images 200] [--batch 40] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.coco_like import SHARED, make_coco_like  # noqa: E402
from data.datasets import CaptionCollator, draft_size_for  # noqa: E402
from data.image_io import load_image  # noqa: E402
from data.transforms import build_transform  # noqa: E402
from models.tokenizer import load_tokenizer  # noqa: E402


def step_times(paths: list[Path], transform, draft: tuple[int, int] | None) -> dict[str, float]:
    """Seconds per image of the decode and of each step of ``transform`` (a Compose)."""
    totals: dict[str, float] = {"decode": 0.0}
    for path in paths:
        started = time.perf_counter()
        item = load_image(path, draft_size=draft)
        totals["decode"] += time.perf_counter() - started
        for step in transform.transforms:
            started = time.perf_counter()
            item = step(item)
            name = type(step).__name__
            totals[name] = totals.get(name, 0.0) + time.perf_counter() - started
    return {name: seconds / len(paths) for name, seconds in totals.items()}


def collation_time(captions: list[str], batch: int, res: int) -> float:
    """Seconds per image of CaptionCollator (tokenising the captions, stacking the images)."""
    collate = CaptionCollator(load_tokenizer("gpt2"))
    items = [(torch.zeros(3, res, res), c) for c in captions[:batch]]
    started, rounds = time.perf_counter(), 20
    for _ in range(rounds):
        collate(items)
    return (time.perf_counter() - started) / (rounds * len(items))


def report(title: str, times: dict[str, float], collate: float) -> float:
    total = sum(times.values()) + collate
    steps = ", ".join(f"{name} {ms * 1000:.2f}" for name, ms in times.items())
    print(f"  {title:<34} {1 / total:7.1f} images/s per worker  (ms/image: {steps}, collate {collate * 1000:.2f})")
    return 1 / total


def max_difference(paths: list[Path], transform, draft: tuple[int, int]) -> tuple[float, float]:
    largest, mean = 0.0, 0.0
    for path in paths:
        diff = (transform(load_image(path)) - transform(load_image(path, draft_size=draft))).abs()
        largest, mean = max(largest, float(diff.max())), mean + float(diff.mean()) / len(paths)
    return largest, mean


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2, help="passes; the fastest is reported")
    parser.add_argument("--work", type=Path, default=Path("runs/bench_input"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    annotations = make_coco_like(args.work, args.images, 0, 0)
    entries = json.loads((annotations / "train.json").read_text())
    sets = {
        f"COCO-like ({args.images} JPEGs)": list(dict.fromkeys(args.work / e["image"] for e in entries)),
        "shared/real_images (6 COCO photos)": sorted((SHARED / "real_images").glob("*.jpg")) * 10,
    }
    collate = collation_time([e["caption"] for e in entries], args.batch, args.res)
    for name, paths in sets.items():
        print(f"{name}, {args.res} px, 1 thread:")
        for train in (True, False):
            transform = build_transform(args.res, train=train)
            draft = draft_size_for(transform)
            modes = [("full decode", None)] + ([("reduced decode", draft)] if draft else [])
            for mode, size in modes:
                times = min((step_times(paths, transform, size) for _ in range(args.repeats)),
                            key=lambda t: sum(t.values()))  # fmt: skip
                report(f"{'train' if train else 'test'} transform, {mode}", times, collate)
            if draft:
                largest, mean = max_difference(paths, transform, draft)
                print(f"    reduced vs full decode, test tensors: max |diff| {largest:.3f}, mean {mean:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
