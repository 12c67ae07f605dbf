"""Mapping networks: visual tokens (B x N x C) -> GPT-2 prefix embeddings (B x P x D)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.config import MAPPING_TYPES


class MLPMapper(nn.Module):
    """Per-token two-layer MLP, ``Linear(C, 4D) -> tanh -> Linear(4D, D)``; P = N."""

    def __init__(self, in_dim: int, out_dim: int, num_tokens: int, hidden_ratio: int = 4) -> None:
        super().__init__()
        self.prefix_length = num_tokens
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_ratio * out_dim), nn.Tanh(), nn.Linear(hidden_ratio * out_dim, out_dim)
        )

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        """B x N x C -> B x N x D."""
        return self.net(visual)


class TransformerMapper(nn.Module):
    """Project the visual tokens, append P learned constants, run a pre-norm transformer, keep the
    outputs at the constants' positions."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        prefix_length: int,
        num_layers: int = 6,
        num_heads: int = 8,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.prefix_length = prefix_length
        self.proj = nn.Linear(in_dim, out_dim)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, out_dim))
        layer = nn.TransformerEncoderLayer(
            out_dim,
            num_heads,
            dim_feedforward=int(out_dim * mlp_ratio),
            dropout=0.0,
            activation="relu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        # Activation checkpointing per layer in training mode (train.grad_checkpointing): the checkpoint's
        # context_fn (models/checkpointing.py), None when off
        self.checkpoint_context: Callable | None = None

    def forward(self, visual: torch.Tensor) -> torch.Tensor:
        """B x N x C -> B x P x D."""
        x = self.proj(visual)
        const = self.prefix_const.unsqueeze(0).expand(x.shape[0], -1, -1)
        tokens = torch.cat([x, const], dim=1)
        if self.checkpoint_context is not None and self.training and torch.is_grad_enabled():
            # What TransformerEncoder does without masks, each layer keeping only its input for backward
            for layer in self.transformer.layers:
                tokens = checkpoint(layer, tokens, use_reentrant=False, context_fn=self.checkpoint_context)
            out = tokens if self.transformer.norm is None else self.transformer.norm(tokens)
        else:
            out = self.transformer(tokens)
        return out[:, x.shape[1] :]


def build_mapper(
    mapping_type: str,
    in_dim: int,
    out_dim: int,
    num_tokens: int,
    prefix_length: int | None = None,
    num_layers: int = 6,
    num_heads: int = 8,
) -> nn.Module:
    """Build the mapper; ``prefix_length`` defaults to the number of visual tokens."""
    if mapping_type == "mlp":
        if prefix_length not in (None, num_tokens):
            raise ValueError(f"the MLP mapper keeps one prefix token per visual token ({num_tokens})")
        return MLPMapper(in_dim, out_dim, num_tokens)
    if mapping_type == "transformer":
        return TransformerMapper(in_dim, out_dim, prefix_length or num_tokens, num_layers, num_heads)
    raise ValueError(f"mapping_type must be one of {MAPPING_TYPES}, got {mapping_type!r}")
