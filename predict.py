"""Caption images with a trained checkpoint (a training .pt, an exported folder or a Hub repository id).

    python predict.py --checkpoint runs/opg/best.pt --images photos/ extra/*.png list.txt \\
        [--output captions.json] [--format coco|jsonl|csv] [--html gallery.html] [--num_captions 5] \\
        [--batch_size 16] [--num_workers 2] [--device auto] [--precision auto|bf16|fp16|fp32] \\
        [--beams 3 --max_len 20 --min_len 5 ...]
    python predict.py --checkpoint exported/opg --images nocaps/val --annotations nocaps_val_4500_captions.json \\
        --output nocaps_val.json     # ids from the annotation file: evaluate.py scores it directly

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
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from data.caption_output import FORMATS, CaptionRecord, format_for, match_annotated_images, write_gallery, write_results
from data.datasets import ImageFiles, ImageReader, collate_images
from data.image_io import collect_images
from data.transforms import build_transform
from metrics.coco_eval import load_image_entries
from models.api import PRECISIONS, decode_options, resolve_run_precision
from models.captioning import ScoredCaption, caption_batches
from models.decoding import METHODS, DecodeOptions
from models.pretrained import load_model
from models.tokenizer import load_tokenizer
from utils.checkpoint import CheckpointError
from utils.cli import ArgumentParser, add_flag
from utils.distributed import resolve_device
from utils.io import DataFileError, ImageId, assign_image_ids
from utils.progress import progress

logger = logging.getLogger("predict")

DECODE_OVERRIDES = (
    "method", "beams", "max_len", "min_len", "length_penalty", "no_repeat_ngram", "temperature", "top_k", "top_p",
)  # fmt: skip


class UsageError(Exception):
    """A problem with the command line or its inputs: exit status 2."""


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (.pt) or exported folder")
    parser.add_argument("--images", required=True, nargs="+", help="image files, folders, globs, list files")
    parser.add_argument(
        "--annotations",
        help="caption file whose images to caption, with its image ids (COCO / nocaps captions, Karpathy-style "
        "or prepared split); its file names are looked up among the --images inputs",
    )
    parser.add_argument("--output", help="results file (.json COCO results, .jsonl, .csv); default stdout")
    parser.add_argument("--format", choices=FORMATS, help="output format (default: from the --output suffix)")
    parser.add_argument("--html", help="also write an HTML gallery of thumbnails and captions here")
    parser.add_argument("--batch_size", type=int, default=16, help="images per batch")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1), help="image loaders")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    parser.add_argument(
        "--precision", choices=PRECISIONS, help="default (auto): the run's own train.precision, as its evaluation used"
    )
    parser.add_argument("--num_captions", type=int, default=1, help="n-best list per image (JSON/JSONL output)")
    add_flag(parser, "--no_progress", "hide the progress bar")
    decoding = parser.add_argument_group("decoding (default: the checkpoint's decode config)")
    decoding.add_argument("--method", choices=METHODS, help="decoding method (beams > 1 alone means beam)")
    decoding.add_argument("--beams", type=int, help="beam width")
    decoding.add_argument("--max_len", type=int, help="most tokens per caption, stop token included")
    decoding.add_argument("--min_len", type=int, help="fewest tokens before the stop token")
    decoding.add_argument("--length_penalty", type=float, help="beam scores divided by length ** this")
    decoding.add_argument("--no_repeat_ngram", type=int, help="forbid repeating n-grams of this size (0: off)")
    decoding.add_argument("--temperature", type=float, help="sampling only")
    decoding.add_argument("--top_k", type=int, help="sampling only (0: off)")
    decoding.add_argument("--top_p", type=float, help="sampling only (1: off)")
    decoding.add_argument("--seed", type=int, default=0, help="sampling seed")
    return parser


def options_from_args(args: argparse.Namespace, decode_cfg) -> DecodeOptions:
    """The checkpoint's decoding settings with the command-line overrides applied."""
    overrides = {key: getattr(args, key) for key in DECODE_OVERRIDES}
    try:
        return decode_options(decode_cfg, args.num_captions, **overrides)
    except ValueError as err:
        raise UsageError(str(err)) from err


def caption_files(
    model, tokenizer, paths: list[Path], options: DecodeOptions, args: argparse.Namespace, precision: str
) -> tuple[dict[int, list[ScoredCaption]], list[str]]:
    """Caption ``paths``; returns ``({index: captions, best first}, ["path: why it failed", ...])``."""
    device = next(model.parameters()).device
    # Read exactly as validation and the test split read images (a JPEG is decoded at a reduced scale that
    # still covers the input size), so that a run's checkpoint gives the captions the run reported.
    reader = ImageReader("", build_transform(model.encoder.image_res, train=False))
    loader = DataLoader(
        ImageFiles(reader, [str(path) for path in paths]),
        batch_size=args.batch_size,
        num_workers=min(args.num_workers, len(paths)),
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
    )
    generator = torch.Generator(device).manual_seed(args.seed) if options.method == "sample" else None
    captions: dict[int, list[ScoredCaption]] = {}
    failures: list[str] = []
    with progress(total=len(paths), desc="captioning", unit="img", disable=args.no_progress) as bar:
        for batch, results in caption_batches(model, loader, tokenizer, options, precision, generator):
            failures += [f"{failure.path}: {failure.reason}" for failure in batch["failures"]]
            captions.update(zip(batch.get("indices", []), results, strict=True))
            bar.update(len(batch.get("indices", [])) + batch["skipped"])
    return captions, failures


def images_and_ids(args: argparse.Namespace) -> tuple[list[Path], list[ImageId], list[str]]:
    """The image files to caption, their ids and the problems met: with ``--annotations`` the file's images
    (found among the ``--images`` inputs) with its ids, else every input with ids from the file names."""
    paths, problems = collect_images(args.images)
    for problem in problems:
        logger.warning("%s", problem)
    if not paths:
        raise UsageError("no image files found in " + " ".join(args.images))
    if not args.annotations:
        return paths, assign_image_ids(paths), problems
    try:
        entries = load_image_entries(args.annotations)
    except DataFileError as err:
        raise UsageError(str(err)) from err
    matches, missing = match_annotated_images(entries, paths)
    if not matches:
        raise UsageError(f"none of the {len(entries)} images of {args.annotations} is among the --images inputs "
                         f"(first: {missing[0]})")  # fmt: skip
    unlisted = len(set(paths) - {path for _, path in matches})
    if unlisted:
        logger.info("%d image files are not in %s and are not captioned", unlisted, args.annotations)
    return [path for _, path in matches], [image_id for image_id, _ in matches], problems + missing


def to_record(image_id: ImageId, path: Path, captions: list[ScoredCaption], n_best: bool) -> CaptionRecord:
    ranked = [{"caption": c.text, "score": round(c.score, 4)} for c in captions] if n_best else None
    return CaptionRecord(image_id, captions[0].text, str(path), ranked)


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.num_workers < 0 or args.num_captions < 1:
        raise UsageError("--batch_size and --num_captions must be >= 1 and --num_workers >= 0")
    fmt = None
    if args.output:
        try:
            fmt = format_for(args.output, args.format)
        except ValueError as err:
            raise UsageError(str(err)) from err
    if fmt == "csv" and args.num_captions > 1:
        raise UsageError("--num_captions > 1 writes n-best lists: use a .json or .jsonl --output")
    paths, ids, problems = images_and_ids(args)
    try:
        device = resolve_device(args.device)
        model, cfg = load_model(args.checkpoint, device)
    except (CheckpointError, KeyError, ValueError) as err:
        raise UsageError(f"cannot use checkpoint {args.checkpoint} on device {args.device}: {err}") from err
    options = options_from_args(args, cfg.decode)
    precision = resolve_run_precision(args.precision or "auto", cfg, device)
    tokenizer = load_tokenizer(cfg.model.tokenizer)
    logger.info("captioning %d images on %s (%s) with %s", len(paths), device, precision, options)

    captions, failures = caption_files(model, tokenizer, paths, options, args, precision)
    n_best = args.num_captions > 1
    records = [to_record(ids[i], paths[i], captions[i], n_best) for i in sorted(captions)]
    failed = failures + problems
    if args.output:
        write_results(args.output, records, fmt)
    else:
        for record in records:
            for ranked in record.captions or [{"caption": record.caption}]:
                print("\t".join([record.file_name, ranked["caption"], *([str(ranked["score"])] if n_best else [])]))
    if args.html:
        write_gallery(args.html, records, failed)
    print(f"captioned {len(records)} of {len(paths)} images", file=sys.stderr)
    for message in failed:
        print(f"failed: {message}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse(argv)
    if isinstance(args, int):
        return args
    try:
        return run(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
