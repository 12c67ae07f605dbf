"""Tests for data.prepare_custom: CSV, JSON lines and image + .txt folders, reproducible splits or given
ones, the files of prepare_coco, messages naming file and line, and a training run on the prepared data."""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

import train_scst
from data.prepare_coco import DF_CACHE_NAME
from data.prepare_custom import main
from metrics.cider_df import DocumentFrequency
from metrics.coco_eval import load_ground_truth

pytestmark = pytest.mark.usefixtures("single_thread")
WORDS = ["red", "blue", "cat", "dog", "tree", "boat", "sky", "road"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 images in two folders, with two or three captions each (as rows of a caption table)."""
    root = tmp_path_factory.mktemp("custom_images")
    for i in range(12):
        path = root / ("indoor" if i % 2 else "outdoor") / f"img{i:02d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (24, 20), (20 * i, 100, 200 - 10 * i)).save(path)
    return root


def table(photos: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(photos.rglob("*.jpg")):
        i = int(path.stem[3:])
        for k in range(2 + i % 2):
            caption = f"A {WORDS[i % 8]}, {WORDS[(i + k) % 8]} and {WORDS[(i * 3 + k) % 8]}!"
            rows.append({"image": path.relative_to(photos).as_posix(), "caption": caption})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]], extra_lines: str = "") -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with path.open("a") as handle:
        handle.write(extra_lines)
    return path


def prepare(captions: Path | None, photos: Path, out: Path, *extra: str) -> int:
    args = ["--image_root", str(photos), "--out", str(out), *extra]
    return main(([] if captions is None else ["--captions", str(captions)]) + args)


def test_csv_gives_the_prepare_coco_files_and_a_reproducible_split(photos: Path, tmp_path: Path) -> None:
    rows = table(photos)
    captions = write_csv(tmp_path / "c.csv", rows)
    # as a spreadsheet exports it: a byte-order mark, the column names in any case and spacing
    captions.write_text("\ufeff" + captions.read_text().replace("image,caption", " Image,CAPTION ", 1), "utf-8")
    assert prepare(captions, photos, tmp_path / "a", "--val", "2", "--test", "0.25") == 0
    out = tmp_path / "a"
    train = json.loads((out / "train.json").read_text())
    splits = {s: json.loads((out / f"{s}.json").read_text()) for s in ("val", "test")}
    assert (len(splits["val"]), len(splits["test"])) == (2, 3)
    by_image: dict[str, list[str]] = {}
    for row in rows:
        by_image.setdefault(row["image"], []).append(row["caption"])
    train_images = {e["image"] for e in train}
    assert len(train_images) == 7 and len(train) == sum(len(by_image[i]) for i in train_images)
    held_out = {e["image"] for s in splits.values() for e in s}
    assert train_images.isdisjoint(held_out) and train_images | held_out == set(by_image)
    for split, entries in splits.items():
        gts = load_ground_truth(out / f"{split}_gt.json")
        assert {e["image_id"]: by_image[e["image"]] for e in entries} == gts
    df = DocumentFrequency.load(out / DF_CACHE_NAME)
    assert df.log_num_docs == pytest.approx(math.log(7))
    # Each caption of image i is "A <w1>, <w2> and <w3>!" (see table): lowercased, punctuation dropped and
    # counted with the end token, its words are a, and, <eos> and the three WORDS picked by the formula.
    expected: Counter[str] = Counter()
    for image in sorted(train_images):
        i = int(Path(image).stem[3:])
        picked = {WORDS[j % 8] for k in range(2 + i % 2) for j in (i, i + k, i * 3 + k)}
        expected.update({"a", "and", "<eos>"} | picked)
    assert {gram[0]: count for gram, count in df.counts.items() if len(gram) == 1} == expected

    shuffled = random.Random(1).sample(rows, len(rows))  # other row order, same seed: same split
    assert prepare(write_csv(tmp_path / "s.csv", shuffled), photos, tmp_path / "b", "--val", "2", "--test", "0.25") == 0
    assert {e["image"] for e in json.loads((tmp_path / "b" / "test.json").read_text())} == {
        e["image"] for e in splits["test"]
    }
    assert prepare(tmp_path / "c.csv", photos, tmp_path / "c", "--val", "2", "--test", "0.25", "--seed", "5") == 0
    other = [json.loads((tmp_path / "c" / f"{s}.json").read_text()) for s in ("val", "test")]
    assert [{e["image"] for e in s} for s in other] != [{e["image"] for e in s} for s in splits.values()]


def test_jsonl_with_a_split_key_and_caption_lists(photos: Path, tmp_path: Path) -> None:
    images = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.jpg"))
    splits = ["test", "val", "validation"] + ["train"] * 8 + ["restval"]
    lines = [json.dumps({"image": image, "caption": [f" a photo number {i}\t", f"picture {i}"], "split": split})
             for i, (image, split) in enumerate(zip(images, splits, strict=True))]  # fmt: skip
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n\n")
    assert prepare(tmp_path / "c.jsonl", photos, tmp_path / "out") == 0
    val = json.loads((tmp_path / "out" / "val.json").read_text())
    assert sorted(e["image"] for e in val) == images[1:3]
    assert val[0]["caption"] == ["a photo number 1", "picture 1"]
    assert len(json.loads((tmp_path / "out" / "train.json").read_text())) == 2 * 9


def test_rows_that_disagree_on_the_split_stop_the_preparation(photos: Path, tmp_path: Path, capsys) -> None:
    images = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*.jpg"))
    lines = [json.dumps({"image": image, "caption": "a photo", "split": split})
             for image, split in zip(images[:11], ["val", "test"] + ["train"] * 9, strict=True)]  # fmt: skip
    conflict = tmp_path / "conflict.jsonl"
    conflict.write_text("\n".join([*lines, json.dumps({"image": images[0], "caption": "more", "split": "train"})]))
    assert prepare(conflict, photos, tmp_path / "a") == 2
    assert f"{conflict}:12: split 'train' for {images[0]}, {conflict}:1 said 'val'" in capsys.readouterr().err
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join([*lines, json.dumps({"image": images[11], "caption": "a photo"})]))
    assert prepare(mixed, photos, tmp_path / "b") == 2
    assert "some rows name a split and others do not" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_folder_of_images_with_text_files(tmp_path: Path, monkeypatch, capsys) -> None:
    root = tmp_path / "pairs"
    root.mkdir()
    for i in range(6):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(root / f"p{i}.png")
        (root / f"p{i}.txt").write_text(f"a square of shade {i}\n\nthe shade {i} square\n")
    Image.new("RGB", (16, 16)).save(root / "uncaptioned.png")
    Image.new("RGB", (16, 16)).save(root / "blank.png")
    (root / "blank.txt").write_text("\n \n")
    monkeypatch.chdir(tmp_path)  # the folders given relative to the working directory, as typed
    assert prepare(None, Path("pairs"), Path("out"), "--val", "1", "--test", "1") == 2
    assert "pairs/blank.txt:1: empty caption for blank.png" in capsys.readouterr().err
    assert prepare(None, Path("pairs"), Path("out"), "--val", "1", "--test", "1", "--skip_invalid") == 0
    entries = [json.loads((tmp_path / "out" / f"{s}.json").read_text()) for s in ("train", "val", "test")]
    assert len(entries[0]) == 8 and len(entries[1]) == len(entries[2]) == 1
    assert entries[1][0]["caption"] == [f"a square of shade {entries[1][0]['image'][1]}",
                                        f"the shade {entries[1][0]['image'][1]} square"]  # fmt: skip
    data = (tmp_path / "out" / "data.yaml").read_text()
    assert f"image_root: {root.resolve()}" in data
    assert f"train_file: {(tmp_path / 'out' / 'train.json').resolve()}" in data  # absolute: read from anywhere


def test_problems_are_named_by_file_and_line(photos: Path, tmp_path: Path, capsys, caplog) -> None:
    rows = table(photos)[:12]
    bad = 'outdoor/img00.jpg,"   "\nnowhere/gone.jpg,a caption\nindoor/img01.jpg,a,b\n../escape.jpg,x\n'
    repeated = {**rows[0], "caption": rows[0]["caption"].upper().replace("!", " .")}  # the same words: a duplicate
    captions = write_csv(tmp_path / "c.csv", [*rows, repeated], bad)
    assert prepare(captions, photos, tmp_path / "out") == 2
    err = capsys.readouterr().err
    first = len(rows) + 3  # header, rows, the duplicate
    assert f"{captions}:{first}: empty caption for outdoor/img00.jpg" in err
    assert f"{captions}:{first + 1}: image nowhere/gone.jpg not found under {photos}" in err
    assert f"{captions}:{first + 2}: unreadable row: expected 2 fields" in err
    assert f"{captions}:{first + 3}: image path '../escape.jpg' must name a file under --image_root" in err
    assert "4 unusable rows" in err and not (tmp_path / "out").exists()
    assert prepare(captions, photos, tmp_path / "out", "--skip_invalid", "--val", "1", "--test", "1") == 0
    assert f"{captions}:{len(rows) + 2}: duplicate of {captions}:2" in caplog.text
    train = json.loads((tmp_path / "out" / "train.json").read_text())
    held_out = sum(len(json.loads((tmp_path / "out" / f"{s}.json").read_text())[0]["caption"]) for s in ("val", "test"))
    assert len(train) + held_out == len(rows)
    (tmp_path / "header.csv").write_text("path,text\na.jpg,b\n")
    assert prepare(tmp_path / "header.csv", photos, tmp_path / "o2") == 2
    assert "must name the columns 'image' and 'caption'" in capsys.readouterr().err


def test_train_on_the_prepared_data(tiny_dataset: Path, tmp_path: Path) -> None:
    """A caption table built from the shapes images, prepared and trained on for one epoch."""
    entries = json.loads((tiny_dataset / "train.json").read_text())
    for split in ("val", "test"):
        held_out = json.loads((tiny_dataset / f"{split}.json").read_text())
        entries += [{"image": e["image"], "caption": c} for e in held_out for c in e["caption"]]
    rows = [{"image": e["image"], "caption": e["caption"]} for e in entries]
    prepared = tmp_path / "prepared"
    assert prepare(write_csv(tmp_path / "shapes.csv", rows), tiny_dataset, prepared, "--val", "8", "--test", "8") == 0
    run = tmp_path / "run"
    args = [
        "--config", str(prepared / "data.yaml"), "--vision_config", "swin_demo",
        "--gpt2_config", "{n_layer: 1, n_embd: 32, n_head: 2, n_positions: 48}", "--output_vocab", "train",
        "--epochs", "1", "--max_steps_per_epoch", "3", "--batch_size", "8", "--eval_batch_size", "8", "--augment=False",
        "--num_workers", "0", "--device", "cpu", "--max_len", "8", "--min_len", "1", "--val_meteor=False",
        "--output_dir", str(run),
    ]  # fmt: skip
    assert train_scst.main(args) == 0
    predictions = json.loads((run / "test_predictions.json").read_text())
    test_ids = {e["image_id"] for e in json.loads((prepared / "test.json").read_text())}
    assert {p["image_id"] for p in predictions} == test_ids and len(test_ids) == 8
    report = json.loads((run / "test_metrics.json").read_text())
    assert report["coverage"]["n_evaluated"] == report["coverage"]["n_ground_truth"] == 8
    # CIDEr-D is positive exactly when some caption shares with its own references an n-gram that not every
    # scored image's references hold (idf log(N / df) > 0), and at most 10; the references are the prepared
    # test_gt.json, read here from disk.
    references: dict[int, list[str]] = {}
    for annotation in json.loads((prepared / "test_gt.json").read_text())["annotations"]:
        references.setdefault(annotation["image_id"], []).append(annotation["caption"])
    assert set(references) == test_ids
    grams = {image_id: [_ngrams(ref) for ref in refs] for image_id, refs in references.items()}
    df = Counter(gram for per_ref in grams.values() for gram in set().union(*per_ref))
    informative = any(
        gram in set().union(*grams[p["image_id"]]) and df[gram] < len(grams)
        for p in predictions
        for gram in _ngrams(p["caption"])
    )
    cider = report["metrics"]["CIDEr"]
    assert (cider > 0.0) is informative and cider <= 10.0, (cider, predictions)


def _ngrams(caption: str) -> set[tuple[str, ...]]:
    """The 1- to 4-grams of a caption as the PTB tokenizer splits these (lowercase, punctuation dropped)."""
    words = re.findall(r"[a-z0-9]+", caption.lower())
    return {tuple(words[i : i + n]) for n in range(1, 5) for i in range(len(words) - n + 1)}
