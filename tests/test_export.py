"""Tests for export.py and Hub-format folders: identical captions and weights after the round trip, loading
without unpickling, files valid for Hugging Face tools, the model card, predict.py on the folder and the
two-line API in a fresh process on real photos."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml
from helpers import SHARED, save_model, tiny_config
from PIL import Image
from transformers import GenerationConfig

import export
import predict
from models import load_captioner
from models.build import build_captioner
from models.pretrained import load_model
from models.tokenizer import GPT2_VOCAB_SIZE, load_tokenizer
from utils.checkpoint import CheckpointError

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_IMAGES = SHARED / "real_images"
OUTPUT_IDS = sorted({*range(0, 3000, 7), 13, 50256})
TEST_REPORT = {"metrics": {"BLEU-4": 0.312, "METEOR": 0.251, "CIDEr": 1.047}, "unavailable": {"SPICE": "no jars"}}
pytestmark = pytest.mark.usefixtures("single_thread", "hub_offline")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as training leaves it: best.pt (sparse mask, restricted output vocabulary) and its
    test metrics."""
    torch.manual_seed(1)
    overrides = {"decode.beams": 2, "decode.max_len": 8, "decode.min_len": 1, "decode.length_penalty": 0.6,
                 "decode.no_repeat_ngram": 3, "model.threshold": 0.5}  # fmt: skip
    cfg = tiny_config(**overrides, **{"data.test_file": "/somewhere/flickr30k/annotations/test.json"})
    model = build_captioner(cfg, output_ids=OUTPUT_IDS)
    run = tmp_path_factory.mktemp("run")
    save_model(run / "best.pt", model, cfg)
    (run / "test_metrics.json").write_text(json.dumps(TEST_REPORT))
    return run


@pytest.fixture(scope="module")
def folder(run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exported") / "opg-tiny"
    args = ["--checkpoint", str(run_dir / "best.pt"), "--out", str(out), "--license", "mit", "--repo_id", "me/opg"]
    assert export.main(args) == 0
    return out


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("photos")
    paths = [root / f"img_{i}.png" for i in range(4)]
    for i, path in enumerate(paths):
        Image.effect_noise((48, 40 + 8 * i), 25 + 25 * i).convert("RGB").save(path)
    return paths


def test_folder_holds_the_hub_files(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer.json"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "opg-captioner" and config["architectures"] == ["OPGCaptioner"]
    assert config["output_vocabulary"] == {"size": len(OUTPUT_IDS), "gpt2_ids": OUTPUT_IDS}
    assert config["decoding"]["beams"] == 2 and config["architecture"]["sparse_mask"] is True
    generation = GenerationConfig.from_pretrained(folder)  # Hugging Face reads it as its own
    assert (generation.num_beams, generation.max_new_tokens, generation.min_new_tokens) == (2, 8, 1)
    assert (generation.length_penalty, generation.no_repeat_ngram_size) == (0.6, 3)
    assert generation.eos_token_id == [13, 50256]
    assert len(load_tokenizer(folder)) == GPT2_VOCAB_SIZE
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors", "generation_config.json", "README.md"):
        assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~umask, name  # readable by the group


def test_round_trip_gives_identical_weights_and_captions(run_dir: Path, folder: Path, photos: list[Path]) -> None:
    original, _ = load_model(run_dir / "best.pt")
    exported, cfg = load_model(folder)
    assert cfg.model.tokenizer == str(folder)
    ours, theirs = original.state_dict(), exported.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert exported.gpt.lm_head.weight.data_ptr() == exported.gpt.transformer.wte.weight.data_ptr()  # still tied
    from_pt, from_folder = load_captioner(run_dir / "best.pt", "cpu"), load_captioner(folder, "cpu")
    for settings in ({}, {"beams": 3}, {"num_captions": 2}, {"method": "sample", "seed": 2, "top_p": 0.8}):
        assert from_folder.caption(photos, **settings) == from_pt.caption(photos, **settings), settings


def test_loading_a_folder_unpickles_nothing(folder: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    model, _ = load_model(folder)
    assert model.output_ids.tolist() == OUTPUT_IDS
    with pytest.raises(CheckpointError, match="unpickling attempted"):  # the guard is real: .pt files need it
        load_model(run_dir / "best.pt")


def test_generation_config_sets_the_default_decoding(folder: Path, photos: list[Path], tmp_path: Path) -> None:
    edited = tmp_path / "edited"
    edited.mkdir()
    for path in folder.iterdir():
        (edited / path.name).symlink_to(path)
    generation = json.loads((folder / "generation_config.json").read_text())
    (edited / "generation_config.json").unlink()
    edits = {"num_beams": 4, "max_new_tokens": 6, "min_new_tokens": 2, "length_penalty": 0.5, "no_repeat_ngram_size": 2}
    (edited / "generation_config.json").write_text(json.dumps({**generation, **edits}))
    captioner = load_captioner(edited, "cpu")
    settings = {"beams": 4, "max_len": 6, "min_len": 2, "length_penalty": 0.5, "no_repeat_ngram": 2}
    assert asdict(captioner.decode_defaults) == settings
    assert captioner.caption(photos) == load_captioner(folder, "cpu").caption(photos, **settings)


def test_model_card_header_and_contents(folder: Path) -> None:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["pipeline_tag"] == "image-to-text" and header["license"] == "mit"
    index = header["model-index"][0]["results"][0]
    assert index["dataset"]["type"] == "flickr30k"
    assert {m["name"]: m["value"] for m in index["metrics"]} == {"BLEU-4": 31.2, "METEOR": 25.1, "CIDEr": 104.7}
    body = text.split("---\n", 2)[2]
    assert "| 31.2 | 25.1 | 104.7 |" in body and "SPICE: not computed by the run." in body
    assert 'load_captioner("me/opg")' in body and "2 beams" in body and "cross-entropy + 0.1 x N-pair" in body


def test_predict_reads_the_folder(run_dir: Path, folder: Path, photos: list[Path], tmp_path: Path) -> None:
    outputs = []
    for source in (run_dir / "best.pt", folder):
        out = tmp_path / f"{Path(source).stem}.json"
        args = ["--checkpoint", str(source), "--images", *map(str, photos), "--output", str(out)]
        assert predict.main([*args, "--num_workers", "0", "--no_progress"]) == 0
        outputs.append(json.loads(out.read_text()))
    assert outputs[0] == outputs[1] and len(outputs[0]) == len(photos)


def test_two_line_api_in_a_fresh_process_on_real_photos(run_dir: Path, folder: Path) -> None:
    photos = sorted(str(p) for p in REAL_IMAGES.glob("*.jpg"))
    assert len(photos) >= 6, f"real photos missing at {REAL_IMAGES} (set OPG_SHARED_DIR)"
    code = (
        "import json, sys\nimport models\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules  # a light import\n"
        "from models import load_captioner\n"
        f"captioner = load_captioner({str(folder)!r}, device='cpu')\n"
        f"print(json.dumps(captioner.caption({photos!r}, beams=3)))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == load_captioner(run_dir / "best.pt", "cpu").caption(photos, beams=3)


def test_bad_sources_fail_with_a_clear_message(folder: Path, run_dir: Path, tmp_path: Path) -> None:
    assert export.main(["--checkpoint", str(run_dir / "best.pt"), "--out", str(folder)]) == 2  # not empty
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type is 'bert'"):
        load_model(broken)
    (broken / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors does not exist"):
        load_model(broken)
    with pytest.raises(CheckpointError, match="downloading it from the Hugging Face Hub failed"):
        load_model("nobody-here/no-such-model")
