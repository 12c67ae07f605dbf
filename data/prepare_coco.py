"""Turn Karpathy's caption splits into the files training and evaluation read.

    python -m data.prepare_coco --karpathy dataset_coco.json --image_root datasets/coco --out datasets/coco
    python -m data.prepare_coco --xvlm_dir xvlm_data/ --image_root datasets/coco --out datasets/coco

Input: Karpathy's ``dataset_coco.json`` (or ``dataset_flickr8k.json`` / ``dataset_flickr30k.json``; their
``restval`` images go to train), or the X-VLM/BLIP files ``coco_karpathy_{train,val,test}.json``.
Output in ``--out``: ``train.json`` (one ``{image, caption, image_id}`` per caption), ``val.json`` and
``test.json`` (one ``{image, caption: [refs], image_id}`` per image), COCO-format ground truth
``val_gt.json`` / ``test_gt.json`` for evaluate.py, and ``train_cider_df.json.gz``, the CIDEr-D document
frequencies of the training references for the SCST reward. Every image must exist under ``--image_root``.
``--shards DIR`` also writes the training split as WebDataset shards in img2dataset's layout
(``data/shard_writer.py``), one sample per image with its references.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from data.image_io import ImageLoadError
from utils.cli import ArgumentParser, add_flag
from utils.io import DataFileError, ImageId, image_id_from_path, normalise_image_id, read_json, write_json
from utils.progress import progress

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Karpathy's "restval" holds the COCO val2014 images outside his 5k val / 5k test: training data.
_SPLIT_OF = {"train": "train", "restval": "train", "val": "val", "test": "test"}
XVLM_FILES = {split: f"coco_karpathy_{split}.json" for split in SPLITS}
DF_CACHE_NAME = "train_cider_df.json.gz"
_PREVIEW = 10


class PreparationError(RuntimeError):
    """The inputs cannot be turned into a consistent data set."""


@dataclass
class ImageRecord:
    """One image with its reference captions; ``path`` is relative to the image root."""

    path: str
    image_id: ImageId
    split: str
    captions: list[str]


def read_karpathy(path: Path) -> list[ImageRecord]:
    """Images of a Karpathy ``dataset_*.json``; id = ``cocoid`` (COCO) or ``imgid`` (Flickr)."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PreparationError(f"{path}: expected Karpathy's format, an object with an 'images' list")
    records = []
    for index, image in enumerate(data["images"]):
        record = _karpathy_record(image)
        if record is None:
            logger.warning(
                "%s: skipped image %d (no file name, id, known split or caption): %.200r", path, index, image
            )
            continue
        records.append(record)
    return records


def _karpathy_record(image: dict) -> ImageRecord | None:
    split = _SPLIT_OF.get(image.get("split"))
    image_id = image.get("cocoid", image.get("imgid"))
    if split is None or image_id is None or not image.get("filename"):
        return None
    path = "/".join(part for part in (image.get("filepath"), image["filename"]) if part)
    captions = [s["raw"].strip() for s in image.get("sentences", []) if isinstance(s.get("raw"), str)]
    captions = [caption for caption in captions if caption]
    return ImageRecord(path, normalise_image_id(image_id), split, captions) if captions else None


def read_xvlm_dir(directory: Path) -> list[ImageRecord]:
    """Images of X-VLM/BLIP's ``coco_karpathy_{train,val,test}.json`` (ids from the image file names)."""
    records: list[ImageRecord] = []
    for split, name in XVLM_FILES.items():
        entries = read_json(directory / name)
        if not isinstance(entries, list):
            raise PreparationError(f"{directory / name}: expected a list of {{'image', 'caption'}} entries")
        by_path: dict[str, ImageRecord] = {}
        for index, entry in enumerate(entries):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or "caption" not in entry:
                logger.warning("%s: skipped entry %d without 'image' or 'caption'", directory / name, index)
                continue
            record = by_path.setdefault(
                entry["image"], ImageRecord(entry["image"], image_id_from_path(entry["image"]), split, [])
            )
            captions = entry["caption"] if isinstance(entry["caption"], list) else [entry["caption"]]
            record.captions += [c.strip() for c in captions if isinstance(c, str) and c.strip()]
        records += [record for record in by_path.values() if record.captions]
    return records


def check_unique_ids(records: list[ImageRecord]) -> None:
    """Fail if two different image files share an id (the ground truth would merge their captions)."""
    path_of: dict[ImageId, str] = {}
    for record in records:
        if path_of.setdefault(record.image_id, record.path) != record.path:
            raise PreparationError(
                f"images {path_of[record.image_id]!r} and {record.path!r} share image id {record.image_id!r}"
            )


def find_missing_images(records: list[ImageRecord], image_root: Path) -> list[str]:
    """Paths of records whose image file is not under ``image_root`` (one directory listing per folder)."""
    listings: dict[Path, set[str]] = {}
    missing = []
    for record in progress(records, desc="checking images", unit="img"):
        full = image_root / record.path
        if full.parent not in listings:
            listings[full.parent] = _files_in(full.parent)
        if full.name not in listings[full.parent]:
            missing.append(record.path)
    return missing


def _files_in(directory: Path) -> set[str]:
    try:
        with os.scandir(directory) as entries:
            return {entry.name for entry in entries if entry.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def ground_truth_json(records: list[ImageRecord], description: str) -> dict:
    """COCO caption ground truth (``images`` + ``annotations``) for pycocotools and evaluate.py."""
    images = [{"id": r.image_id, "file_name": r.path} for r in records]
    captions = [(r.image_id, caption) for r in records for caption in r.captions]
    annotations = [{"image_id": i, "id": n, "caption": c} for n, (i, c) in enumerate(captions, start=1)]
    return {
        "info": {"description": description},
        "licenses": [],
        "type": "captions",
        "images": images,
        "annotations": annotations,
    }


def write_splits(records: list[ImageRecord], out: Path) -> None:
    """Write train.json, val.json, test.json and the val/test COCO ground-truth files into ``out``."""
    by_split = {split: [r for r in records if r.split == split] for split in SPLITS}
    train = [{"image": r.path, "caption": c, "image_id": r.image_id} for r in by_split["train"] for c in r.captions]
    write_json(out / "train.json", train)
    for split in ("val", "test"):
        entries = [{"image": r.path, "caption": r.captions, "image_id": r.image_id} for r in by_split[split]]
        write_json(out / f"{split}.json", entries)
        write_json(out / f"{split}_gt.json", ground_truth_json(by_split[split], f"Karpathy {split} split"))
    for split, items in by_split.items():
        logger.info("%s: %d images, %d captions", split, len(items), sum(len(r.captions) for r in items))


def write_df_cache(train_records: list[ImageRecord], path: Path) -> None:
    """CIDEr-D document frequencies of the training references, tokenised as the SCST reward sees them."""
    from data.text import clean_caption, strip_stop
    from metrics.cider_df import DocumentFrequency

    if not train_records:
        raise PreparationError("no training images: cannot compute CIDEr-D document frequencies")
    references = [[strip_stop(clean_caption(c)) for c in r.captions] for r in train_records]
    # Counted as the reward scores them, "words <eos>" (scst_opts.reward_eos), like coco-train-words.p.
    DocumentFrequency.from_references(references, append_eos=True).save(path)
    logger.info("CIDEr-D document frequencies of %d training images written to %s", len(references), path)


def parse_args(argv: list[str] | None) -> argparse.Namespace | int:
    parser = ArgumentParser(prog="python -m data.prepare_coco", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--karpathy", type=Path, help="Karpathy's dataset_coco.json (or dataset_flickr*.json)")
    source.add_argument("--xvlm_dir", type=Path, help="folder with X-VLM/BLIP's coco_karpathy_*.json")
    parser.add_argument(
        "--image_root",
        type=Path,
        required=True,
        help="folder the image paths are relative to (holds train2014/ and val2014/ for COCO)",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the prepared files")
    add_flag(parser, "--drop_missing", "leave out images missing under --image_root instead of stopping")
    add_flag(parser, "--no_df", "do not write the CIDEr-D document frequencies")
    parser.add_argument("--shards", type=Path, help="also write the training split as WebDataset shards there")
    parser.add_argument("--shard_size", type=int, default=1000, help="samples per shard (with --shards)")
    return parser.parse(argv)


def prepare(args: argparse.Namespace) -> None:
    records = read_karpathy(args.karpathy) if args.karpathy else read_xvlm_dir(args.xvlm_dir)
    check_unique_ids(records)
    missing = find_missing_images(records, args.image_root)
    if missing:
        message = (
            f"{len(missing)} of {len(records)} images are missing under {args.image_root}, "
            f"first: {', '.join(missing[:_PREVIEW])}"
        )
        if not args.drop_missing:
            raise PreparationError(f"{message}. Check --image_root or pass --drop_missing to leave them out")
        logger.warning("%s; leaving them out (--drop_missing)", message)
        absent = set(missing)
        records = [r for r in records if r.path not in absent]
    if not records:
        raise PreparationError("no usable images with captions")
    write_splits(records, args.out)
    if not args.no_df:
        write_df_cache([r for r in records if r.split == "train"], args.out / DF_CACHE_NAME)
    if args.shards:
        from data.shard_writer import write_shards

        write_shards([r for r in records if r.split == "train"], args.image_root, args.shards, args.shard_size)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if isinstance(args, int):
        return args
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        prepare(args)
    except (PreparationError, DataFileError, ImageLoadError, ImportError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"prepared files written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
