"""Tests for the synthetic shapes data set (data.synthetic)."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from data import synthetic
from data.synthetic import (
    DatasetPaths,
    ensure_dataset,
    generate_dataset,
    grounding_accuracy,
    parse_caption,
)
from metrics.cider import CiderD

SMALL = {"num_train": 20, "num_val": 5, "num_test": 5, "image_size": 64, "seed": 1}


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> DatasetPaths:
    return generate_dataset(tmp_path_factory.mktemp("synth") / "set", **SMALL)


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def trailing_number(name: str) -> int:
    return int(re.search(r"(\d+)$", Path(name).stem).group(1))


def test_layout_and_train_file(small_set: DatasetPaths) -> None:
    train = load(small_set.train)
    assert len(train) == 20 * 5
    assert set(train[0]) == {"image", "caption", "image_id"}
    per_image = Counter(entry["image"] for entry in train)
    assert len(per_image) == 20 and set(per_image.values()) == {5}
    for entry in train:
        assert isinstance(entry["caption"], str) and isinstance(entry["image_id"], str)
        assert int(entry["image_id"]) == trailing_number(entry["image"])
        assert (small_set.image_root / entry["image"]).is_file()
    assert sorted(p.name for p in (small_set.root / "images").iterdir()) == ["test", "train", "val"]


def test_images_are_rgb_at_the_requested_size(small_set: DatasetPaths) -> None:
    for entry in load(small_set.test):
        with Image.open(small_set.image_root / entry["image"]) as image:
            assert image.mode == "RGB" and image.size == (64, 64)


def nearest_colour(patch: np.ndarray) -> str:
    """The name in the generator's palette (shape colours and backgrounds) closest to a patch's mean."""
    palette = {**synthetic.COLOURS, **synthetic.BACKGROUNDS}
    mean = patch.reshape(-1, 3).mean(axis=0)
    return min(palette, key=lambda name: np.linalg.norm(mean - np.asarray(palette[name])))


# Where the centres of a group stated "on the left" (and so on) must lie, as fractions of the image side.
STATED_PLACE = {
    "left": lambda xs, ys: xs.max() < 0.35,
    "right": lambda xs, ys: xs.min() > 0.65,
    "top": lambda xs, ys: ys.max() < 0.35,
    "bottom": lambda xs, ys: ys.min() > 0.65,
    "center": lambda xs, ys: np.all(np.abs(np.concatenate([xs, ys]) - 0.5) < 0.2),
    "scattered": lambda xs, ys: np.ptp(xs) > 0.4 and np.ptp(ys) > 0.4,
}


def test_images_show_their_shapes_in_the_stated_colour_place_and_background(tmp_path: Path) -> None:
    # 96 pixels: even the smallest star (radius about 5 pixels) has a centre its edges do not blend into
    size = 96
    paths = generate_dataset(tmp_path / "set", num_train=40, num_val=0, num_test=0, image_size=size, seed=1)
    for fact in load(paths.metadata)["images"].values():
        pixels = np.asarray(Image.open(paths.image_root / fact["image"]), dtype=float)
        assert nearest_colour(pixels[1:4, 1:4]) == fact["background"], fact  # a corner no shape reaches
        for x, y, _ in fact["objects"]:
            centre = pixels[round(y) - 1 : round(y) + 2, round(x) - 1 : round(x) + 2]
            assert nearest_colour(centre) == fact["colour"], fact
        xs, ys = (np.array([obj[i] for obj in fact["objects"]]) / size for i in (0, 1))
        assert STATED_PLACE[fact["position"]](xs, ys), fact


def test_coco_ground_truth_matches_split_files(small_set: DatasetPaths) -> None:
    all_ids = {int(e["image_id"]) for e in load(small_set.train)}
    for split_path, gt_path in ((small_set.val, small_set.val_gt), (small_set.test, small_set.test_gt)):
        coco = COCO(str(gt_path))
        split = load(split_path)
        assert len(split) == 5
        assert sorted(coco.getImgIds()) == sorted(trailing_number(e["image"]) for e in split)
        for entry in split:
            image_id = trailing_number(entry["image"])
            assert coco.imgs[image_id]["file_name"] == entry["image"]
            captions = [a["caption"] for a in coco.loadAnns(coco.getAnnIds(imgIds=image_id))]
            assert captions == entry["caption"] and len(set(captions)) == 5
        ann_ids = [a["id"] for a in coco.dataset["annotations"]]
        assert len(ann_ids) == len(set(ann_ids)) == 25
        assert not all_ids & set(coco.getImgIds())
        all_ids |= set(coco.getImgIds())


def test_metadata_covers_every_image(small_set: DatasetPaths) -> None:
    facts = load(small_set.metadata)["images"]
    assert len(facts) == 30
    for image_id, fact in facts.items():
        assert int(image_id) == trailing_number(fact["image"])
        assert fact["shape"] in synthetic.SHAPES and fact["colour"] in synthetic.COLOURS
        assert fact["position"] in synthetic.POSITIONS and fact["background"] in synthetic.BACKGROUNDS
        assert 1 <= fact["count"] <= 4 and len(fact["objects"]) == fact["count"]


def test_captions_are_plain_words_that_state_the_facts(small_set: DatasetPaths) -> None:
    facts = load(small_set.metadata)["images"]
    for entry in load(small_set.val) + load(small_set.test):
        fact = facts[str(trailing_number(entry["image"]))]
        for caption in entry["caption"]:
            assert re.fullmatch(r"[a-z]+( [a-z]+)*", caption), caption
            assert 6 <= len(caption.split()) <= 18
            stated = synthetic.parse_caption(caption)
            assert stated == {key: fact[key] for key in ("count", "colour", "shape", "position")}, caption


def test_templates_follow_their_weights_and_no_wording_recurs_in_every_image() -> None:
    markers = (
        "background with",
        "against a",
        "a picture of",
        "there",
        "an image showing",
        "drawing",
        "on a",  # checked after the four templates above that also end with "on a ... background"
    )
    rng = np.random.default_rng(0)
    usage = Counter()
    images_with = Counter()
    for _ in range(400):
        scene = synthetic.sample_scene(rng, 128)
        used = [
            next((m for m in markers if m in caption), "bare") for caption in synthetic.make_references(scene, rng, 5)
        ]
        usage.update(used)
        images_with.update(set(used))
    total = 400 * 5
    # weight 0.3 for the bare phrase, 0.1 for each other template; a repeated caption is redrawn, and the
    # bare phrase, with the fewest variants, repeats most
    assert 0.22 * total < usage["bare"] < 0.3 * total, usage
    assert all(0.08 * total < usage[m] < 0.13 * total for m in markers), usage
    assert max(images_with.values()) < 0.9 * 400, images_with


def test_most_likely_wording_is_not_the_consensus_one() -> None:
    """The bare phrase is the most common reference, but naming the background scores higher CIDEr-D."""
    rng = np.random.default_rng(3)
    scenes = [synthetic.sample_scene(rng, 128) for _ in range(300)]
    gts = {i: synthetic.make_references(scene, rng, 5) for i, scene in enumerate(scenes)}
    bare = {i: [synthetic._fill("{n} {c} {s} {p}", scene, rng)] for i, scene in enumerate(scenes)}
    with_background = {i: [f"{bare[i][0]} on a {scene.background} background"] for i, scene in enumerate(scenes)}
    bare_score, _ = CiderD().compute_score(gts, bare)
    background_score, _ = CiderD().compute_score(gts, with_background)
    assert background_score > 1.1 * bare_score, (bare_score, background_score)


def test_references_are_distinct_for_any_count() -> None:
    rng = np.random.default_rng(5)
    for trial in range(600):
        scene = synthetic.sample_scene(rng, 96)
        num_refs = trial % 10 + 1
        refs = synthetic.make_references(scene, rng, num_refs)
        assert len(refs) == len(set(refs)) == num_refs
        assert all(6 <= len(ref.split()) <= 18 for ref in refs)
        assert all(parse_caption(ref)["position"] == scene.position for ref in refs)


def test_same_seed_is_deterministic(tmp_path: Path, small_set: DatasetPaths) -> None:
    again = generate_dataset(tmp_path / "again", **SMALL)
    for name in ("train", "val", "test", "val_gt", "test_gt", "metadata"):
        assert load(getattr(again, name)) == load(getattr(small_set, name))
    first = np.asarray(Image.open(small_set.image_root / load(small_set.test)[0]["image"]))
    second = np.asarray(Image.open(again.image_root / load(again.test)[0]["image"]))
    assert np.array_equal(first, second)
    other = generate_dataset(tmp_path / "other", **{**SMALL, "seed": 2})
    assert load(other.train) != load(small_set.train)


def identity(path: Path) -> tuple[int, int, int]:
    """Which file ``path`` is: a rewrite or a rename gives a new inode, an edit in place a new ctime."""
    status = path.stat()
    return status.st_dev, status.st_ino, status.st_ctime_ns


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What data.synthetic logged since the last call, then forgotten."""
    found = [r.getMessage() for r in caplog.records if r.name == "data.synthetic"]
    caplog.clear()
    return found


def assert_generated(caplog: pytest.LogCaptureFixture, images: int, out: Path) -> None:
    """generate_dataset ran once since the last look, and reported ``images`` images written into ``out``."""
    found = messages(caplog)
    pattern = rf"generated {images} images into {re.escape(str(out))} in \d+\.\d s"
    assert len(found) == 1 and re.fullmatch(pattern, found[0]), found


def test_ensure_dataset_regenerates_only_on_change(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="data.synthetic")
    out = tmp_path / "set"
    paths = ensure_dataset(out, **SMALL)
    assert_generated(caplog, 30, out)
    before = {path: identity(path) for path in (paths.root, paths.train, paths.manifest)}
    assert ensure_dataset(out, **SMALL) == paths
    assert messages(caplog) == [f"synthetic data set in {out} is up to date"]
    assert {path: identity(path) for path in before} == before  # reused: not one file written again
    changed = ensure_dataset(out, **{**SMALL, "num_train": 21})
    assert_generated(caplog, 31, out)
    # the new set was built beside the old one before replacing it, so each of its files is a new inode
    assert all(identity(path)[:2] != before[path][:2] for path in before)
    assert len({e["image"] for e in load(changed.train)}) == 21
    assert load(changed.manifest)["num_train"] == 21
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no temporary folders left behind


def test_ensure_dataset_repairs_an_incomplete_set(tmp_path: Path) -> None:
    """A missing file makes the set incomplete: it is generated again, the same as before (same seed)."""
    paths = ensure_dataset(tmp_path / "set", **SMALL)
    before = paths.test_gt.read_bytes(), paths.train.read_bytes()
    paths.test_gt.unlink()
    repaired = ensure_dataset(tmp_path / "set", **SMALL)
    assert (repaired.test_gt.read_bytes(), repaired.train.read_bytes()) == before


def test_training_keeps_any_current_set_and_upgrades_an_old_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="data.synthetic")
    paths = generate_dataset(tmp_path / "set", **SMALL)  # seed 1, not the default seed
    assert_generated(caplog, 30, paths.root)
    before = identity(paths.train)
    synthetic.ensure_generated(paths.root)
    assert messages(caplog) == [f"synthetic data set in {paths.root} is up to date"]
    assert identity(paths.train) == before and load(paths.manifest)["seed"] == 1
    manifest = load(paths.manifest)
    paths.manifest.write_text(json.dumps({**manifest, "generator_version": synthetic.GENERATOR_VERSION - 1}))
    synthetic.ensure_generated(paths.root)
    assert_generated(caplog, 30, paths.root)
    assert identity(paths.train)[:2] != before[:2]
    assert load(paths.manifest) == manifest  # regenerated by this version with the set's own parameters
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    files = [foreign / f"{split}.json" for split in ("train", "val", "test")]
    for file in files:
        file.write_text("[]")
    kept = [identity(file) for file in files]
    synthetic.ensure_generated(foreign, files)
    assert messages(caplog) == [f"using the data set in {foreign} as it is (not made by this generator)"]
    assert sorted(p.name for p in foreign.iterdir()) == ["test.json", "train.json", "val.json"]
    assert [identity(file) for file in files] == kept and all(file.read_text() == "[]" for file in files)


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="mine"):
        generate_dataset(tmp_path / "mine", **SMALL)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(TypeError, match="num_trian"):
        ensure_dataset(tmp_path / "x", num_trian=3)


def test_grounding_accuracy_on_references_and_wrong_captions(small_set: DatasetPaths) -> None:
    references: dict[int, list[str]] = {}
    for entry in load(small_set.train):
        references.setdefault(int(entry["image_id"]), []).append(entry["caption"])
    for k in range(5):
        scores = grounding_accuracy({i: refs[k] + " ." for i, refs in references.items()}, small_set.metadata)
        assert scores == {
            "count": 1.0,
            "colour": 1.0,
            "shape": 1.0,
            "position": 1.0,
            "all": 1.0,
            "num_images": 20,
        }

    facts = load(small_set.metadata)["images"]
    wrong, wrong_colour = {}, {}
    for image_id, refs in references.items():
        fact = facts[str(image_id)]
        colour = "green" if fact["colour"] != "green" else "red"
        wrong[image_id] = f"a picture of many {colour} things"
        wrong_colour[image_id] = " ".join(colour if word == fact["colour"] else word for word in refs[0].split())
    scores = grounding_accuracy(wrong, small_set.metadata)
    assert scores["colour"] == 0.0 and scores["shape"] == 0.0 and scores["count"] == 0.0
    assert scores["all"] == 0.0
    # three facts of four right on every image: "all" needs the four
    scores = grounding_accuracy(wrong_colour, small_set.metadata)
    assert (scores["count"], scores["colour"], scores["shape"], scores["position"]) == (1.0, 0.0, 1.0, 1.0)
    assert scores["all"] == 0.0


def test_grounding_skips_unknown_ids(small_set: DatasetPaths, caplog: pytest.LogCaptureFixture) -> None:
    scores = grounding_accuracy({123456: "two red circles on the left"}, small_set.metadata)
    assert scores["num_images"] == 0 and scores["all"] == 0.0
    assert "123456" in caplog.text


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a picture of two red circles on the left.", (2, "red", "circle", "left")),
        ("there is a single orange star in the upper part of the image", (1, "orange", "star", "top")),
        ("an orange square in the middle", (1, "orange", "square", "center")),
        ("four triangles spread out", (4, None, "triangle", "scattered")),
        ("a picture of a blue thing", (1, "blue", None, None)),
        ("a picture of something", (None, None, None, None)),
    ],
)
def test_parse_caption(caption: str, expected: tuple) -> None:
    parsed = parse_caption(caption)
    assert (parsed["count"], parsed["colour"], parsed["shape"], parsed["position"]) == expected


def test_cli_generates_and_reuses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    args = ["--out", str(out), "--num_train", "3", "--num_val", "2", "--num_test", "2"]
    args += ["--image_size", "48", "--image_format", "png"]
    assert synthetic.main(args) == 0
    manifest = load(out / "manifest.json")
    assert manifest["image_format"] == "png" and manifest["image_size"] == 48
    assert len(list((out / "images" / "val").glob("*.png"))) == 2
    ready = rf"data set ready in {re.escape(str(out))} \(\d+\.\d s\)\n"
    assert re.fullmatch(ready, capsys.readouterr().out)
    before = identity(out / "train.json")
    assert synthetic.main(args) == 0
    assert re.fullmatch(ready, capsys.readouterr().out)
    assert identity(out / "train.json") == before and load(out / "manifest.json") == manifest  # reused
    assert synthetic.main([*args, "--force"]) == 0
    assert re.fullmatch(ready, capsys.readouterr().out)
    assert identity(out / "train.json")[:2] != before[:2] and load(out / "manifest.json") == manifest
