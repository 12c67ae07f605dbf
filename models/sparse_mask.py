"""Learned sparse mask over prefix positions."""

from __future__ import annotations

import torch
from torch import nn

from models.config import SPARSE_MASK_MODES


class SparsePrefixMask(nn.Module):
    """Scores every prefix position and keeps those whose score exceeds ``threshold``.

    ``score = sigmoid(LayerNorm((m K^T) V))`` with a learned vector ``m`` (P) and per-image ``K``, ``V``
    (P x P) projected from the prefix, all initialised as in the reference (``m`` standard normal). In
    ``hard`` mode (default) the threshold is applied as in the reference code, so none of these parameters
    ever receives a gradient: the mask stays as initialised and, with threshold 0.1, drops only positions
    whose normalised score is below about -2.2. In ``ste`` mode the forward pass is identical, and a
    straight-through estimator lets the mask learn: each position's embedding is scaled by
    ``1 + s - stop_gradient(s)`` (exactly 1 in the forward pass), so its score receives the gradient of
    scaling that position's contribution up or down.
    """

    def __init__(self, prefix_length: int, dim: int, threshold: float = 0.1, mode: str = "hard") -> None:
        super().__init__()
        if mode not in SPARSE_MASK_MODES:
            raise ValueError(f"sparse mask mode must be one of {SPARSE_MASK_MODES}, got {mode!r}")
        self.threshold = threshold
        self.mode = mode
        self.m = nn.Parameter(torch.randn(prefix_length))
        self.key = nn.Linear(dim, prefix_length)
        self.value = nn.Linear(dim, prefix_length)
        self.norm = nn.LayerNorm(prefix_length)
        if mode == "hard":
            self.requires_grad_(False)  # a hard threshold passes them no gradient: they stay as initialised

    def scores(self, prefix: torch.Tensor) -> torch.Tensor:
        """Keep probabilities, B x P, for a prefix B x P x D."""
        k, v = self.key(prefix), self.value(prefix)
        s = torch.einsum("p,bqp->bq", self.m, k)
        s = torch.einsum("bq,bqr->br", s, v)
        return torch.sigmoid(self.norm(s))

    def forward(self, prefix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(gate, keep)`` for a prefix B x P x D.

        ``keep`` (B x P, bool) says which positions GPT-2 may attend to. ``gate`` (B x P) equals 1; the
        caller multiplies the prefix by it, which changes nothing in the forward pass and, in ``ste``
        mode, carries the gradient to the scores.
        """
        probs = self.scores(prefix)
        keep = probs > self.threshold
        if self.mode == "hard":
            return torch.ones_like(probs), keep
        return 1.0 + (probs - probs.detach()), keep
