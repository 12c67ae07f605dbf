"""The on-disk feature cache: contents, resume after an interruption, sharing, and training from it."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHARED, tiny_config
from torch import nn

from data.datasets import ImageReader
from data.image_io import load_image
from data.transforms import build_transform
from engine.features import FeatureStore, cache_features, create_store, encode_into_store
from engine.runner import Run
from models.encoder import build_encoder
from utils.io import Unreadable

SHARED_IMAGES = SHARED / "real_images"


class CountingEncoder(nn.Module):
    """Wraps an encoder, counts its batches and can fail on the n-th one (an interrupted job)."""

    def __init__(self, encoder: nn.Module, fail_on: int | None = None) -> None:
        super().__init__()
        self.encoder, self.fail_on, self.calls = encoder, fail_on, 0
        self.image_res = encoder.image_res

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on:
            raise KeyboardInterrupt("job stopped")
        return self.encoder(images)


@pytest.fixture(scope="module")
def image_set(tmp_path_factory, tiny_dataset) -> tuple[Path, list[str]]:
    """Six real COCO photos, eight generated shapes and one corrupt file: 15 paths under one root."""
    root = tmp_path_factory.mktemp("images")
    photos = sorted(SHARED_IMAGES.glob("*.jpg"))
    assert len(photos) == 6, f"six real photos expected at {SHARED_IMAGES} (set OPG_SHARED_DIR)"
    names = []
    for photo in photos:
        shutil.copy(photo, root / photo.name)
        names.append(photo.name)
    for entry in json.loads((tiny_dataset / "val.json").read_text())[:8]:
        shutil.copy(tiny_dataset / entry["image"], root / Path(entry["image"]).name)
        names.append(Path(entry["image"]).name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    names.insert(7, "broken.jpg")
    return root, names


def _build(directory: Path, encoder: nn.Module, reader: ImageReader, paths: list[str], **kwargs) -> int:
    create_store(directory, paths, (17, 256), "float16")
    return encode_into_store(encoder, reader, directory, torch.device("cpu"), batch_size=3, **kwargs)


def test_interrupted_build_resumes_to_the_identical_cache(image_set, tmp_path, single_thread):
    root, paths = image_set
    torch.manual_seed(0)
    encoder = build_encoder("swin_demo")
    reader = ImageReader(root, build_transform(encoder.image_res))
    assert len(paths) == 15 and _build(tmp_path / "straight", encoder, reader, paths) == 5

    interrupted = CountingEncoder(encoder, fail_on=4)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "resumed", interrupted, reader, paths, commit_every=3)
    status = np.fromfile(tmp_path / "resumed" / "status.bin", dtype=np.uint8)
    assert (status[:9] != 0).all() and (status[9:] == 0).all()  # three batches committed, the rest to do
    resumed = CountingEncoder(encoder)
    assert _build(tmp_path / "resumed", resumed, reader, paths) == 2 and resumed.calls == 2

    for name in ("features.bin", "status.bin", "meta.json"):
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    # two processes of a node, each with its share of the batches, write the same files
    for rank in (1, 0):
        _build(tmp_path / "shared", encoder, reader, paths, rank=rank, world=2)
    assert (tmp_path / "straight" / "features.bin").read_bytes() == (tmp_path / "shared" / "features.bin").read_bytes()

    store = FeatureStore(tmp_path / "resumed")
    assert store.is_complete() and len(store) == 14 and store.get("broken.jpg") is None
    for name in (paths[0], paths[-1]):
        with torch.no_grad():
            image = load_image(root / name, draft_size=reader.draft_size)  # the test transform's reduced decode
            expected = encoder(reader.transform(image)[None])[0]
        torch.testing.assert_close(store[name], expected, rtol=2e-3, atol=2e-3)
        assert store[name].dtype == torch.float32


def test_cache_folder_is_reused_by_later_runs(image_set, tmp_path, single_thread):
    root, paths = image_set
    encoder = CountingEncoder(build_encoder("swin_demo"))

    class Images:
        def __init__(self) -> None:
            self.reader = ImageReader(root, build_transform(encoder.image_res))

        def image_paths(self) -> list[str]:
            return paths

    first, second = Images(), Images()
    cache_features(encoder, [first], torch.device("cpu"), 8, 0, "fp32", cache_dir=tmp_path)
    calls = encoder.calls
    cache_features(encoder, [second], torch.device("cpu"), 8, 0, "fp32", cache_dir=tmp_path)
    assert calls == 3 and encoder.calls == calls  # a shape probe and 2 batches, then nothing: read from disk
    assert len(list(tmp_path.glob("features_*"))) == 1
    assert torch.equal(first.reader.read(paths[3]).features, second.reader.read(paths[3]).features)
    assert isinstance(second.reader.read("broken.jpg"), Unreadable)
    assert second.reader.read("broken.jpg").reason == first.reader.read("broken.jpg").reason == "not an image"


def _xe_losses(data: Path, out: Path, **overrides) -> list[float]:
    cfg = tiny_config(data, out, **{"train.stop_after_steps": 4, **overrides})
    run = Run(cfg)
    try:
        run.train()
    finally:
        run.close()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


def test_training_from_the_cache_equals_training_from_images(tiny_dataset, tmp_path, single_thread):
    images = _xe_losses(tiny_dataset, tmp_path / "images")
    cached = {"data.cache_features": True, "data.feature_cache_dir": str(tmp_path / "features")}
    fp32 = _xe_losses(tiny_dataset, tmp_path / "fp32", **cached, **{"data.feature_cache_dtype": "float32"})
    fp16 = _xe_losses(tiny_dataset, tmp_path / "fp16", **cached)
    assert len(images) == 4
    np.testing.assert_allclose(fp32, images, rtol=1e-5)
    np.testing.assert_allclose(fp16, images, rtol=2e-3)
    # the 48 training and 8 validation images' 17 x 256 features, in float16 and in float32
    sizes = [(store / "features.bin").stat().st_size for store in (tmp_path / "features").glob("features_*")]
    assert sorted(sizes) == sorted(images * 17 * 256 * itemsize for images in (48, 8) for itemsize in (2, 4))
