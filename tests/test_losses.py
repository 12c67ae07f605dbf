"""The training losses (models/losses.py) against values worked out by hand with the math module."""

from __future__ import annotations

import math

import pytest
import torch

from models.losses import caption_xe_loss, npair_loss, scst_loss


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    total = math.log(sum(math.exp(x - top) for x in row)) + top
    return [x - total for x in row]


LOGITS = [[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]]
TARGETS = [0, 2]


def test_caption_xe_loss_is_the_mean_token_negative_log_likelihood() -> None:
    nll = [-_log_softmax(row)[t] for row, t in zip(LOGITS, TARGETS, strict=True)]
    logits, targets = torch.tensor(LOGITS), torch.tensor(TARGETS)
    assert caption_xe_loss(logits, targets).item() == pytest.approx(sum(nll) / 2, rel=1e-6)
    # Label smoothing 0.2 spreads 0.2 of the target's mass evenly over the 3 classes.
    smoothed = [
        0.8 * -_log_softmax(row)[t] + 0.2 * sum(-x for x in _log_softmax(row)) / 3
        for row, t in zip(LOGITS, TARGETS, strict=True)
    ]
    assert caption_xe_loss(logits, targets, 0.2).item() == pytest.approx(sum(smoothed) / 2, rel=1e-6)
    half = caption_xe_loss(logits.bfloat16(), targets)  # autocast's logits: the loss is taken in float32
    assert half.dtype == torch.float32 and half.item() == pytest.approx(sum(nll) / 2, rel=1e-2)


ANCHORS = [[1.0, 2.0], [0.5, -1.0], [-1.0, 0.0]]
POSITIVES = [[0.0, 1.0], [2.0, 0.5], [1.0, -1.5]]


def _npair_by_hand(anchors: list[list[float]], positives: list[list[float]], l2_weight: float) -> float:
    """Cross-entropy of each anchor over the positives (its own is the target), plus the weighted squared
    norms of both sets over the batch size."""
    ce = 0.0
    for i, a in enumerate(anchors):
        ce -= _log_softmax([sum(x * y for x, y in zip(a, p, strict=True)) for p in positives])[i]
    squares = sum(x * x for row in anchors + positives for x in row)
    return ce / len(anchors) + l2_weight * squares / len(anchors)


def test_npair_loss_by_hand() -> None:
    anchors, positives = torch.tensor(ANCHORS), torch.tensor(POSITIVES)
    expected = _npair_by_hand(ANCHORS, POSITIVES, 0.02 * 0.25)  # the reference's default weight
    assert npair_loss(anchors, positives).item() == pytest.approx(expected, rel=1e-6)
    assert npair_loss(anchors, positives, l2_weight=0.0).item() == pytest.approx(
        _npair_by_hand(ANCHORS, POSITIVES, 0.0), rel=1e-6
    )
    swapped = _npair_by_hand(POSITIVES, ANCHORS, 0.02 * 0.25)  # the roles matter
    assert abs(swapped - expected) > 1e-2
    wide = torch.tensor([[1.0, 2.0, 0.0, 1.0], [0.5, -1.0, 1.0, 0.0]])  # batch 2, width 4: no square shortcut
    wide_expected = _npair_by_hand(wide.tolist(), wide.flip(0).tolist(), 0.02 * 0.25)
    assert npair_loss(wide, wide.flip(0)).item() == pytest.approx(wide_expected, rel=1e-6)
    half = npair_loss(anchors.bfloat16(), positives.bfloat16())
    assert half.dtype == torch.float32 and half.item() == pytest.approx(expected, rel=1e-2)


# Four sampled captions: 2 tokens, 3 tokens, 1 token, and an empty one (no token counted).
LOGPROBS = [[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5], [-3.0, -7.0, -7.0], [-4.0, -4.0, -4.0]]
MASK = [[1, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]]
REWARDS, BASELINES = [2.0, 0.0, 1.5, 5.0], [1.0, 1.0, 0.5, 1.0]  # advantages +1, -1, +1, +4


@pytest.mark.parametrize("mask_dtype", [torch.long, torch.bool, torch.float64])
def test_scst_loss_by_hand(mask_dtype: torch.dtype) -> None:
    mask = torch.tensor(MASK).to(mask_dtype)
    rewards, baselines = torch.tensor(REWARDS), torch.tensor(BASELINES)
    # Mean log-probabilities -1.5, -0.5, -3 and 0 (empty): -(1 * -1.5 - 1 * -0.5 + 1 * -3 + 4 * 0) / 4 = 1
    loss = scst_loss(torch.tensor(LOGPROBS), mask, rewards, baselines)
    assert loss.item() == pytest.approx(1.0) and loss.dtype == torch.float32  # the log-probabilities' dtype
    assert scst_loss(torch.tensor(LOGPROBS), mask, rewards, baselines, length_norm=True).item() == pytest.approx(1.0)
    # Summed: -3, -1.5, -3, 0 -> -(1 * -3 - 1 * -1.5 + 1 * -3 + 0) / 4 = 1.125
    summed = scst_loss(torch.tensor(LOGPROBS), mask, rewards, baselines, length_norm=False)
    assert summed.item() == pytest.approx(1.125)


def test_scst_loss_gradient_reaches_the_log_probabilities_only() -> None:
    """d loss / d logprob of a counted token = -advantage / (tokens of its caption) / captions; the rewards
    and baselines are constants (no gradient), and float64 rewards leave the loss in float32."""
    logprobs = torch.tensor(LOGPROBS, requires_grad=True)
    rewards = torch.tensor(REWARDS, dtype=torch.float64, requires_grad=True)
    baselines = torch.tensor(BASELINES, dtype=torch.float64, requires_grad=True)
    loss = scst_loss(logprobs, torch.tensor(MASK), rewards, baselines)
    assert loss.dtype == torch.float32
    loss.backward()
    expected = [[-1 / 2 / 4, -1 / 2 / 4, 0.0], [1 / 3 / 4] * 3, [-1 / 4, 0.0, 0.0], [0.0, 0.0, 0.0]]
    torch.testing.assert_close(logprobs.grad, torch.tensor(expected))
    assert rewards.grad is None and baselines.grad is None


def test_the_losses_stay_on_their_inputs_device() -> None:
    """Tensors the losses create (the N-pair targets) go on the inputs' device: the ``meta`` device stands in
    for a GPU here, and mixing it with a CPU tensor raises."""
    anchors = torch.tensor(ANCHORS, device="meta")
    assert npair_loss(anchors, anchors).device.type == "meta"
    logits = torch.tensor(LOGITS, device="meta")
    assert caption_xe_loss(logits, torch.tensor(TARGETS, device="meta")).device.type == "meta"
    meta = {"device": "meta"}
    loss = scst_loss(torch.zeros(2, 3, **meta), torch.ones(2, 3, **meta), torch.ones(2, **meta), torch.zeros(2, **meta))
    assert loss.device.type == "meta"
