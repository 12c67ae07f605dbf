"""The frozen image encoder: X-VLM's Swin Transformer, built with timm.

The encoder maps a normalised image batch B x 3 x R x R to B x (1 + L) x C visual tokens: token 0 is the mean
of the L = (R / 32)^2 grid tokens of the last stage (after its final LayerNorm, not normalised again), tokens
1..L are that grid in row-major order. For X-VLM 4M base (Swin-B, 224 px) this is B x 50 x 1024.

The architecture is given as X-VLM's Swin JSON config (``vision_width``, ``image_res``, ``window_size``,
``embed_dim``, ``depths``, ``num_heads``): a preset name from ``VISION_PRESETS``, a dict, or a JSON file path.
Fixed by X-VLM: patch 4, mlp ratio 4, qkv bias, LayerNorm eps 1e-5, exact GELU, final LayerNorm ``norm``.

Resolution: an ``image_res`` that differs from the config's also sets ``window_size = image_res // 32``,
X-VLM's own convention (224 -> 7, 384 -> 12, 480 -> 15). Checkpoint tables of another window are resized as
X-VLM resizes them when it loads a 224 px checkpoint into a 384 px model (see ``swin_checkpoint``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from timm.models.swin_transformer import SwinTransformer
from torch import nn

from models.swin_checkpoint import (
    CheckpointFormatError,
    CheckpointMismatchError,
    infer_vision_config,
    load_swin_weights,
    read_swin_checkpoint,
)

__all__ = [
    "VISION_PRESETS",
    "CheckpointFormatError",
    "CheckpointMismatchError",
    "ImageEncoder",
    "build_encoder",
    "load_xvlm_encoder",
    "resolve_vision_config",
]

logger = logging.getLogger(__name__)

VISION_PRESETS: dict[str, dict] = {
    # X-VLM 4M base, the paper's encoder (X-VLM's config_swinB_224.json): 50 tokens x 1024
    "xvlm_swin_b_224": {
        "vision_width": 1024,
        "image_res": 224,
        "window_size": 7,
        "embed_dim": 128,
        "depths": [2, 2, 18, 2],
        "num_heads": [4, 8, 16, 32],
    },
    # X-VLM's config_swinB_384.json: 145 tokens x 1024
    "xvlm_swin_b_384": {
        "vision_width": 1024,
        "image_res": 384,
        "window_size": 12,
        "embed_dim": 128,
        "depths": [2, 2, 18, 2],
        "num_heads": [4, 8, 16, 32],
    },
    # the shared conformance vector's model: 50 tokens x 128
    "swin_tiny_test": {
        "vision_width": 128,
        "image_res": 224,
        "window_size": 7,
        "embed_dim": 16,
        "depths": [2, 2, 2, 2],
        "num_heads": [1, 2, 4, 8],
    },
    # fast on a CPU for demos: 128 px, a 4 x 4 grid, 17 tokens x 256
    "swin_demo": {
        "vision_width": 256,
        "image_res": 128,
        "window_size": 4,
        "embed_dim": 32,
        "depths": [1, 1, 2, 1],
        "num_heads": [1, 2, 4, 8],
    },
}

_FIELDS = ("vision_width", "image_res", "window_size", "embed_dim", "depths", "num_heads")
_IGNORED_FIELDS = ("ckpt",)  # X-VLM's JSON names the ImageNet weights it started from; unused here


def resolve_vision_config(vision_config: str | os.PathLike | Mapping, image_res: int | None = None) -> dict:
    """A validated copy of a Swin config (preset name, dict or X-VLM JSON path), at ``image_res`` if given.

    A resolution other than the config's also sets ``window_size = image_res // 32`` (X-VLM's convention).
    Raises ValueError naming the source for unknown presets or fields and for inconsistent values.
    """
    config, source = _read_vision_config(vision_config)
    unknown = sorted(set(config) - set(_FIELDS) - set(_IGNORED_FIELDS))
    missing = [field for field in _FIELDS if field not in config]
    if unknown or missing:
        raise ValueError(f"vision config {source}: unknown fields {unknown}, missing fields {missing}")
    config = {field: copy.deepcopy(config[field]) for field in _FIELDS}
    for field in ("depths", "num_heads"):
        if isinstance(config[field], tuple):
            config[field] = list(config[field])  # keep the resolved config JSON-shaped
    if image_res is not None and image_res != config["image_res"]:
        config["image_res"], config["window_size"] = image_res, image_res // 32
    _validate(config, source)
    return config


def _read_vision_config(vision_config: str | os.PathLike | Mapping) -> tuple[Mapping, str]:
    if isinstance(vision_config, Mapping):
        return vision_config, "(dict)"
    if isinstance(vision_config, str) and vision_config in VISION_PRESETS:
        return VISION_PRESETS[vision_config], f"preset {vision_config!r}"
    path = Path(vision_config)
    if not path.is_file():
        raise ValueError(
            f"vision config {str(vision_config)!r} is neither a preset ({', '.join(VISION_PRESETS)}) "
            "nor an existing JSON file"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"vision config {path}: not readable JSON ({err})") from err
    if not isinstance(config, dict):
        raise ValueError(f"vision config {path}: expected a JSON object, got {type(config).__name__}")
    return config, str(path)


def _validate(config: dict, source: str) -> None:
    depths, heads = config["depths"], config["num_heads"]
    ints = [config[field] for field in ("vision_width", "image_res", "window_size", "embed_dim")]
    if not (isinstance(depths, list) and isinstance(heads, list) and len(depths) == len(heads) >= 1):
        raise ValueError(f"vision config {source}: depths and num_heads must be lists of equal length")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ints + depths + heads):
        raise ValueError(f"vision config {source}: all sizes must be positive integers: {config}")
    stages = len(depths)
    width = config["embed_dim"] * 2 ** (stages - 1)
    if config["vision_width"] != width:
        raise ValueError(
            f"vision config {source}: vision_width {config['vision_width']} != embed_dim * 2^(stages-1) = {width}"
        )
    if any((config["embed_dim"] * 2**i) % h for i, h in enumerate(heads)):
        raise ValueError(f"vision config {source}: stage widths must divide by num_heads {heads}")
    reduction = 4 * 2 ** (stages - 1)
    if config["image_res"] % reduction:
        raise ValueError(
            f"vision config {source}: image_res {config['image_res']} must be a multiple of "
            f"{reduction} (patch 4 and {stages - 1} patch mergings)"
        )
    grids = [config["image_res"] // (4 * 2**i) for i in range(stages)]
    window = config["window_size"]
    if any(grid > window and grid % window for grid in grids):
        raise ValueError(f"vision config {source}: window_size {window} must divide the stage grids {grids}")


class ImageEncoder(nn.Module):
    """X-VLM's Swin image encoder (timm ``SwinTransformer``) with the [mean ; grid] token output.

    Attributes: ``width`` (C), ``num_tokens`` (1 + L), ``image_res`` (R), ``grid_size`` (R / 32),
    ``vision_config`` (the resolved, JSON-serialisable config), ``frozen``. A frozen encoder has no trainable
    parameters. It follows its parent's train/eval mode like any module: in training mode its blocks drop
    paths at rate ``drop_path`` (stochastic depth, X-VLM's 0.1), as the reference's frozen encoder does under
    ``model.train()``; with ``drop_path=0`` its features are the same in both modes.
    """

    def __init__(self, vision_config: str | os.PathLike | Mapping, frozen: bool = True, drop_path: float = 0.1) -> None:
        super().__init__()
        self.frozen = frozen
        self.vision_config = resolve_vision_config(vision_config)
        cfg = self.vision_config
        self.swin = SwinTransformer(
            img_size=cfg["image_res"],
            patch_size=4,
            in_chans=3,
            num_classes=0,
            global_pool="",
            embed_dim=cfg["embed_dim"],
            depths=tuple(cfg["depths"]),
            num_heads=tuple(cfg["num_heads"]),
            window_size=cfg["window_size"],
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_path_rate=drop_path,
            norm_layer=nn.LayerNorm,
        )
        self.width: int = cfg["vision_width"]
        self.image_res: int = cfg["image_res"]
        self.grid_size: int = cfg["image_res"] // (4 * 2 ** (len(cfg["depths"]) - 1))
        self.num_tokens: int = 1 + self.grid_size**2
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: B x 3 x R x R, normalised. Returns B x (1 + L) x C: [mean of grid ; grid row-major]."""
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.image_res, self.image_res):
            raise ValueError(
                f"image encoder expects B x 3 x {self.image_res} x {self.image_res}, got {list(images.shape)}"
            )
        grid = self.swin.forward_features(images).flatten(1, 2)  # timm returns NHWC: B x h x w x C
        return torch.cat([grid.mean(dim=1, keepdim=True), grid], dim=1)

    def describe(self) -> str:
        """One line naming the architecture (used in error messages and logs)."""
        cfg = self.vision_config
        return (
            f"image_res {cfg['image_res']}, window {cfg['window_size']}, embed_dim {cfg['embed_dim']}, "
            f"depths {cfg['depths']}, heads {cfg['num_heads']}"
        )


def build_encoder(
    vision_config: str | dict | os.PathLike | None = "xvlm_swin_b_224",
    checkpoint: str | os.PathLike | None = None,
    image_res: int | None = None,
    frozen: bool = True,
    drop_path: float = 0.1,
) -> ImageEncoder:
    """Build the encoder and load ``checkpoint`` strictly into it (random timm init without one).

    vision_config: a preset name, a dict or an X-VLM Swin JSON path; None infers it from the checkpoint's
    tensor shapes (``infer_vision_config``) or, without a checkpoint, uses ``xvlm_swin_b_224``.
    image_res: overrides the config's resolution (window = image_res // 32 when it changes).
    Raises FileNotFoundError, CheckpointFormatError or CheckpointMismatchError, each naming the file.
    """
    weights = read_swin_checkpoint(checkpoint) if checkpoint is not None else None
    if vision_config is None and weights is not None:
        vision_config = infer_vision_config(weights)
        logger.info("vision config inferred from %s: %s", checkpoint, vision_config)
    elif vision_config is None:
        vision_config = "xvlm_swin_b_224"
    encoder = ImageEncoder(resolve_vision_config(vision_config, image_res), frozen=frozen, drop_path=drop_path)
    if weights is not None:
        load_swin_weights(encoder.swin, weights, encoder.describe())
    return encoder


def load_xvlm_encoder(
    checkpoint_path: str | os.PathLike,
    vision_config: str | dict | os.PathLike | None = None,
    image_res: int | None = None,
) -> ImageEncoder:
    """A frozen encoder (eval mode) with the weights of an X-VLM / Swin checkpoint.

    Without ``vision_config`` the architecture is read off the checkpoint (see ``infer_vision_config``).
    """
    return build_encoder(vision_config, checkpoint=checkpoint_path, image_res=image_res, frozen=True)
