"""Training losses as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def caption_xe_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean token cross-entropy. ``logits`` N x V and ``targets`` N (already restricted to real tokens)."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def npair_loss(anchors: torch.Tensor, positives: torch.Tensor, l2_weight: float = 0.02 * 0.25) -> torch.Tensor:
    """N-pair loss: each anchor (B x D) must score its own positive (B x D) above the batch's others
    (cross-entropy of each anchor over the positives), plus ``l2_weight`` times the squared norms of both
    sets divided by B. The reference's anchors are the texts and its positives the images."""
    anchors, positives = anchors.float(), positives.float()
    logits = anchors @ positives.t()
    targets = torch.arange(anchors.shape[0], device=anchors.device)
    l2 = (anchors.pow(2).sum() + positives.pow(2).sum()) / anchors.shape[0]
    return F.cross_entropy(logits, targets) + l2_weight * l2


def scst_loss(
    token_logprobs: torch.Tensor,
    token_mask: torch.Tensor,
    rewards: torch.Tensor,
    baselines: torch.Tensor,
    length_norm: bool = True,
) -> torch.Tensor:
    """Self-critical policy-gradient loss.

    ``token_logprobs`` and ``token_mask`` are M x T (one row per sampled caption, mask 0 after the stop
    token), ``rewards`` and ``baselines`` are M. Each caption's log-probability is summed (or averaged
    over its tokens with ``length_norm``) and weighted by its advantage; the mean over captions is
    returned. Minimising it raises the probability of captions that beat their baseline.
    """
    mask = token_mask.to(token_logprobs.dtype)
    seq_logprob = (token_logprobs * mask).sum(dim=1)
    if length_norm:
        seq_logprob = seq_logprob / mask.sum(dim=1).clamp(min=1.0)
    advantage = (rewards - baselines).to(seq_logprob.dtype).detach()
    return -(advantage * seq_logprob).mean()
