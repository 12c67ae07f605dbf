"""Tests of the X-VLM Swin image encoder: conformance, checkpoint layouts, errors, resolutions, freezing."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import SHARED
from torch import nn

from models.encoder import (
    VISION_PRESETS,
    CheckpointFormatError,
    CheckpointMismatchError,
    ImageEncoder,
    build_encoder,
    load_xvlm_encoder,
    resolve_vision_config,
)
from models.swin_checkpoint import infer_vision_config, read_swin_checkpoint, resize_relative_position_table

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
TINY_TABLE = "layers.0.blocks.0.attn.relative_position_bias_table"


class NotAllowListed:
    """A class no checkpoint loader should unpickle."""


@pytest.fixture(scope="module")
def vector_dir() -> Path:
    vector = SHARED / "xvlm_vector"
    needed = ["xvlm_tiny_pretrain.th", "config_swin_tiny.json", "input.pt", "expected_output.pt"]
    absent = [name for name in needed if not (vector / name).is_file()]
    if absent:
        pytest.fail(
            f"X-VLM conformance vector not found: {vector} lacks {absent}. Put shared/ beside the repository "
            "or set OPG_SHARED_DIR to the folder that holds xvlm_vector/."
        )
    return vector


@pytest.fixture(scope="module")
def pretrain(vector_dir: Path) -> Path:
    return vector_dir / "xvlm_tiny_pretrain.th"


@pytest.fixture(scope="module")
def vector_io(vector_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.load(vector_dir / "input.pt", weights_only=True)
    expected = torch.load(vector_dir / "expected_output.pt", weights_only=True)
    return images, expected


@pytest.fixture(scope="module")
def tiny_encoder(pretrain: Path) -> ImageEncoder:
    return load_xvlm_encoder(pretrain)


@pytest.fixture(scope="module")
def xvlm_model_dict(pretrain: Path) -> dict[str, torch.Tensor]:
    return torch.load(pretrain, weights_only=True)["model"]


def flat_state(model_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The paper's swin_pretrain.th: the vision_encoder.* entries, prefix stripped, buffers kept."""
    prefix = "vision_encoder."
    return {k.removeprefix(prefix): v for k, v in model_dict.items() if k.startswith(prefix)}


def max_diff(encoder: ImageEncoder, vector_io: tuple[torch.Tensor, torch.Tensor]) -> float:
    images, expected = vector_io
    with torch.no_grad():
        out = encoder(images)
    assert out.shape == expected.shape
    return (out - expected).abs().max().item()


def save(tmp_path: Path, name: str, obj: object) -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("config_source", [None, "swin_tiny_test", "config_swin_tiny.json"])
def test_conformance_pretrain_layout(pretrain, vector_dir, vector_io, config_source):
    if config_source and config_source.endswith(".json"):
        config_source = vector_dir / config_source
    encoder = load_xvlm_encoder(pretrain, vision_config=config_source)
    assert max_diff(encoder, vector_io) <= TOLERANCE
    assert encoder.vision_config == VISION_PRESETS["swin_tiny_test"]


def test_conformance_flat_layout(tmp_path, xvlm_model_dict, vector_io):
    path = save(tmp_path, "swin_pretrain.th", flat_state(xvlm_model_dict))
    encoder = load_xvlm_encoder(path)
    assert max_diff(encoder, vector_io) <= TOLERANCE
    assert encoder.vision_config == VISION_PRESETS["swin_tiny_test"]


def test_conformance_other_layouts(tmp_path, xvlm_model_dict, vector_io, tiny_encoder):
    flat = flat_state(xvlm_model_dict)
    timm_state = tiny_encoder.swin.state_dict()
    head = {"head.weight": torch.zeros(10, 128), "head.bias": torch.zeros(10)}
    layouts = {
        "finetuned_ddp.th": {f"module.{k}": v for k, v in xvlm_model_dict.items()},
        "microsoft_swin.pth": {"model": {**flat, **head}},
        "timm_swin.pth": {**timm_state, "head.fc.weight": torch.zeros(10, 128)},
    }
    for name, obj in layouts.items():
        encoder = build_encoder("swin_tiny_test", checkpoint=save(tmp_path, name, obj))
        assert max_diff(encoder, vector_io) <= TOLERANCE, name


def test_only_the_vision_encoder_prefix_is_selected(pretrain, xvlm_model_dict, tiny_encoder):
    weights = read_swin_checkpoint(pretrain)
    assert any(k.startswith("vision_proj.") for k in xvlm_model_dict)
    model_keys = set(tiny_encoder.swin.state_dict())
    assert set(weights.tensors) == model_keys
    assert weights.prefix == "vision_encoder." and weights.merge_at_stage_end
    # X-VLM's stage-0 merge is timm's stage-1 merge, unchanged
    torch.testing.assert_close(
        weights.tensors["layers.1.downsample.reduction.weight"],
        xvlm_model_dict["vision_encoder.layers.0.downsample.reduction.weight"],
    )


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nowhere.th"
    with pytest.raises(FileNotFoundError, match="nowhere.th"):
        build_encoder("swin_tiny_test", checkpoint=path)


@pytest.mark.parametrize("kind", ["empty", "truncated", "text", "list"])
def test_unreadable_files_are_named(tmp_path, pretrain, kind):
    path = tmp_path / f"{kind}.th"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        data = pretrain.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("vision_encoder.norm.weight = 1\n")
    else:
        torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointFormatError, match=f"{kind}.th"):
        load_xvlm_encoder(path)


def test_gpt2_state_dict_is_rejected(tmp_path):
    gpt2 = {
        "transformer.wte.weight": torch.zeros(50257, 8),
        "transformer.wpe.weight": torch.zeros(1024, 8),
        "transformer.h.0.attn.c_attn.weight": torch.zeros(8, 24),
        "lm_head.weight": torch.zeros(50257, 8),
    }
    path = save(tmp_path, "gpt2.bin", gpt2)
    with pytest.raises(CheckpointFormatError) as info:
        build_encoder("swin_tiny_test", checkpoint=path)
    message = str(info.value)
    assert "gpt2.bin" in message and "vision_encoder" in message and "transformer.wte.weight" in message


def test_missing_unexpected_and_mis_shaped_keys_are_listed(tmp_path, xvlm_model_dict):
    model = dict(xvlm_model_dict)
    del model["vision_encoder.norm.weight"]
    del model["vision_encoder.layers.0.downsample.norm.bias"]
    model["vision_encoder.extra.weight"] = torch.zeros(3)
    model["vision_encoder.patch_embed.proj.bias"] = torch.zeros(17)
    path = save(tmp_path, "broken.th", {"model": model})
    with pytest.raises(CheckpointMismatchError) as info:
        build_encoder("swin_tiny_test", checkpoint=path)
    message, error = str(info.value), info.value
    assert "broken.th" in message
    assert "missing (2)" in message and "unexpected (1)" in message and "shape mismatch (1)" in message
    missing = ["vision_encoder.layers.0.downsample.norm.bias", "vision_encoder.norm.weight"]
    mis_shaped = "vision_encoder.patch_embed.proj.bias (file [17], model [16])"
    for key in [*missing, "vision_encoder.extra.weight", mis_shaped]:
        assert key in message
    assert sorted(error.missing) == missing


def test_wrong_architecture_lists_are_truncated(pretrain):
    with pytest.raises(CheckpointMismatchError) as info:
        build_encoder("swin_demo", checkpoint=pretrain)
    message = str(info.value)
    assert str(pretrain) in message and re.search(r"\.\.\. and \d+ more", message)
    assert len(info.value.mismatched) > 10 and message.count("\n") <= 4


def test_pickled_objects(tmp_path, xvlm_model_dict, vector_io):
    config = argparse.Namespace(lr=1e-4)
    allowed = save(tmp_path, "namespace.th", {"model": xvlm_model_dict, "config": config})
    assert max_diff(load_xvlm_encoder(allowed), vector_io) <= TOLERANCE
    refused = save(tmp_path, "custom.th", {"model": xvlm_model_dict, "config": NotAllowListed()})
    with pytest.raises(CheckpointFormatError, match=r"custom\.th.*NotAllowListed"):
        load_xvlm_encoder(refused)


def test_infer_config_without_wrapper_config(tmp_path, xvlm_model_dict):
    flat = flat_state(xvlm_model_dict)
    with_masks = read_swin_checkpoint(save(tmp_path, "flat.th", flat))
    assert with_masks.config_image_res is None and with_masks.mask_windows == 64
    assert infer_vision_config(with_masks) == VISION_PRESETS["swin_tiny_test"]
    no_buffers = {k: v for k, v in flat.items() if "attn_mask" not in k and "position_index" not in k}
    bare = read_swin_checkpoint(save(tmp_path, "bare.th", no_buffers))
    assert bare.mask_windows is None and infer_vision_config(bare)["image_res"] == 224


def test_224_checkpoint_at_384(pretrain, xvlm_model_dict):
    encoder = build_encoder("swin_tiny_test", checkpoint=pretrain, image_res=384)
    window = encoder.vision_config["window_size"]
    assert (encoder.image_res, window, encoder.num_tokens) == (384, 12, 1 + 12 * 12)
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 384, 384)).shape == (1, 145, 128)
    source = xvlm_model_dict[f"vision_encoder.{TINY_TABLE}"]
    table = encoder.swin.state_dict()[TINY_TABLE]
    assert table.shape == (23 * 23, 1)
    torch.testing.assert_close(table, resize_relative_position_table(source, 12), rtol=0, atol=0)
    # offsets -1, 0, +1 are spline nodes in both tables, so those entries are kept exactly
    centre = table.view(23, 23)[10:13, 10:13]
    torch.testing.assert_close(centre, source.view(13, 13)[5:8, 5:8], rtol=0, atol=0)
    inferred = load_xvlm_encoder(pretrain, image_res=384)
    assert inferred.vision_config == {**VISION_PRESETS["swin_tiny_test"], "image_res": 384, "window_size": 12}


def test_384_checkpoint_at_224(tmp_path, pretrain):
    state_384 = build_encoder("swin_tiny_test", checkpoint=pretrain, image_res=384).swin.state_dict()
    path = save(tmp_path, "tiny_384.pth", state_384)
    assert infer_vision_config(read_swin_checkpoint(path))["image_res"] == 384
    encoder = load_xvlm_encoder(path, image_res=224)
    assert encoder.swin.state_dict()[TINY_TABLE].shape == (13 * 13, 1)
    with torch.no_grad():
        assert encoder(torch.randn(1, 3, 224, 224)).shape == (1, 50, 128)


def _smooth_table(side: int, heads: int) -> torch.Tensor:
    r = torch.arange(side, dtype=torch.float64)[:, None]
    c = torch.arange(side, dtype=torch.float64)[None, :]
    planes = [torch.sin(0.4 * r + h) * torch.cos(0.3 * c) + 0.01 * (r - c) ** 2 for h in range(heads)]
    return torch.stack(planes, -1).reshape(side * side, heads).float()


# reference values from scipy's FITPACK bicubic spline (RectBivariateSpline, s=0, the routine behind the
# interp2d call X-VLM makes) at X-VLM's geometric source offsets: (row, head) -> value
FITPACK_7_TO_12 = {
    (0, 0): 2.2029360025044298e-06,
    (0, 1): 0.8414720892906189,
    (1, 1): 0.8382319211959839,
    (25, 1): 0.8846527338027954,
    (264, 0): -0.15346665680408478,
    (290, 0): -0.255912721157074,
    (527, 1): 0.43501585721969604,
    (528, 0): 0.8933199048042297,
}
FITPACK_12_TO_7 = {
    (0, 0): 0.02437741495668888,
    (0, 1): 0.002313567791134119,
    (1, 1): -0.012343373149633408,
    (15, 1): 0.16142061352729797,
    (84, 0): 0.9396877884864807,
    (100, 0): 0.5348443388938904,
    (167, 1): 0.06729573011398315,
    (168, 0): 0.14964687824249268,
}


@pytest.mark.parametrize(("src", "dst", "reference"), [(7, 12, FITPACK_7_TO_12), (12, 7, FITPACK_12_TO_7)])
def test_table_resize_matches_xvlm_interpolation(src, dst, reference):
    table = _smooth_table(2 * src - 1, 2)
    resized = resize_relative_position_table(table, dst)
    assert resized.shape == ((2 * dst - 1) ** 2, 2) and resized.dtype == table.dtype
    for (row, head), value in reference.items():
        assert math.isclose(resized[row, head].item(), value, abs_tol=1e-6), (row, head)
    assert resize_relative_position_table(table, src) is table


def test_frozen_encoder_drops_paths_in_training_mode_only():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 128, 128)
    encoder = build_encoder("swin_demo", drop_path=0.5)
    parent = nn.Sequential(encoder, nn.Linear(encoder.width, 2))
    assert not any(p.requires_grad for p in encoder.parameters()) and not encoder.training
    with torch.no_grad():
        clean = encoder(images)
        parent.train()  # the reference's model.train() reaches the frozen encoder too
        assert encoder.training and parent[1].training
        noisy = [encoder(images) for _ in range(2)]
        parent.eval()
        assert torch.equal(encoder(images), clean)
    assert not torch.allclose(noisy[0], clean) and not torch.allclose(noisy[0], noisy[1])
    deterministic = build_encoder("swin_demo", drop_path=0.0)
    with torch.no_grad():
        expected = deterministic(images)
        deterministic.train()
        torch.testing.assert_close(deterministic(images), expected)
    trainable = build_encoder("swin_demo", frozen=False)
    nn.Sequential(trainable).train()
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


@pytest.mark.parametrize(
    ("name", "batch", "tokens", "width"), [("swin_demo", 2, 17, 256), ("swin_tiny_test", 1, 50, 128)]
)
def test_small_presets_forward(name, batch, tokens, width):
    encoder = build_encoder(name)
    res = encoder.image_res
    with torch.no_grad():
        out = encoder(torch.randn(batch, 3, res, res))
    assert out.shape == (batch, tokens, width) == (batch, encoder.num_tokens, encoder.width)
    torch.testing.assert_close(out[:, 0], out[:, 1:].mean(dim=1))
    json.dumps(encoder.vision_config)


# Swin-B without its classifier has 86,743,224 parameters at window 7; window 12 enlarges the 24 bias
# tables from 13^2 to 23^2 rows over 376 heads in all
SWIN_B = [("xvlm_swin_b_224", 224, 50, 86_743_224), ("xvlm_swin_b_384", 384, 145, 86_743_224 + 376 * 360)]


@pytest.mark.parametrize(("name", "res", "tokens", "params"), SWIN_B)
def test_swin_b_presets_on_meta_device(name, res, tokens, params):
    with torch.device("meta"):
        encoder = build_encoder(name)
        out = encoder(torch.empty(2, 3, res, res))
    assert out.shape == (2, tokens, 1024) == (2, encoder.num_tokens, encoder.width)
    assert sum(p.numel() for p in encoder.parameters()) == params


def test_config_resolution(tmp_path, vector_dir):
    assert resolve_vision_config(vector_dir / "config_swin_tiny.json") == VISION_PRESETS["swin_tiny_test"]
    assert resolve_vision_config("xvlm_swin_b_224", image_res=384) == VISION_PRESETS["xvlm_swin_b_384"]
    resolved = resolve_vision_config("swin_demo")
    resolved["depths"].append(1)
    assert VISION_PRESETS["swin_demo"]["depths"] == [1, 1, 2, 1]
    with pytest.raises(ValueError, match="swin_b_999.*swin_demo"):
        resolve_vision_config("swin_b_999")
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({**VISION_PRESETS["swin_demo"], "depth": [1, 1, 2, 1]}))
    with pytest.raises(ValueError, match=r"typo\.json.*depth"):
        resolve_vision_config(typo)
    with pytest.raises(ValueError, match="multiple of 32"):
        resolve_vision_config("swin_demo", image_res=200)
    with pytest.raises(ValueError, match="vision_width"):
        resolve_vision_config({**VISION_PRESETS["swin_demo"], "vision_width": 512})


def test_forward_rejects_wrong_image_size():
    encoder = build_encoder("swin_demo")
    with pytest.raises(ValueError, match="3 x 128 x 128"):
        encoder(torch.zeros(1, 3, 224, 224))
