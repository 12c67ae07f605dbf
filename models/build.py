"""Build the captioner from its architecture description (``models.config.CaptionerConfig``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from models.captioner import OPGCaptioner
from models.config import CaptionerConfig
from models.encoder import build_encoder
from models.gpt2 import build_gpt2
from models.mapper import build_mapper
from models.sparse_mask import SparsePrefixMask


def build_captioner(
    cfg: CaptionerConfig,
    vision_config: dict[str, Any] | None = None,
    gpt2_config: dict[str, Any] | None = None,
    output_ids: Sequence[int] | None = None,
) -> OPGCaptioner:
    """Build the model described by ``cfg``, loading the encoder checkpoint and GPT-2 weights it names.

    ``vision_config`` and ``gpt2_config`` rebuild a saved model's exact architecture with random weights
    (its checkpoint then supplies every weight), so no external file is read. ``output_ids`` restricts
    the output vocabulary to those GPT-2 ids (see ``model.output_vocab``).
    """
    enc = cfg.encoder
    if vision_config is not None:
        encoder = build_encoder(vision_config, None, enc.image_res, enc.frozen, enc.drop_path)
    else:
        encoder = build_encoder(enc.vision_config, enc.checkpoint, enc.image_res, enc.frozen, enc.drop_path)
    gpt = build_gpt2(cfg.model.gpt2, gpt2_config if gpt2_config is not None else cfg.model.gpt2_config)
    dim = gpt.config.n_embd
    mapper = build_mapper(
        cfg.model.mapping_type,
        encoder.width,
        dim,
        encoder.num_tokens,
        cfg.model.prefix_length,
        cfg.model.mapper_layers,
        cfg.model.mapper_heads,
    )
    if gpt.config.n_positions < mapper.prefix_length + 8:
        raise ValueError(
            f"GPT-2 has {gpt.config.n_positions} positions but the prefix alone takes {mapper.prefix_length}: "
            "raise model.gpt2_config.n_positions or shorten the prefix"
        )
    mask = None
    if cfg.model.use_sparse_mask:
        mask = SparsePrefixMask(mapper.prefix_length, dim, cfg.model.threshold, cfg.model.sparse_mask_mode)
    ids = None if output_ids is None else torch.as_tensor(output_ids, dtype=torch.long)
    return OPGCaptioner(
        encoder,
        mapper,
        gpt,
        mask,
        only_prefix=cfg.model.only_prefix,
        output_ids=ids,
        apply_sparse_mask=cfg.model.apply_sparse_mask,
    )


def architecture(model: OPGCaptioner) -> dict[str, Any]:
    """What a checkpoint must carry to rebuild ``model`` without external files."""
    output_ids = None if model.output_ids is None else model.output_ids.tolist()
    return {
        "vision_config": dict(model.encoder.vision_config),
        "gpt2_config": model.gpt.config.to_dict(),
        "output_ids": output_ids,
    }


def rebuild_captioner(cfg: CaptionerConfig, arch: dict[str, Any]) -> OPGCaptioner:
    """The architecture saved by :func:`architecture`, with random weights."""
    return build_captioner(cfg, arch["vision_config"], arch["gpt2_config"], arch.get("output_ids"))
