"""Caption images with a trained checkpoint.

    python predict.py --checkpoint runs/opg/best.pt --images photos/ extra/*.png list.txt \\
        [--output captions.json] [--format coco|jsonl|csv] [--html gallery.html] \\
        [--batch_size 16] [--num_workers 2] [--device auto] [--beams 3 --max_len 20 --min_len 5 ...]

Inputs are files, folders (searched recursively), glob patterns and list files (.txt / .lst, one path a
line). Unreadable or non-image files are reported with the reason and skipped; the others are still
captioned. Exit status: 0 when every image was captioned, 1 when some could not be, 2 for usage errors
(bad options, unusable checkpoint, no image found). Decoding follows the checkpoint's ``decode`` config
unless overridden here. Without ``--output`` the captions go to stdout as ``path<TAB>caption`` lines.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from data.image_io import ImageLoadError, collect_images, load_image
from data.transforms import build_transform
from models.api import caption_batch, decode_options, resolve_device
from models.decoding import METHODS, DecodeOptions
from models.pretrained import load_model
from models.tokenizer import load_tokenizer
from utils.caption_output import FORMATS, CaptionRecord, assign_image_ids, format_for, write_gallery, write_results
from utils.checkpoint import CheckpointError

logger = logging.getLogger("predict")

DECODE_OVERRIDES = (
    "method", "beams", "max_len", "min_len", "length_penalty", "no_repeat_ngram", "temperature", "top_k", "top_p",
)  # fmt: skip


class UsageError(Exception):
    """A problem with the command line or its inputs: exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or exported folder")
    parser.add_argument("--images", required=True, nargs="+", help="image files, folders, globs, list files")
    parser.add_argument("--output", help="results file (.json COCO results, .jsonl, .csv); default stdout")
    parser.add_argument("--format", choices=FORMATS, help="output format (default: from the --output suffix)")
    parser.add_argument("--html", help="also write an HTML gallery of thumbnails and captions here")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1), help="image loaders")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    decoding = parser.add_argument_group("decoding (default: the checkpoint's decode config)")
    decoding.add_argument("--method", choices=METHODS)
    decoding.add_argument("--beams", type=int)
    decoding.add_argument("--max_len", type=int, help="most tokens per caption, stop token included")
    decoding.add_argument("--min_len", type=int, help="fewest tokens before the stop token")
    decoding.add_argument("--length_penalty", type=float)
    decoding.add_argument("--no_repeat_ngram", type=int)
    decoding.add_argument("--temperature", type=float, help="sampling only")
    decoding.add_argument("--top_k", type=int, help="sampling only (0: off)")
    decoding.add_argument("--top_p", type=float, help="sampling only (1: off)")
    decoding.add_argument("--seed", type=int, default=0, help="sampling seed")
    return parser


class ImageFiles(Dataset):
    """Image paths -> ``(index, normalised image or None, failure reason or None)``."""

    def __init__(self, paths: Sequence[Path], image_res: int) -> None:
        self.paths = list(paths)
        self.transform = build_transform(image_res, train=False)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, self.transform(load_image(self.paths[index])), None
        except ImageLoadError as err:
            return index, None, err.reason


def collate_tolerant(items: list[tuple[int, torch.Tensor | None, str | None]]) -> dict[str, Any]:
    """Stack the images that loaded; keep the failures (index, reason) aside."""
    good = [(i, image) for i, image, _ in items if image is not None]
    return {
        "indices": [i for i, _ in good],
        "images": torch.stack([image for _, image in good]) if good else None,
        "failures": [(i, reason) for i, image, reason in items if image is None],
    }


def options_from_args(args: argparse.Namespace, decode_cfg) -> DecodeOptions:
    """The checkpoint's decoding settings with the command-line overrides applied."""
    overrides = {key: getattr(args, key) for key in DECODE_OVERRIDES}
    try:
        return decode_options(decode_cfg, **overrides)
    except ValueError as err:
        raise UsageError(str(err)) from err


def caption_files(
    model, tokenizer, paths: list[Path], options: DecodeOptions, args: argparse.Namespace, device: torch.device
) -> tuple[dict[int, str], dict[int, str]]:
    """Caption ``paths``; returns ``({index: caption}, {index: failure reason})``."""
    loader = DataLoader(
        ImageFiles(paths, model.encoder.image_res),
        batch_size=args.batch_size,
        num_workers=min(args.num_workers, len(paths)),
        collate_fn=collate_tolerant,
        pin_memory=device.type == "cuda",
    )
    generator = torch.Generator(device).manual_seed(args.seed) if options.method == "sample" else None
    captions: dict[int, str] = {}
    failures: dict[int, str] = {}
    with tqdm(total=len(paths), unit="img", disable=args.no_progress or None, file=sys.stderr) as bar:
        for batch in loader:
            for index, reason in batch["failures"]:
                logger.warning("skipped %s: %s", paths[index], reason)
                failures[index] = reason
            if batch["images"] is not None:
                images = batch["images"].to(device, non_blocking=True)
                texts = [c[0].text for c in caption_batch(model, tokenizer, images, options, generator=generator)]
                captions.update(zip(batch["indices"], texts, strict=True))
            bar.update(len(batch["indices"]) + len(batch["failures"]))
    return captions, failures


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.num_workers < 0:
        raise UsageError("--batch_size must be >= 1 and --num_workers >= 0")
    fmt = None
    if args.output:
        try:
            fmt = format_for(args.output, args.format)
        except ValueError as err:
            raise UsageError(str(err)) from err
    paths, problems = collect_images(args.images)
    for problem in problems:
        logger.warning("%s", problem)
    if not paths:
        raise UsageError("no image files found in " + " ".join(args.images))
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise UsageError(f"--device {err}") from err
    try:
        model, cfg = load_model(args.checkpoint, device)
    except (CheckpointError, KeyError, ValueError) as err:
        raise UsageError(f"cannot use checkpoint {args.checkpoint}: {err}") from err
    options = options_from_args(args, cfg.decode)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    logger.info("captioning %d images on %s with %s", len(paths), device, options)

    captions, failures = caption_files(model, tokenizer, paths, options, args, device)
    ids = assign_image_ids(paths)
    records = [CaptionRecord(ids[i], captions[i], str(paths[i])) for i in sorted(captions)]
    failed = [f"{paths[i]}: {reason}" for i, reason in sorted(failures.items())] + problems
    if args.output:
        write_results(args.output, records, fmt)
    else:
        for record in records:
            print(f"{record.file_name}\t{record.caption}")
    if args.html:
        write_gallery(args.html, records, failed)
    print(f"captioned {len(records)} of {len(paths)} images", file=sys.stderr)
    for message in failed:
        print(f"failed: {message}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
