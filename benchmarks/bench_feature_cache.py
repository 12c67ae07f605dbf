"""Benchmark the on-disk feature cache: its build (speed, host memory) and an XE epoch from it against one
from the JPEGs.

On a COCO-like set (``benchmarks/coco_like.py``: real-size JPEGs, five captions per image, one training
entry per caption):

1. builds the feature store of the training images with ``engine.features.cache_features``, sampling the
   process's anonymous resident memory (heap; the memory map's pages are file cache, which the kernel
   can drop) while it grows, then reads every item back;
2. runs one XE epoch of ``configs/xe.yaml`` through ``engine.runner.Run`` from the JPEGs (no augmentation,
   so both epochs do the same work) and one from the cache, and prints their images/s (timed inside the
   epoch loop: set-up and the cache build are not counted).

    python benchmarks/bench_feature_cache.py [--size demo|paper] [--images 400] [--batch 40] [--workers 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.coco_like import make_coco_like  # noqa: E402
from benchmarks.harness import SIZES, MemorySampler, coco_config, rss_anon_mib, train_for  # noqa: E402
from data.datasets import CaptionTrainDataset  # noqa: E402
from data.transforms import build_transform  # noqa: E402
from engine.features import cache_features  # noqa: E402
from models.encoder import build_encoder  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402
from utils.precision import resolve_precision  # noqa: E402


def build_and_read(args: argparse.Namespace, data: Path, annotations: Path, cache_dir: Path) -> None:
    device = resolve_device(args.device)
    encoder = build_encoder(SIZES[args.size]["encoder.vision_config"]).to(device)
    dataset = CaptionTrainDataset(annotations / "train.json", data, build_transform(encoder.image_res))
    shutil.rmtree(cache_dir, ignore_errors=True)
    before = rss_anon_mib()
    started = time.perf_counter()
    with MemorySampler() as memory:
        cache_features(encoder, [dataset], device, args.batch, args.workers, resolve_precision("auto", device),
                       cache_dir=cache_dir)  # fmt: skip
    seconds = time.perf_counter() - started
    store = dataset.reader.features
    images = len(store)
    size_mib = (store.directory / "features.bin").stat().st_size / 2**20
    fp32_mib = images * store.shape[0] * store.shape[1] * 4 / 2**20
    print(f"cache build: {images} images in {seconds:.1f} s ({images / seconds:.1f} images/s), "
          f"store {size_mib:.1f} MiB float16 ({store.shape[0]} x {store.shape[1]} per image)")  # fmt: skip
    print(f"  host heap (RssAnon) before {before:.0f} MiB, peak during build {max(m for _, m in memory.samples):.0f}"
          f" MiB; an in-RAM float32 cache would hold {fp32_mib:.1f} MiB")  # fmt: skip
    started = time.perf_counter()
    for path in store:
        store[path]
    print(
        f"  read back all {images} items in {time.perf_counter() - started:.2f} s; heap after {rss_anon_mib():.0f} MiB"
    )


class PooledEncoder(nn.Module):
    """A stand-in for Swin-B with its output shape (B x 50 x 1024) at almost no cost, so that the store's
    growth to thousands of images can be watched on a CPU."""

    image_res = 224

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("projection", torch.randn(3, 1024, generator=torch.Generator().manual_seed(0)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        grid = F.adaptive_avg_pool2d(images, 7).flatten(2).transpose(1, 2) @ self.projection  # B x 49 x 1024
        return torch.cat([grid.mean(1, keepdim=True), grid], dim=1)


def growth(args: argparse.Namespace, work: Path) -> None:
    """Heap while a paper-shaped store (50 x 1024 per image) grows to ``--growth_images`` images."""
    data = work / "growth_data"
    annotations = make_coco_like(data, args.growth_images, 1, 1, seed=1)
    dataset = CaptionTrainDataset(annotations / "train.json", data, build_transform(224))
    shutil.rmtree(work / "growth_cache", ignore_errors=True)
    with MemorySampler(every=1.0) as memory:
        cache_features(PooledEncoder(), [dataset], torch.device("cpu"), 64, args.workers, "fp32",
                       cache_dir=work / "growth_cache")  # fmt: skip
    store = dataset.reader.features
    fp32_mib = len(store) * 50 * 1024 * 4 / 2**20
    heap = ", ".join(f"{t:.0f} s: {m:.0f}" for t, m in memory.samples[:: max(1, len(memory.samples) // 6)])
    disk_mib = (store.directory / "features.bin").stat().st_size / 2**20
    print(f"store growth to {len(store)} images of 50 x 1024 ({disk_mib:.0f} MiB on disk; in RAM as float32: "
          f"{fp32_mib:.0f} MiB); heap (RssAnon, MiB) over the build: {heap}, "
          f"end {memory.samples[-1][1]:.0f}", flush=True)  # fmt: skip


def epoch(args: argparse.Namespace, data: Path, annotations: Path, out: Path, cached: bool, cache_dir: Path) -> float:
    items = len(CaptionTrainDataset(annotations / "train.json", data, None))
    steps = items // args.batch
    shutil.rmtree(out, ignore_errors=True)
    cfg = coco_config(annotations, data, out, scst=False, **SIZES[args.size], **{
        "device": args.device, "data.augment": False, "encoder.drop_path": 0.0, "data.num_workers": args.workers,
        "data.cache_features": cached, "data.feature_cache_dir": str(cache_dir),
        "train.batch_size": args.batch, "train.eval_batch_size": args.batch, "train.epochs": 1,
        "train.stop_after_steps": steps, "train.save_every_steps": 0,
    })  # fmt: skip
    _, records = train_for(cfg)
    rate = records[-1]["img_s"]
    print(f"XE epoch from {'cache' if cached else 'JPEGs'}: {steps} steps of {args.batch}, "
          f"{steps * args.batch / rate:.1f} s, {rate:.1f} images/s", flush=True)  # fmt: skip
    return rate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=tuple(SIZES), default="demo")
    parser.add_argument("--images", type=int, default=400, help="training images (x5 captions)")
    parser.add_argument("--batch", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--growth_images",
        type=int,
        default=0,
        help="also watch the heap while a 50 x 1024 store grows to this many images",
    )
    parser.add_argument("--work", type=Path, default=Path("runs/bench_feature_cache"))
    args = parser.parse_args(argv)
    data = args.work / "data"
    annotations = make_coco_like(data, args.images, 8, 8)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, size {args.size}, {args.workers} workers")
    if args.growth_images:  # first: later runs in this process leave a fragmented heap that blurs the figure
        growth(args, args.work)
    build_and_read(args, data, annotations, args.work / "cache_build")
    jpeg = epoch(args, data, annotations, args.work / "run_jpeg", False, args.work / "cache")
    cache = epoch(args, data, annotations, args.work / "run_cache", True, args.work / "cache")
    print(f"speed-up from the cache: {cache / jpeg:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
