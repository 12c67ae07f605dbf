"""Data preparation from Karpathy's dataset_*.json and X-VLM's coco_karpathy_*.json (tiny fabricated sets)."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

import pytest
from PIL import Image
from pycocotools.coco import COCO

from data.prepare_coco import DF_CACHE_NAME, main
from metrics.cider_df import DocumentFrequency
from metrics.coco_eval import load_ground_truth

# (cocoid, split, folder, captions)
COCO_IMAGES = [
    (9, "train", "train2014", ["A cat on a mat.", "A cat sitting on a rug!"]),
    (25, "train", "train2014", ["Two giraffes, standing.", "Giraffes near a tree"]),
    (133, "restval", "val2014", ["A man-made lake at dusk.", "  ", "A lake with boats."]),
    (42, "val", "val2014", ["A dog runs.", "A brown dog running."]),
    (73, "val", "val2014", ["A red bus.", "Bus on a street."]),
    (391895, "test", "val2014", ["A man riding a bike.", "Cyclist on a road.", "A person on a bicycle."]),
]


def image_path(cocoid: int, folder: str) -> str:
    return f"{folder}/COCO_{folder}_{cocoid:012d}.jpg"


def make_images(root: Path, paths: list[str]) -> None:
    for path in paths:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 3), (120, 30, 200)).save(root / path)


def karpathy_json(with_cocoid: bool = True) -> dict:
    images = []
    for imgid, (cocoid, split, folder, captions) in enumerate(COCO_IMAGES):
        entry = {
            "split": split,
            "imgid": imgid,
            "sentences": [{"raw": c + " ", "tokens": c.split()} for c in captions],  # raw ends with a space
        }
        if with_cocoid:
            entry |= {"filepath": folder, "filename": Path(image_path(cocoid, folder)).name, "cocoid": cocoid}
        else:
            entry["filename"] = f"{1000 + imgid}_5f3a{imgid}b.jpg"
        images.append(entry)
    return {"images": images, "dataset": "coco" if with_cocoid else "flickr8k"}


@pytest.fixture
def coco_setup(tmp_path):
    root = tmp_path / "images"
    make_images(root, [image_path(cocoid, folder) for cocoid, _, folder, _ in COCO_IMAGES])
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps(karpathy_json()))
    return karpathy, root, tmp_path / "out"


def read(path: Path):
    return json.loads(path.read_text())


def test_karpathy_round_trip(coco_setup):
    karpathy, root, out = coco_setup
    assert main(["--karpathy", str(karpathy), "--image_root", str(root), "--out", str(out), "--no_df"]) == 0
    train = read(out / "train.json")
    assert len(train) == 6  # 2 + 2 + 2 (restval folded in; the blank caption dropped)
    assert {e["image_id"] for e in train} == {9, 25, 133}
    assert {
        "image": "val2014/COCO_val2014_000000000133.jpg",
        "caption": "A man-made lake at dusk.",
        "image_id": 133,
    } in train
    val = read(out / "val.json")
    assert val[0] == {
        "image": image_path(42, "val2014"),
        "caption": ["A dog runs.", "A brown dog running."],
        "image_id": 42,
    }
    assert [e["image_id"] for e in read(out / "test.json")] == [391895]
    test_gt = load_ground_truth(out / "test_gt.json")
    assert test_gt == {391895: COCO_IMAGES[-1][3]}
    assert load_ground_truth(out / "val.json") == load_ground_truth(out / "val_gt.json")
    coco = COCO(str(out / "val_gt.json"))
    assert sorted(coco.getImgIds()) == [42, 73]
    assert len(coco.getAnnIds()) == 4
    assert [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=73))] == COCO_IMAGES[4][3]
    assert coco.loadImgs(73)[0]["file_name"] == image_path(73, "val2014")
    assert not (out / DF_CACHE_NAME).exists()


def test_flickr_layout_uses_imgid(tmp_path):
    data = karpathy_json(with_cocoid=False)
    root = tmp_path / "flickr"
    make_images(root, [image["filename"] for image in data["images"]])
    karpathy = tmp_path / "dataset_flickr8k.json"
    karpathy.write_text(json.dumps(data))
    out = tmp_path / "out"
    assert main(["--karpathy", str(karpathy), "--image_root", str(root), "--out", str(out), "--no_df"]) == 0
    assert [e["image_id"] for e in read(out / "val.json")] == [3, 4]
    assert read(out / "val.json")[0]["image"] == "1003_5f3a3b.jpg"
    assert set(load_ground_truth(out / "test_gt.json")) == {5}


def test_missing_images_stop_or_are_dropped(coco_setup, capsys):
    karpathy, root, out = coco_setup
    gone = image_path(73, "val2014")
    (root / gone).unlink()
    assert main(["--karpathy", str(karpathy), "--image_root", str(root), "--out", str(out), "--no_df"]) == 2
    err = capsys.readouterr().err
    assert f"1 of 6 images are missing under {root}" in err and gone in err and "--drop_missing" in err
    assert not (out / "train.json").exists()
    assert (
        main(
            [
                "--karpathy",
                str(karpathy),
                "--image_root",
                str(root),
                "--out",
                str(out),
                "--no_df",
                "--drop_missing",
            ]
        )
        == 0
    )
    assert [e["image_id"] for e in read(out / "val.json")] == [42]
    assert set(load_ground_truth(out / "val_gt.json")) == {42}


def test_wrong_image_root_is_reported(coco_setup, capsys):
    karpathy, root, out = coco_setup
    assert main(["--karpathy", str(karpathy), "--image_root", str(root / "nope"), "--out", str(out)]) == 2
    assert "6 of 6 images are missing" in capsys.readouterr().err


def test_xvlm_files(tmp_path):
    root = tmp_path / "images"
    # every caption padded, and blank ones kept (image 133's, one more per val/test image): both are cleaned
    train = [
        {"image": image_path(c, f), "caption": f" {cap} ", "image_id": f"coco_{c}"}
        for c, s, f, caps in COCO_IMAGES
        if s in ("train", "restval")
        for cap in caps
    ]
    splits = {"train": train}
    for split in ("val", "test"):
        splits[split] = [
            {"image": image_path(c, f), "caption": [f"{cap}\n" for cap in [*caps, " "]]}
            for c, s, f, caps in COCO_IMAGES
            if s == split
        ]
    xvlm = tmp_path / "xvlm"
    xvlm.mkdir()
    for split, entries in splits.items():
        (xvlm / f"coco_karpathy_{split}.json").write_text(json.dumps(entries))
    make_images(root, [image_path(cocoid, folder) for cocoid, _, folder, _ in COCO_IMAGES])
    out = tmp_path / "out"
    assert main(["--xvlm_dir", str(xvlm), "--image_root", str(root), "--out", str(out), "--no_df"]) == 0
    assert sorted((e["image_id"], e["caption"]) for e in read(out / "train.json")) == sorted(
        (c, cap) for c, s, _, caps in COCO_IMAGES if s in ("train", "restval") for cap in caps if cap.strip()
    )
    assert [e["caption"] for e in read(out / "val.json")] == [COCO_IMAGES[3][3], COCO_IMAGES[4][3]]
    assert load_ground_truth(out / "val_gt.json") == {42: COCO_IMAGES[3][3], 73: COCO_IMAGES[4][3]}


def test_duplicate_ids_are_rejected(coco_setup, capsys):
    karpathy, root, out = coco_setup
    data = read(karpathy)
    data["images"][1]["cocoid"] = 9
    karpathy.write_text(json.dumps(data))
    assert main(["--karpathy", str(karpathy), "--image_root", str(root), "--out", str(out), "--no_df"]) == 2
    assert "share image id 9" in capsys.readouterr().err


# The training references (train + restval) as the reward reads them, written out by hand: lower case,
# punctuation dropped, "-" made a space, no stop token; the blank caption is left out.
CLEANED_TRAINING_REFERENCES = [
    ["a cat on a mat", "a cat sitting on a rug"],
    ["two giraffes standing", "giraffes near a tree"],
    ["a man made lake at dusk", "a lake with boats"],
]


def test_document_frequencies_of_training_references(coco_setup):
    karpathy, root, out = coco_setup
    previous = os.umask(0o022)
    try:
        assert main(["--karpathy", str(karpathy), "--image_root", str(root), "--out", str(out)]) == 0
    finally:
        os.umask(previous)
    # readable by the group and others, as the umask allows (not mkstemp's 0600)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        name: 0o644 for name in ("train.json", "val.json", "test.json", "val_gt.json", "test_gt.json", DF_CACHE_NAME)
    }
    df = DocumentFrequency.load(out / DF_CACHE_NAME)
    assert df.log_num_docs == pytest.approx(math.log(3))  # train + restval images only
    expected: dict[tuple[str, ...], float] = {}
    for refs in CLEANED_TRAINING_REFERENCES:
        grams = set()
        for ref in refs:
            words = (ref + " <eos>").split()  # counted as the reward reads them
            grams |= {tuple(words[i : i + n]) for n in range(1, 5) for i in range(len(words) - n + 1)}
        for gram in grams:
            expected[gram] = expected.get(gram, 0.0) + 1.0
    assert df.counts == expected
    assert df.counts[("a",)] == 3 and df.counts[("man", "made", "lake")] == 1 and ("dog",) not in df.counts
    assert df.counts[("<eos>",)] == 3 and df.counts[("dusk", "<eos>")] == 1 and df.counts_eos
