"""A COCO-shaped data set for benchmarks: real-size JPEGs of COCO's usual sizes, five captions per image,
one training entry per caption, the annotation layout of ``data/prepare_coco.py``.

Image content comes from the real COCO photos in ``shared/real_images`` (random crops, flips and rescales,
so that the JPEGs decode like photos, not like flat synthetic pictures); captions are real captioner output
from ``shared/opg_karpathy_test_predictions.json``, five drawn at random per image. Without ``shared/``
the images are smooth random noise and the captions a few templates.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
from PIL import Image

SHARED = Path(os.environ.get("OPG_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
# (width, height) and how often COCO uses it (roughly: most images are 640 on the long side).
SIZES = (((640, 480), 0.45), ((480, 640), 0.15), ((640, 427), 0.2), ((427, 640), 0.08), ((500, 375), 0.07),
         ((640, 640), 0.05))  # fmt: skip
_FALLBACK_CAPTIONS = ("a man riding a wave on top of a surfboard", "a plate of food on a wooden table",
                      "a group of people standing in a field", "a cat sitting on a laptop keyboard")  # fmt: skip


def _sources() -> list[Image.Image]:
    photos = sorted((SHARED / "real_images").glob("*.jpg"))
    return [Image.open(p).convert("RGB") for p in photos]


def _captions() -> list[str]:
    path = SHARED / "opg_karpathy_test_predictions.json"
    if not path.is_file():
        return list(_FALLBACK_CAPTIONS)
    return [item["caption"] for item in json.loads(path.read_text())]


def _image(rng: random.Random, sources: list[Image.Image], size: tuple[int, int]) -> Image.Image:
    if not sources:
        noise = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (size[1] // 8, size[0] // 8, 3))
        return Image.fromarray(noise.astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    photo = rng.choice(sources)
    scale = rng.uniform(0.5, 1.0)
    w, h = int(photo.width * scale), int(photo.height * scale)
    x, y = rng.randrange(photo.width - w + 1), rng.randrange(photo.height - h + 1)
    crop = photo.crop((x, y, x + w, y + h)).resize(size, Image.Resampling.BILINEAR)
    return crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop


def make_coco_like(root: str | os.PathLike, num_train: int, num_val: int, num_test: int, seed: int = 0) -> Path:
    """Write ``train2014/``, ``val2014/`` and ``annotations/{train,val,test}.json`` under ``root`` (kept
    when a set of the same sizes is already there). Returns the annotations folder."""
    root = Path(root)
    out = root / "annotations"
    stamp = out / "sizes.json"
    sizes = {"train": num_train, "val": num_val, "test": num_test, "seed": seed}
    if stamp.is_file() and json.loads(stamp.read_text()) == sizes:
        return out
    rng, sources, captions = random.Random(seed), _sources(), _captions()
    shapes, weights = zip(*SIZES, strict=True)
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    image_id = 0
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        folder = "train2014" if split == "train" else "val2014"
        (root / folder).mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            image_id += 1
            name = f"{folder}/COCO_{folder}_{image_id:012d}.jpg"
            _image(rng, sources, rng.choices(shapes, weights)[0]).save(root / name, quality=90)
            refs = rng.sample(captions, 5) if len(captions) >= 5 else [rng.choice(captions) for _ in range(5)]
            if split == "train":
                splits[split] += [{"image": name, "caption": c, "image_id": image_id} for c in refs]
            else:
                splits[split].append({"image": name, "caption": refs, "image_id": image_id})
    out.mkdir(parents=True, exist_ok=True)
    for split, entries in splits.items():
        (out / f"{split}.json").write_text(json.dumps(entries))
    stamp.write_text(json.dumps(sizes))
    return out
