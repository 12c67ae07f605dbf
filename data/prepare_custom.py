"""Turn your own image-caption data into the files training and evaluation read (as data.prepare_coco does).

    python -m data.prepare_custom --captions captions.csv --image_root photos/ --out datasets/mine
    python -m data.prepare_custom --captions captions.jsonl --image_root photos/ --out datasets/mine --val 200
    python -m data.prepare_custom --image_root photos/ --out datasets/mine     # photo.jpg + photo.txt pairs

Input: a CSV with a header holding ``image`` and ``caption`` columns, or JSON lines with ``image`` and
``caption`` (a string or a list of strings); image paths are relative to ``--image_root``, and an image may
have several rows. Without ``--captions`` (or with a folder), every image under the folder with a
same-name ``.txt`` file is used, one caption per non-empty line. A ``split`` column / key (train, val, test)
is kept; otherwise images are split at random, reproducibly (``--val``, ``--test``: a fraction below 1 or a
number of images; ``--seed``). Output in ``--out``: the files of data.prepare_coco (train/val/test.json,
val_gt.json, test_gt.json, train_cider_df.json.gz) and ``data.yaml``, the config section that points
training at them (``train_scst.py --config configs/xe.yaml --config OUT/data.yaml``). ``--shards DIR`` also
writes the training split as WebDataset shards in img2dataset's layout (``data/shard_writer.py``).

Missing images, empty captions and unreadable rows stop the preparation with a list naming the file and
line of each (``--skip_invalid`` leaves them out instead); repeated (image, caption) rows are dropped with
a warning.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from data.image_io import IMAGE_EXTENSIONS, ImageLoadError
from data.prepare_coco import DF_CACHE_NAME, SPLITS, ImageRecord, PreparationError, write_df_cache, write_splits
from data.shard_writer import write_shards
from data.text import clean_caption, strip_stop
from utils.cli import ArgumentParser, add_flag
from utils.io import DataFileError, write_text

logger = logging.getLogger(__name__)

_SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "validation": "val", "test": "test"}
_SHOWN = 20


@dataclass
class Row:
    """One caption of one image; ``where`` names its file and line for messages."""

    where: str
    image: str
    caption: str
    split: str | None = None


class RowError(ValueError):
    """A row that cannot be used; the message says why."""


def read_rows(captions: Path | None, image_root: Path) -> tuple[list[Row], list[str]]:
    """Rows of a CSV, a JSON-lines file or a folder of image + .txt pairs, and the unreadable rows' messages."""
    if captions is None or captions.is_dir():
        return list(_folder_rows(captions or image_root)), []
    readers = {".csv": _csv_rows, ".jsonl": _jsonl_rows, ".json": _jsonl_rows}
    reader = readers.get(captions.suffix.lower())
    if reader is None:
        raise PreparationError(f"{captions}: expected a .csv or .jsonl captions file, or a folder")
    rows, problems = [], []
    try:
        for where, parsed in reader(captions):
            if isinstance(parsed, RowError):
                problems.append(f"{where}: unreadable row: {parsed}")
            else:
                rows.append(parsed)
    except (OSError, UnicodeDecodeError) as err:
        raise PreparationError(f"cannot read {captions}: {err}") from err
    return rows, problems


def _csv_rows(path: Path) -> Iterator[tuple[str, Row | RowError]]:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [name.strip().lower() for name in reader.fieldnames or []]
        if not {"image", "caption"} <= set(columns):
            raise PreparationError(f"{path}: the header must name the columns 'image' and 'caption', got {columns}")
        reader.fieldnames = columns
        for values in reader:
            where = f"{path}:{reader.line_num}"
            if None in values or None in values.values():
                yield where, RowError(f"expected {len(columns)} fields ({', '.join(columns)})")
                continue
            yield where, Row(where, values["image"], values["caption"], values.get("split"))


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Row | RowError]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                yield where, RowError(f"not JSON ({err.msg})")
                continue
            if not isinstance(item, dict) or not isinstance(item.get("image"), str) or "caption" not in item:
                yield where, RowError("expected an object with 'image' and 'caption'")
                continue
            captions = item["caption"] if isinstance(item["caption"], list) else [item["caption"]]
            for caption in captions:
                if not isinstance(caption, str):
                    yield where, RowError(f"caption {caption!r} is not text")
                else:
                    yield where, Row(where, item["image"], caption, item.get("split"))


def _folder_rows(folder: Path) -> Iterator[Row]:
    if not folder.is_dir():
        raise PreparationError(f"{folder} is not a folder")
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()):
        text_file = image.with_suffix(".txt")
        # absolute, so that it is taken relative to --image_root even when both were given relative
        path = os.path.abspath(image)
        if not text_file.is_file():
            logger.warning("%s has no caption file %s: left out", image, text_file.name)
            continue
        lines = text_file.read_text(encoding="utf-8").splitlines()
        if not any(line.strip() for line in lines):
            yield Row(f"{text_file}:1", path, "")
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield Row(f"{text_file}:{number}", path, line)


def _relative_to_root(image: str, image_root: Path) -> str:
    """The image path as a POSIX path relative to the image root; RowError if it points elsewhere."""
    path = Path(image.strip().replace("\\", "/"))
    if path.is_absolute():
        try:
            path = Path(os.path.abspath(path)).relative_to(os.path.abspath(image_root))
        except ValueError:
            raise RowError(f"image {image!r} is not under --image_root {image_root}") from None
    if not path.parts or ".." in path.parts:
        raise RowError(f"image path {image!r} must name a file under --image_root")
    return PurePosixPath(*path.parts).as_posix()


def check_rows(rows: list[Row], image_root: Path) -> tuple[list[Row], list[str]]:
    """The usable rows (image paths made relative, duplicates dropped) and a message per unusable row."""
    usable: list[Row] = []
    problems: list[str] = []
    first_seen: dict[tuple[str, str], str] = {}
    exists: dict[str, bool] = {}
    for row in rows:
        try:
            row.image = _relative_to_root(row.image, image_root)
            row.split = _split_name(row.split)
        except RowError as err:
            problems.append(f"{row.where}: {err}")
            continue
        if not strip_stop(clean_caption(row.caption)):
            problems.append(f"{row.where}: empty caption for {row.image}")
            continue
        if row.image not in exists:
            exists[row.image] = (image_root / row.image).is_file()
        if not exists[row.image]:
            problems.append(f"{row.where}: image {row.image} not found under {image_root}")
            continue
        key = (row.image, clean_caption(row.caption))
        if key in first_seen:
            logger.warning("%s: duplicate of %s (same image and caption): left out", row.where, first_seen[key])
            continue
        first_seen[key] = row.where
        usable.append(row)
    return usable, problems


def _split_name(value: str | None) -> str | None:
    if value is None or not str(value).strip():
        return None
    name = _SPLIT_NAMES.get(str(value).strip().lower())
    if name is None:
        raise RowError(f"split {value!r} is not one of train, val, test")
    return name


def group_images(rows: list[Row]) -> tuple[list[ImageRecord], list[str]]:
    """One record per image (ids 1, 2, ... in order of first appearance) and a message per image whose
    rows disagree on the split."""
    records: dict[str, ImageRecord] = {}
    split_source: dict[str, str] = {}
    problems = []
    for row in rows:
        record = records.setdefault(row.image, ImageRecord(row.image, len(records) + 1, row.split or "", []))
        if (row.split or "") != record.split:
            problems.append(f"{row.where}: split {row.split!r} for {row.image}, {split_source[row.image]} said "
                            f"{record.split or None!r}")  # fmt: skip
            continue
        split_source.setdefault(row.image, row.where)
        record.captions.append(row.caption.strip())
    return list(records.values()), problems


def assign_splits(records: list[ImageRecord], val: float, test: float, seed: int) -> None:
    """Split images at random, the same way for the same images and seed whatever the row order."""
    given = {bool(r.split) for r in records}
    if given == {True}:
        return
    if given == {True, False}:
        raise PreparationError("some rows name a split and others do not: give every row a split, or none")
    count = len(records)
    n_val, n_test = _split_size(val, count, "--val"), _split_size(test, count, "--test")
    if n_val + n_test >= count:
        raise PreparationError(f"{count} images cannot give {n_val} val + {n_test} test images and a training set")
    order = sorted(records, key=lambda r: r.path)
    random.Random(seed).shuffle(order)
    for index, record in enumerate(order):
        record.split = "test" if index < n_test else "val" if index < n_test + n_val else "train"


def _split_size(value: float, count: int, option: str) -> int:
    size = round(value * count) if value < 1 else int(value)
    if value <= 0 or size < 1:
        raise PreparationError(f"{option} {value} gives no image out of {count}: each split needs one at least")
    return size


def write_data_config(out: Path, image_root: Path) -> Path:
    """``data.yaml``: the config section that trains on the prepared files."""
    out = out.resolve()
    section = {
        "data": {
            "image_root": str(image_root.resolve()),
            "train_file": str(out / "train.json"),
            "val_file": str(out / "val.json"),
            "test_file": str(out / "test.json"),
            "cider_df": str(out / DF_CACHE_NAME),
            "synthetic": False,
            "feature_cache_dir": None,
        }
    }
    path = out / "data.yaml"
    write_text(path, "# Written by data.prepare_custom: train with --config configs/xe.yaml --config this file\n"
               + yaml.safe_dump(section, sort_keys=False))  # fmt: skip
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace | int:
    parser = ArgumentParser(prog="python -m data.prepare_custom", description=__doc__)
    parser.add_argument("--captions", type=Path, help="CSV or JSON-lines file, or a folder (default: --image_root)")
    parser.add_argument("--image_root", type=Path, required=True, help="folder the image paths are relative to")
    parser.add_argument("--out", type=Path, required=True, help="folder for the prepared files")
    parser.add_argument("--val", type=float, default=0.1, help="val images: a fraction (< 1) or a number")
    parser.add_argument("--test", type=float, default=0.1, help="test images: a fraction (< 1) or a number")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random split")
    add_flag(parser, "--skip_invalid", "leave out unusable rows instead of stopping")
    add_flag(parser, "--no_df", "do not write the CIDEr-D document frequencies")
    parser.add_argument("--shards", type=Path, help="also write the training split as WebDataset shards there")
    parser.add_argument("--shard_size", type=int, default=1000, help="samples per shard (with --shards)")
    return parser.parse(argv)


def prepare(args: argparse.Namespace) -> list[ImageRecord]:
    if not args.image_root.is_dir():
        raise PreparationError(f"--image_root {args.image_root} is not a folder")
    rows, problems = read_rows(args.captions, args.image_root)
    rows, invalid = check_rows(rows, args.image_root)
    records, conflicts = group_images(rows)
    problems += invalid + conflicts
    if problems:
        if not args.skip_invalid:
            raise PreparationError(
                f"{len(problems)} unusable rows (pass --skip_invalid to leave them out):{_listing(problems)}"
            )
        logger.warning("left out %d unusable rows:%s", len(problems), _listing(problems))
    if not records:
        raise PreparationError("no usable image with a caption")
    assign_splits(records, args.val, args.test, args.seed)
    missing = [split for split in SPLITS if not any(r.split == split for r in records)]
    if missing:
        raise PreparationError(f"no image in the {', '.join(missing)} split(s)")
    write_splits(records, args.out)
    if not args.no_df:
        write_df_cache([r for r in records if r.split == "train"], args.out / DF_CACHE_NAME)
    write_data_config(args.out, args.image_root)
    if args.shards:
        write_shards([r for r in records if r.split == "train"], args.image_root, args.shards, args.shard_size)
    return records


def _listing(messages: list[str]) -> str:
    more = f"\n  ... {len(messages) - _SHOWN} more" if len(messages) > _SHOWN else ""
    return "".join(f"\n  {message}" for message in messages[:_SHOWN]) + more


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if isinstance(args, int):
        return args
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        records = prepare(args)
    except (PreparationError, DataFileError, ImageLoadError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{split} {sum(r.split == split for r in records)}" for split in SPLITS)
    print(f"prepared {len(records)} images ({counts}) in {args.out}; train with "
          f"python train_scst.py --config configs/xe.yaml --config {args.out / 'data.yaml'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
