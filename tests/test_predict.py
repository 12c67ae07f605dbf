"""Tests for predict.py: a tiny checkpoint, images of every supported format plus broken files, every
output format, usage errors, the real photos in shared/, and the command line end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import SHARED
from PIL import Image

import predict
from data.image_io import load_image
from data.transforms import build_transform
from engine.config import Config
from models.decoding import DecodeOptions, captions_from_tokens, decode
from models.pretrained import load_model
from models.tokenizer import load_tokenizer
from utils.io import assign_image_ids

REPO_ROOT = Path(__file__).resolve().parents[1]
GOOD = {
    "COCO_val2014_000000000042.jpg": "JPEG",
    "photo_7.png": "PNG",
    "nested/deeper/beach.webp": "WEBP",
    "nested/dog.bmp": "BMP",
    "nested/anim.gif": "GIF",
    "scan 12.tiff": "TIFF",
}
BAD = ["truncated.jpg", "nested/notes.png", "empty.jpeg"]


pytestmark = pytest.mark.usefixtures("single_thread", "hub_offline")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint: Path) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def stopping_checkpoint(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with GPT-2's last LayerNorm biased towards the end-of-text embedding (the output layer
    is tied to it): greedy captions mostly end at once, so that min_len, the beams and the length penalty each
    change what comes out."""
    payload = torch.load(tiny_checkpoint, weights_only=True)
    weights = payload["model"]
    weights["gpt.transformer.ln_f.bias"] += 20 * weights["gpt.transformer.wte.weight"][50256]
    path = tmp_path_factory.mktemp("stopping") / "stopping.pt"
    torch.save(payload, path)
    return path


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i, (name, fmt) in enumerate(GOOD.items()):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        colour = (40 * i, 255 - 30 * i, 90)
        mode = "RGBA" if fmt == "PNG" else "RGB"
        Image.new(mode, (64 + 16 * i, 48), colour).save(path, format=fmt)
    full = root / "full.jpg"
    Image.effect_noise((200, 150), 60).convert("RGB").save(full, quality=90)
    (root / "truncated.jpg").write_bytes(full.read_bytes()[:700])
    full.unlink()
    (root / "nested" / "notes.png").write_text("not an image at all\n")
    (root / "empty.jpeg").write_bytes(b"")
    return root


def run_predict(checkpoint: Path, inputs: list[str], *extra: str) -> int:
    return predict.main(
        ["--checkpoint", str(checkpoint), "--images", *inputs, "--num_workers", "0", "--no_progress", *extra]
    )


def good_paths(image_dir: Path) -> list[str]:
    return sorted(str(image_dir / name) for name in GOOD)


def test_good_images_captioned_bad_ones_reported(checkpoint, image_dir, tmp_path, capsys) -> None:
    out = tmp_path / "captions.json"
    status = run_predict(checkpoint, [str(image_dir)], "--output", str(out), "--batch_size", "4")
    assert status == 1
    results = json.loads(out.read_text())
    assert sorted(r["file_name"] for r in results) == good_paths(image_dir)
    assert all(isinstance(r["caption"], str) and r["caption"] for r in results)
    ids = {Path(r["file_name"]).name: r["image_id"] for r in results}
    assert ids["COCO_val2014_000000000042.jpg"] == 42 and ids["photo_7.png"] == 7 and ids["scan 12.tiff"] == 12
    assert len(set(ids.values())) == len(ids)
    err = capsys.readouterr().err
    assert f"captioned {len(GOOD)} of {len(GOOD) + len(BAD)} images" in err
    for name, reason in zip(BAD, ["truncated", "not a recognised image", "empty file"], strict=True):
        line = next(line for line in err.splitlines() if line.startswith(f"failed: {image_dir / name}"))
        assert reason in line


@pytest.mark.parametrize("name, fmt", [("out.jsonl", None), ("out.csv", None), ("results.txt", "jsonl")])
def test_output_formats(checkpoint, image_dir, tmp_path, name, fmt) -> None:
    out = tmp_path / name
    extra = ["--format", fmt] if fmt else []
    assert run_predict(checkpoint, good_paths(image_dir), "--output", str(out), *extra) == 0
    if out.suffix == ".csv":
        with out.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert list(rows[0]) == ["image_id", "file_name", "caption"]
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["file_name"] for r in rows] == good_paths(image_dir)
    assert all(set(r) == {"image_id", "caption", "file_name"} for r in rows)


def test_stdout_lines_and_html_gallery(checkpoint, image_dir, tmp_path, capsys) -> None:
    gallery = tmp_path / "gallery.html"
    pattern = str(image_dir / "*.png")
    missing = str(tmp_path / "missing.jpg")
    assert run_predict(checkpoint, [pattern, str(image_dir / "nested"), missing], "--html", str(gallery)) == 1
    captured = capsys.readouterr()
    lines = [line.split("\t") for line in captured.out.splitlines()]
    expected = sorted([str(image_dir / "photo_7.png")] + [p for p in good_paths(image_dir) if "/nested/" in p])
    assert [path for path, _ in lines] == expected
    assert f"failed: {missing}: no such file or folder" in captured.err
    assert f"failed: {image_dir / 'nested' / 'notes.png'}" in captured.err
    page = gallery.read_text()
    assert page.count("data:image/jpeg;base64,") == len(expected)
    assert "notes.png" in page and "missing.jpg" in page


def test_predictions_equal_direct_decoding_with_overrides(stopping_checkpoint, image_dir, tmp_path) -> None:
    out = tmp_path / "out.json"
    overrides = ["--beams", "3", "--max_len", "6", "--min_len", "2", "--length_penalty", "0.5"]
    overrides += ["--no_repeat_ngram", "1"]
    assert run_predict(stopping_checkpoint, good_paths(image_dir), "--output", str(out), *overrides) == 0
    captions = [r["caption"] for r in json.loads(out.read_text())]
    model, cfg = load_model(stopping_checkpoint)
    transform = build_transform(model.encoder.image_res)
    images = torch.stack([transform(load_image(p)) for p in good_paths(image_dir)])
    options = DecodeOptions(method="beam", beams=3, max_len=6, min_len=2, length_penalty=0.5, no_repeat_ngram=1)
    with torch.no_grad():
        result = decode(model, model.encode(images), options)
    assert captions == captions_from_tokens(load_tokenizer(cfg.model.tokenizer), result)
    assert (result.lengths >= 3).all() and (result.lengths <= 6).all()
    # captions of different lengths: an override that predict.py dropped would change them
    assert result.stopped.any() and (result.lengths < 6).any()


def test_sampling_is_seeded(checkpoint, image_dir, tmp_path) -> None:
    texts = []
    for seed in ("3", "3", "4"):
        out = tmp_path / f"sample_{len(texts)}.jsonl"
        args = ["--output", str(out), "--method", "sample", "--top_k", "40", "--temperature", "0.7", "--top_p", "0.9"]
        assert run_predict(checkpoint, good_paths(image_dir), *args, "--seed", seed) == 0
        texts.append(out.read_text())
    assert texts[0] == texts[1] != texts[2]
    model, cfg = load_model(checkpoint)
    transform = build_transform(model.encoder.image_res)
    images = torch.stack([transform(load_image(p)) for p in good_paths(image_dir)])
    options = DecodeOptions(method="sample", max_len=8, top_k=40, temperature=0.7, top_p=0.9)
    with torch.no_grad():
        result = decode(model, model.encode(images), options, generator=torch.Generator().manual_seed(3))
    captions = [json.loads(line)["caption"] for line in texts[0].splitlines()]
    assert captions == captions_from_tokens(load_tokenizer(cfg.model.tokenizer), result)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--output", "out.txt"], "error: cannot tell the output format of 'out.txt' from its suffix"),
        (["--method", "sample", "--beams", "3"], "error: invalid decoding options: beams=3: must be >= 1, and 1 unless "
                                                 "method='beam'"),
        (["--min_len", "9", "--max_len", "4"], "error: invalid decoding options: need 0 <= min_len <= max_len and "
                                               "max_len >= 1, got 9, 4"),
        (["--batch_size", "0"], "error: --batch_size and --num_captions must be >= 1 and --num_workers >= 0"),
        (["--beams", "two"], "error: argument --beams: invalid int value: 'two'"),
        (["--precision", "fp8"], "error: argument --precision: invalid choice: 'fp8'"),
        (["--num_captions", "0"], "error: --batch_size and --num_captions must be >= 1 and --num_workers >= 0"),
        (["--device", "cuda:7"], "on device cuda:7: device 'cuda:7': CUDA is not available here")
        if not torch.cuda.is_available()
        else (["--format", "xml"], "error: argument --format: invalid choice: 'xml'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)  # fmt: skip
def test_usage_errors_exit_2(checkpoint, image_dir, tmp_path, monkeypatch, capsys, args, message) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_predict(checkpoint, good_paths(image_dir), *args) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "captioned" not in captured.err and captured.out == "" and list(tmp_path.iterdir()) == []


def test_unusable_checkpoint_or_no_images_exit_2(checkpoint, image_dir, tmp_path, capsys) -> None:
    absent = tmp_path / "absent.pt"
    assert run_predict(absent, good_paths(image_dir)) == 2
    assert f"error: cannot use checkpoint {absent} on device auto: checkpoint {absent} does not exist" in (
        capsys.readouterr().err
    )
    not_a_checkpoint = tmp_path / "bad.pt"
    not_a_checkpoint.write_text("junk")
    assert run_predict(not_a_checkpoint, good_paths(image_dir)) == 2
    assert f"error: cannot use checkpoint {not_a_checkpoint} on device auto: checkpoint {not_a_checkpoint} cannot " \
           "be read: not a torch checkpoint" in capsys.readouterr().err  # fmt: skip
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    assert run_predict(checkpoint, [str(empty)]) == 2
    assert f"error: no image files found in {empty}" in capsys.readouterr().err


def test_real_photos_with_worker_processes(checkpoint, tmp_path) -> None:
    photos = SHARED / "real_images"
    assert photos.is_dir(), f"shared real photos missing at {photos} (set OPG_SHARED_DIR)"
    expected = sorted(str(p) for p in photos.glob("*.jpg"))
    assert len(expected) >= 6
    out = tmp_path / "real.json"
    status = predict.main(
        ["--checkpoint", str(checkpoint), "--images", str(photos), "--output", str(out)]
        + ["--batch_size", "4", "--num_workers", "2", "--no_progress"]
    )
    assert status == 0
    results = json.loads(out.read_text())
    assert [r["file_name"] for r in results] == expected
    assert [r["image_id"] for r in results] == [int(Path(p).stem.rsplit("_", 1)[1]) for p in expected]


def test_command_line_end_to_end(checkpoint, image_dir, tmp_path) -> None:
    listing = tmp_path / "inputs.txt"
    listing.write_text("# images to caption\n" + "\n".join(good_paths(image_dir)[:3]) + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO_ROOT / "predict.py"), "--checkpoint", str(checkpoint)]
    command += ["--images", "inputs.txt", "--output", "out/captions.csv", "--num_workers", "1"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with (tmp_path / "out" / "captions.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["file_name"] for r in rows] == good_paths(image_dir)[:3]
    assert "captioned 3 of 3 images" in done.stderr


def test_image_ids_use_trailing_numbers_and_never_collide() -> None:
    paths = [Path("a/COCO_val2014_000000000005.jpg"), Path("b/cat.png"), Path("c/img12.jpg"), Path("d/dog.jpg")]
    assert assign_image_ids(paths) == [5, 13, 12, 14]
    assert assign_image_ids([Path("x.jpg"), Path("y.jpg")]) == [0, 1]


def test_image_ids_never_collide_across_folders() -> None:
    paths = [Path("a/1.jpg"), Path("b/1.jpg"), Path("c/2.jpg"), Path("d/cat.jpg")]
    assert assign_image_ids(paths) == [3, 4, 2, 5]


@pytest.fixture(scope="module")
def nocaps_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A folder of hex-named images (two of them under the same name in different folders) and its COCO
    caption file with ids unrelated to the names, as nocaps ships them; plus an image the file does not list."""
    root = tmp_path_factory.mktemp("nocaps")
    names = ["0013ea2087020901.jpg", "00223b4a53a0f1e4.jpg", "near/1.jpg", "out/1.jpg"]
    for i, name in enumerate([*names, "not_listed.jpg"]):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.effect_noise((40 + 6 * i, 36), 20 + 15 * i).convert("RGB").save(root / name)
    images = [{"id": 100 + i, "file_name": name, "domain": ["in-domain", "near-domain", "out-domain"][i % 3]}
              for i, name in enumerate(names)]  # fmt: skip
    annotations = [{"image_id": 100 + i, "id": 10 * i + k, "caption": f"a photo of thing {i} number {k}"}
                   for i in range(len(names)) for k in range(3)]  # fmt: skip
    captions_file = root / "nocaps_val_captions.json"
    captions_file.write_text(json.dumps({"images": images, "annotations": annotations}))
    return root, captions_file


def test_annotation_ids_let_evaluate_score_the_output_directly(checkpoint, nocaps_like, tmp_path, capsys) -> None:
    import evaluate

    root, captions_file = nocaps_like
    out = tmp_path / "nocaps_pred.json"
    args = ["--annotations", str(captions_file), "--output", str(out), "--precision", "fp32"]
    assert run_predict(checkpoint, [str(root)], *args) == 0
    results = json.loads(out.read_text())
    assert [(r["image_id"], Path(r["file_name"]).relative_to(root).as_posix()) for r in results] == [
        (100, "0013ea2087020901.jpg"), (101, "00223b4a53a0f1e4.jpg"), (102, "near/1.jpg"), (103, "out/1.jpg")
    ]  # fmt: skip
    assert evaluate.main(["--results", str(out), "--annotations", str(captions_file), "--no_spice"]) == 0
    table = capsys.readouterr().out
    assert "near-domain" in table and "CIDEr" in table


def test_prepared_split_annotations_and_missing_images(checkpoint, nocaps_like, tmp_path, capsys) -> None:
    root, _ = nocaps_like
    split = tmp_path / "test.json"  # prepared / Karpathy-style: one entry per image, paths under the image root
    entries = [{"image": "near/1.jpg", "caption": ["a"], "image_id": 7},
               {"image": "val2014/COCO_val2014_000000000042.jpg", "caption": ["b"]},
               {"image": "0013ea2087020901.jpg", "caption": ["c"], "image_id": 9}]  # fmt: skip
    split.write_text(json.dumps(entries))
    out = tmp_path / "split_pred.jsonl"
    assert run_predict(checkpoint, [str(root)], "--annotations", str(split), "--output", str(out)) == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["image_id"], Path(r["file_name"]).name) for r in rows] == [(7, "1.jpg"), (9, "0013ea2087020901.jpg")]
    assert Path(rows[0]["file_name"]).parent.name == "near"
    err = capsys.readouterr().err
    assert "failed: val2014/COCO_val2014_000000000042.jpg (image id 42): no such file" in err


def test_ambiguous_or_unusable_annotations(checkpoint, nocaps_like, tmp_path, capsys) -> None:
    root, _ = nocaps_like
    ambiguous = tmp_path / "ambiguous.json"
    ambiguous.write_text(json.dumps([{"image": "1.jpg", "caption": "x", "image_id": 1}]))
    assert run_predict(checkpoint, [str(root)], "--annotations", str(ambiguous)) == 2  # no image found
    assert "1.jpg (image id 1): several files match" in capsys.readouterr().err
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"images": [{"filename": "a.jpg", "sentences": [], "cocoid": 1}]}))
    assert run_predict(checkpoint, [str(root)], "--annotations", str(karpathy)) == 2
    assert "run python -m data.prepare_coco" in capsys.readouterr().err


def test_n_best_lists_in_json_and_jsonl(checkpoint, image_dir, tmp_path, capsys) -> None:
    from models import load_captioner

    paths = good_paths(image_dir)
    expected = load_captioner(checkpoint, "cpu").caption(paths, num_captions=3)
    for name in ("nbest.json", "nbest.jsonl"):
        out = tmp_path / name
        assert run_predict(checkpoint, paths, "--output", str(out), "--num_captions", "3") == 0
        text = out.read_text()
        rows = json.loads(text) if name.endswith(".json") else [json.loads(line) for line in text.splitlines()]
        assert [[c["caption"] for c in r["captions"]] for r in rows] == [[c.text for c in e] for e in expected]
        assert all(r["caption"] == r["captions"][0]["caption"] for r in rows)
        scores = [[c["score"] for c in r["captions"]] for r in rows]
        assert all(s == sorted(s, reverse=True) for s in scores)
        assert scores[0][0] == pytest.approx(expected[0][0].score, abs=1e-4)
    capsys.readouterr()
    assert run_predict(checkpoint, paths, "--output", str(tmp_path / "nbest.csv"), "--num_captions", "3") == 2
    err = capsys.readouterr().err
    assert "error: --num_captions > 1 writes n-best lists: use a .json or .jsonl --output" in err
    assert not (tmp_path / "nbest.csv").exists()


def _predict_split(best: Path, data: Path, out: Path) -> dict:
    command = [sys.executable, str(REPO_ROOT / "predict.py"), "--checkpoint", str(best), "--images", str(data),
               "--annotations", str(data / "test.json"), "--output", str(out), "--num_workers", "0",
               "--no_progress"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {r["image_id"]: r["caption"] for r in json.loads(out.read_text())}


def _train(cfg: Config) -> dict:
    from engine.runner import Run

    run = Run(cfg)
    try:
        run.train()
    finally:
        run.close()
    predictions = json.loads((Path(cfg.output_dir) / "test_predictions.json").read_text())
    return {r["image_id"]: r["caption"] for r in predictions}


def test_predict_on_each_stages_best_checkpoint_reproduces_its_test_predictions(tmp_path) -> None:
    """A tiny XE run with a sparse mask that drops positions, then SCST from it without the mask (as
    configs/scst.yaml sets it); predict.py as a user runs it on each run's best.pt and test split gives the
    run's own test captions, so each checkpoint records the mask setting its run decoded with. JPEGs are
    large enough for the test transform's reduced decode; training and validation use float16 cached
    features, the test split the images."""
    from helpers import tiny_config

    from data.synthetic import generate_dataset

    data = tmp_path / "data"
    generate_dataset(data, num_train=16, num_val=4, num_test=8, image_size=300, seed=5)
    common = {"data.cache_features": True, "data.feature_cache_dir": str(tmp_path / "features"),
              "model.threshold": 0.5}  # fmt: skip
    xe = tiny_config(data, tmp_path / "xe", **common)
    scst = tiny_config(data, tmp_path / "scst", **common, scst=True, checkpoint=str(tmp_path / "xe" / "best.pt"),
                       **{"model.apply_sparse_mask": False, "train.max_steps_per_epoch": 2,
                          "scst_opts.num_samples": 2, "train.lr": 1e-4})  # fmt: skip
    for cfg in (xe, scst):
        expected = _train(cfg)
        run_dir = Path(cfg.output_dir)
        assert len(expected) == 8 and len(set(expected.values())) > 1  # captions that depend on the image
        assert _predict_split(run_dir / "best.pt", data, tmp_path / f"{run_dir.name}.json") == expected

    xe_model, xe_cfg = load_model(tmp_path / "xe" / "best.pt")
    scst_model, scst_cfg = load_model(tmp_path / "scst" / "best.pt")
    assert (xe_cfg.model.apply_sparse_mask, scst_cfg.model.apply_sparse_mask) == (True, False)
    transform = build_transform(xe_model.encoder.image_res, train=False)
    images = torch.stack([transform(load_image(p)) for p in sorted(data.glob("images/test/*"))])
    with torch.no_grad():
        xe_keep, scst_keep = xe_model.encode(images).keep, scst_model.encode(images).keep
    assert not xe_keep.all() and scst_keep.all()  # same mask weights; only the XE model applies them
