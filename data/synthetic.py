"""Built-in demo data set: coloured shapes with a count and a position, captioned by templates.

Each image shows 1-4 copies of one shape in one colour, grouped in one region (left, right, top,
bottom, center) or scattered, on a coloured background, with size, position, colour and noise jitter.
Every image has several paraphrased references, each drawn from eight weighted sentence templates, four
position phrases and the number words. As in human caption data, the wording most likely to be written is
not the one with the most consensus: the bare "two red circles on the left" is the single most common
template (drawn with weight 0.3; about 26% of references once repeated captions are redrawn), while the
other seven (weight 0.1 each) also name the background, so the consensus caption names it too, in the words
most templates share. Files follow the COCO Karpathy layout used by BLIP / X-VLM (see `generate_dataset`).
`grounding_accuracy` checks whether captions state the right count, colour, shape and position.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data.prepare_coco import ImageRecord, ground_truth_json
from utils.cli import ArgumentParser, add_flag
from utils.io import DataFileError, install_folder, read_json, staged_folder, write_json

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 4  # 4: COCO ground truth written by data.prepare_coco (file_name = the image's path)
SPLITS = ("train", "val", "test")
SPLIT_ID_OFFSET = {"train": 0, "val": 1_000_000, "test": 2_000_000}
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 175, 70),
    "blue": (50, 100, 240),
    "yellow": (240, 215, 40),
    "purple": (150, 70, 210),
    "orange": (245, 135, 30),
    "white": (235, 235, 235),
}
BACKGROUNDS = {"black": (18, 18, 18), "gray": (100, 100, 104), "brown": (88, 58, 38)}
POSITIONS = ("left", "right", "top", "bottom", "center", "scattered")
COUNT_WORDS = ("one", "two", "three", "four")
POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "in the left part of the image", "to the left"),
    "right": ("on the right", "on the right side", "in the right part of the image", "to the right"),
    "top": ("at the top", "near the top", "in the upper part of the image", "at the top of the picture"),
    "bottom": (
        "at the bottom",
        "near the bottom",
        "in the lower part of the image",
        "at the bottom of the picture",
    ),
    "center": ("in the center", "in the middle", "in the middle of the image", "at the center"),
    "scattered": (
        "scattered around",
        "spread out",
        "scattered across the image",
        "spread around the picture",
    ),
}
# (template, weight): the bare phrase is the most likely wording; about three references in four name the background.
TEMPLATES = (
    ("{n} {c} {s} {p}", 0.3),
    ("{n} {c} {s} {p} on a {bg} background", 0.1),
    ("a {bg} background with {n} {c} {s} {p}", 0.1),
    ("there {be} {n} {c} {s} {p} on a {bg} background", 0.1),
    ("a picture of {n} {c} {s} {p} on a {bg} background", 0.1),
    ("{n} {c} {s} {p} against a {bg} background", 0.1),
    ("an image showing {n} {c} {s} {p} on a {bg} background", 0.1),
    ("a drawing of {n} {c} {s} {p} on a {bg} backdrop", 0.1),
)
_TEMPLATE_TEXTS = tuple(template for template, _ in TEMPLATES)
_TEMPLATE_PROBS = np.array([weight for _, weight in TEMPLATES]) / sum(weight for _, weight in TEMPLATES)
MIN_WORDS, MAX_WORDS = 6, 18
# Centre boxes (x0, y0, x1, y1) as fractions of the image side, per grouped position.
_REGIONS = {
    "left": (0.1, 0.15, 0.32, 0.85),
    "right": (0.68, 0.15, 0.9, 0.85),
    "top": (0.15, 0.1, 0.85, 0.32),
    "bottom": (0.15, 0.68, 0.85, 0.9),
    "center": (0.34, 0.34, 0.66, 0.66),
}
# How far the group's mean centre may stray from the image centre along (x, y): a group "on the left"
# sits mid-way down the left side, not in a corner.
_CENTROID_SLACK = {
    "left": (1.0, 0.12),
    "right": (1.0, 0.12),
    "top": (0.12, 1.0),
    "bottom": (0.12, 1.0),
    "center": (0.07, 0.07),
}
_CORNERS = ((0.2, 0.2), (0.8, 0.2), (0.8, 0.8), (0.2, 0.8))
_SUPERSAMPLE = 2

_WORD_TO_COUNT = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "three": 3, "four": 4}
_WORD_TO_POSITION = {
    **{p: p for p in POSITIONS},
    **{"upper": "top", "lower": "bottom", "centre": "center", "middle": "center", "spread": "scattered"},
}
_WORD_TO_SHAPE = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}


@dataclass(frozen=True)
class DatasetPaths:
    """Files of a generated data set; image paths in the JSON files are relative to `image_root`."""

    root: Path
    image_root: Path
    train: Path
    val: Path
    test: Path
    val_gt: Path
    test_gt: Path
    metadata: Path
    manifest: Path

    @classmethod
    def under(cls, root: str | os.PathLike) -> DatasetPaths:
        """The paths of a data set generated into `root` (which need not exist yet)."""
        root = Path(root)
        names = ("train", "val", "test", "val_gt", "test_gt", "metadata", "manifest")
        return cls(root=root, image_root=root, **{name: root / f"{name}.json" for name in names})


@dataclass(frozen=True)
class Scene:
    """Ground-truth facts of one image; `objects` holds (centre x, centre y, radius) in pixels."""

    shape: str
    colour: str
    count: int
    position: str
    background: str
    objects: tuple[tuple[float, float, float], ...]


def sample_scene(rng: np.random.Generator, size: int) -> Scene:
    """Draw shape, colour, count, region and object placements for one `size` x `size` image."""
    count = int(rng.integers(1, 5))
    positions = POSITIONS if count > 1 else POSITIONS[:-1]
    position = str(rng.choice(positions))
    centres = _scattered_centres(rng, count) if position == "scattered" else None
    objects = _place(rng, count, position, size, centres)
    return Scene(
        shape=str(rng.choice(SHAPES)),
        colour=str(rng.choice(list(COLOURS))),
        count=count,
        position=position,
        background=str(rng.choice(list(BACKGROUNDS))),
        objects=objects,
    )


def _scattered_centres(rng: np.random.Generator, count: int) -> list[tuple[float, float]]:
    """Corners of the image; two shapes take opposite corners so they never share one side."""
    if count == 2:
        first = int(rng.integers(0, 2))
        corners = [_CORNERS[first], _CORNERS[first + 2]]
    else:
        corners = [_CORNERS[i] for i in rng.permutation(4)[:count]]
    return [(x + rng.uniform(-0.07, 0.07), y + rng.uniform(-0.07, 0.07)) for x, y in corners]


def _place(
    rng: np.random.Generator, count: int, position: str, size: int, centres: list | None
) -> tuple[tuple[float, float, float], ...]:
    """Non-overlapping (x, y, r) in pixels; grouped shapes keep their centroid mid-way along the side."""
    low, high = (0.07, 0.10) if count <= 2 else (0.055, 0.08)
    for attempt in range(400):
        shrink = 0.92 ** (attempt // 50)
        radii = rng.uniform(low, high, count) * shrink
        if centres is None:
            x0, y0, x1, y1 = _REGIONS[position]
            xy = np.stack([rng.uniform(x0, x1, count), rng.uniform(y0, y1, count)], axis=1)
            if np.any(np.abs(xy.mean(axis=0) - 0.5) > _CENTROID_SLACK[position]):
                continue
        else:
            xy = np.asarray(centres)
        gaps = [math.dist(xy[i], xy[j]) - radii[i] - radii[j] for i in range(count) for j in range(i + 1, count)]
        if all(gap > 0.03 for gap in gaps):
            return tuple(
                (round(float(x * size), 2), round(float(y * size), 2), round(float(r * size), 2))
                for (x, y), r in zip(xy, radii, strict=True)
            )
    raise RuntimeError(f"could not place {count} shapes at {position!r}")


def render_scene(scene: Scene, rng: np.random.Generator, size: int) -> Image.Image:
    """Draw the scene anti-aliased, with colour jitter, a soft brightness gradient and pixel noise."""
    scale = _SUPERSAMPLE
    background = _jitter(rng, BACKGROUNDS[scene.background], 0.15, 5)
    canvas = Image.new("RGB", (size * scale, size * scale), background)
    draw = ImageDraw.Draw(canvas)
    fill = _jitter(rng, COLOURS[scene.colour], 0.12, 10)
    for x, y, r in scene.objects:
        _draw_shape(draw, scene.shape, x * scale, y * scale, r * scale, rng, fill)
    pixels = np.asarray(canvas.reduce(scale), dtype=np.float32)
    gradient = np.linspace(-1.0, 1.0, size, dtype=np.float32) * rng.uniform(-10, 10)
    pixels += gradient[:, None, None] if rng.random() < 0.5 else gradient[None, :, None]
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 6.0))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _jitter(
    rng: np.random.Generator, colour: tuple[int, int, int], brightness: float, tint: int
) -> tuple[int, int, int]:
    """Scale brightness freely but shift channels only a little, so the colour keeps its name."""
    scaled = np.asarray(colour) * rng.uniform(1 - brightness, 1 + brightness)
    values = np.clip(scaled + rng.integers(-tint, tint + 1, 3), 0, 255)
    return tuple(int(v) for v in values)


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float, rng: np.random.Generator, fill
) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        return
    # (vertices, radius factor, max rotation in degrees); radii chosen so shapes look equally big.
    vertices, factor, turn = {"square": (4, 1.2, 20), "triangle": (3, 1.15, 15), "star": (10, 1.2, 36)}[shape]
    start = math.radians(rng.uniform(-turn, turn)) - math.pi / 2 + (math.pi / 4 if shape == "square" else 0)
    points = []
    for k in range(vertices):
        radius = r * factor * (0.45 if shape == "star" and k % 2 else 1.0)
        angle = start + 2 * math.pi * k / vertices
        points.append((x + radius * math.cos(angle), y + radius * math.sin(angle)))
    draw.polygon(points, fill=fill)


def make_references(scene: Scene, rng: np.random.Generator, num_refs: int) -> list[str]:
    """`num_refs` (1..10) distinct captions, each with a template drawn by its weight, a position phrase and
    (for one object) a number word drawn uniformly; at least 32 distinct ones exist for every scene."""
    refs: list[str] = []
    while len(refs) < num_refs:
        caption = _fill(_TEMPLATE_TEXTS[rng.choice(len(_TEMPLATE_TEXTS), p=_TEMPLATE_PROBS)], scene, rng)
        if caption not in refs and MIN_WORDS <= len(caption.split()) <= MAX_WORDS:
            refs.append(caption)
    return refs


def _fill(template: str, scene: Scene, rng: np.random.Generator) -> str:
    """Fill a template with `scene`'s facts, a random position phrase and number word."""
    if scene.count == 1:
        number = str(rng.choice(["a", "one", "a single"]))
        if number == "a" and scene.colour[0] in "aeiou":
            number = "an"
    else:
        number = COUNT_WORDS[scene.count - 1]
    return template.format(
        n=number,
        c=scene.colour,
        s=scene.shape + ("s" if scene.count > 1 else ""),
        p=str(rng.choice(POSITION_PHRASES[scene.position])),
        bg=scene.background,
        be="are" if scene.count > 1 else "is",
    )


def image_id_of(split: str, index: int) -> int:
    """COCO image id of the `index`-th image of `split`; also the number that ends its file name."""
    return SPLIT_ID_OFFSET[split] + index


def _image_name(split: str, image_id: int, image_format: str) -> str:
    return f"synth_{split}_{image_id:07d}.{image_format}"


def _generate_split(root: Path, split: str, count: int, params: dict) -> list[dict]:
    """Render one split's images; returns per-image records (facts + references)."""
    size, fmt = params["image_size"], params["image_format"]
    folder = root / "images" / split
    folder.mkdir(parents=True)
    records = []
    for index in range(count):
        image_id = image_id_of(split, index)
        rng = np.random.default_rng([params["seed"], SPLITS.index(split), index])
        scene = sample_scene(rng, size)
        name = _image_name(split, image_id, fmt)
        image = render_scene(scene, rng, size)
        image.save(folder / name, **({"quality": 92} if fmt == "jpg" else {"compress_level": 1}))
        refs = make_references(scene, rng, params["refs_per_image"])
        rel_path = f"images/{split}/{name}"
        records.append({"image_id": image_id, "image": rel_path, "refs": refs, "scene": scene})
    return records


def _write_annotations(paths: DatasetPaths, records: dict[str, list[dict]]) -> None:
    train = [
        {"image": r["image"], "caption": ref, "image_id": str(r["image_id"])}
        for r in records["train"]
        for ref in r["refs"]
    ]
    write_json(paths.train, train, indent=1)
    for split, gt_path in (("val", paths.val_gt), ("test", paths.test_gt)):
        refs = [{"image": r["image"], "caption": r["refs"]} for r in records[split]]
        write_json(getattr(paths, split), refs, indent=1)
        images = [ImageRecord(r["image"], r["image_id"], split, r["refs"]) for r in records[split]]
        write_json(gt_path, ground_truth_json(images, f"synthetic shapes, {split} split"), indent=1)
    facts = {
        str(r["image_id"]): {"split": split, "image": r["image"], **asdict(r["scene"])}
        for split in SPLITS
        for r in records[split]
    }
    write_json(paths.metadata, {"generator_version": GENERATOR_VERSION, "images": facts}, indent=1)


def _parameters(num_train, num_val, num_test, image_size, seed, refs_per_image, image_format) -> dict:
    for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if not 0 <= value < 1_000_000:
            raise ValueError(f"{name} must be in 0..999999, got {value}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    if not 1 <= refs_per_image <= 10:
        raise ValueError(f"refs_per_image must be in 1..10, got {refs_per_image}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    return {
        "generator_version": GENERATOR_VERSION,
        "num_train": int(num_train),
        "num_val": int(num_val),
        "num_test": int(num_test),
        "image_size": int(image_size),
        "seed": int(seed),
        "refs_per_image": int(refs_per_image),
        "image_format": image_format,
    }


def generate_dataset(
    out_dir: str | os.PathLike,
    num_train: int = 4000,
    num_val: int = 1000,
    num_test: int = 500,
    image_size: int = 128,
    seed: int = 0,
    refs_per_image: int = 5,
    image_format: str = "jpg",
) -> DatasetPaths:
    """Generate the data set into `out_dir`, replacing an earlier generated one there.

    Layout: ``images/{train,val,test}/synth_<split>_<id>.<ext>``; ``train.json`` (one entry per
    caption: image, caption, image_id as a string); ``val.json`` / ``test.json`` (image, list of
    references); ``val_gt.json`` / ``test_gt.json`` (COCO caption format); ``metadata.json`` (facts per
    image id); ``manifest.json`` (parameters; written last). Image ids are unique across splits
    (offsets 0 / 1,000,000 / 2,000,000) and equal the number at the end of each file name.
    The set is built in a temporary sibling folder and renamed into place.
    """
    params = _parameters(num_train, num_val, num_test, image_size, seed, refs_per_image, image_format)
    out = Path(out_dir).absolute()
    if out.exists() and not _replaceable(out):
        raise FileExistsError(f"{out} exists and is not a generated synthetic data set; not overwriting it")
    started = time.perf_counter()
    with staged_folder(out) as tmp:
        paths = DatasetPaths.under(tmp)
        sizes = {"train": num_train, "val": num_val, "test": num_test}
        records = {split: _generate_split(tmp, split, sizes[split], params) for split in SPLITS}
        _write_annotations(paths, records)
        write_json(paths.manifest, params, indent=1)
        if not install_folder(tmp, out, replace=True):
            if not _is_complete(out, params):
                raise FileExistsError(f"{out} appeared while generating it and is not the same data set")
            logger.info("another process generated %s concurrently; keeping its copy", out)
    elapsed = time.perf_counter() - started
    logger.info("generated %d images into %s in %.1f s", sum(sizes.values()), out, elapsed)
    return DatasetPaths.under(out)


def ensure_dataset(out_dir: str | os.PathLike, **kwargs) -> DatasetPaths:
    """Return the data set in `out_dir`, generating it only if missing or made with other parameters."""
    defaults = _generation_defaults()
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"unknown data set parameters: {sorted(unknown)}")
    params = _parameters(**{**defaults, **kwargs})
    if _is_complete(Path(out_dir), params):
        logger.info("synthetic data set in %s is up to date", out_dir)
        return DatasetPaths.under(Path(out_dir).absolute())
    return generate_dataset(out_dir, **{**defaults, **kwargs})


def ensure_generated(out_dir: str | os.PathLike, annotation_files: Sequence[str | os.PathLike] = ()) -> None:
    """What ``data.synthetic`` training runs call: leave a complete data set in `out_dir` as it is, whatever
    seed or sizes made it (and, without a manifest, a data set made elsewhere whose `annotation_files` all
    exist); regenerate one made by an older generator version with its own parameters; generate the default
    set where there is none."""
    root = Path(out_dir)
    manifest = _read_manifest(root)
    if manifest is None and annotation_files and all(Path(f).is_file() for f in annotation_files):
        logger.info("using the data set in %s as it is (not made by this generator)", root)
        return
    defaults = _generation_defaults()
    ensure_dataset(root, **{key: value for key, value in (manifest or {}).items() if key in defaults})


def _generation_defaults() -> dict:
    parameters = inspect.signature(generate_dataset).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


def _read_manifest(root: Path) -> dict | None:
    try:
        return read_json(root / "manifest.json")
    except DataFileError:
        return None


def _is_complete(root: Path, params: dict) -> bool:
    paths = DatasetPaths.under(root)
    files = (paths.train, paths.val, paths.test, paths.val_gt, paths.test_gt, paths.metadata)
    return _read_manifest(root) == params and all(f.is_file() for f in files)


def _replaceable(out: Path) -> bool:
    return out.is_dir() and (_read_manifest(out) is not None or not any(out.iterdir()))


def parse_caption(caption: str) -> dict[str, str | int | None]:
    """Read count, colour, shape and position from a caption; None for what it does not state."""
    words = re.findall(r"[a-z]+", caption.lower())
    colour = next((w for w in words if w in COLOURS), None)
    shape_index = next((i for i, w in enumerate(words) if w in _WORD_TO_SHAPE), None)
    shape = _WORD_TO_SHAPE[words[shape_index]] if shape_index is not None else None
    return {
        "count": _parse_count(words, colour, shape_index),
        "colour": colour,
        "shape": shape,
        "position": next((_WORD_TO_POSITION[w] for w in words if w in _WORD_TO_POSITION), None),
    }


def _parse_count(words: list[str], colour: str | None, shape_index: int | None) -> int | None:
    """The determiner or number just before the noun phrase ("two red circles", "a single star")."""
    anchors = [words.index(colour)] if colour else []
    anchors += [shape_index] if shape_index is not None else []
    for anchor in anchors:
        if anchor > 0 and words[anchor - 1] in _WORD_TO_COUNT:
            return _WORD_TO_COUNT[words[anchor - 1]]
    # "a" and "an" are too common elsewhere ("a picture of") to count as a number on their own.
    return next((_WORD_TO_COUNT[w] for w in words if w in _WORD_TO_COUNT and w not in ("a", "an")), None)


def grounding_accuracy(captions: dict[int, str], metadata_path: str | os.PathLike) -> dict[str, float]:
    """Fraction of captions stating the true count, colour, shape and position (and all four).

    Args:
        captions: image id -> caption (cleaned or raw text).
        metadata_path: the data set's ``metadata.json``.

    Returns:
        {"count", "colour", "shape", "position", "all": accuracy in [0, 1], "num_images": N}; a caption
        that omits a fact counts as wrong; ids absent from the metadata are skipped with a warning.
    """
    facts = read_json(metadata_path)["images"]
    keys = ("count", "colour", "shape", "position")
    hits = dict.fromkeys((*keys, "all"), 0)
    scored = 0
    for image_id, caption in captions.items():
        truth = facts.get(str(int(image_id)))
        if truth is None:
            logger.warning("image id %s is not in %s; skipped", image_id, metadata_path)
            continue
        parsed = parse_caption(caption)
        correct = [parsed[key] == truth[key] for key in keys]
        for key, ok in zip(keys, correct, strict=True):
            hits[key] += ok
        hits["all"] += all(correct)
        scored += 1
    result = {key: value / scored if scored else 0.0 for key, value in hits.items()}
    result["num_images"] = float(scored)
    return result


def main(argv: list[str] | None = None) -> int:
    """Command line: generate (or reuse, when unchanged) the data set in ``--out``."""
    parser = ArgumentParser(prog="python -m data.synthetic", description="Generate the synthetic shapes data set.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num_train", type=int, default=4000, help="training images")
    parser.add_argument("--num_val", type=int, default=1000, help="validation images")
    parser.add_argument("--num_test", type=int, default=500, help="test images")
    parser.add_argument("--image_size", type=int, default=128, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the images and captions")
    parser.add_argument("--refs_per_image", type=int, default=5, help="reference captions per image")
    parser.add_argument("--image_format", choices=("jpg", "png"), default="jpg", help="image file format")
    add_flag(parser, "--force", "regenerate even if an identical set exists")
    parsed = parser.parse(argv)
    if isinstance(parsed, int):
        return parsed
    args = vars(parsed)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out, force = args.pop("out"), args.pop("force")
    started = time.perf_counter()
    paths = generate_dataset(out, **args) if force else ensure_dataset(out, **args)
    print(f"data set ready in {paths.root} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
