"""The sparse prefix mask (models/sparse_mask.py): its score against the reference's formula computed with
numpy, the strict threshold, the hard mode's frozen parameters and the straight-through gate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.sparse_mask import SparsePrefixMask

P, D = 6, 5


def _mask(mode: str = "hard", threshold: float = 0.1, seed: int = 0) -> SparsePrefixMask:
    torch.manual_seed(seed)
    mask = SparsePrefixMask(P, D, threshold, mode)
    with torch.no_grad():  # a LayerNorm that is not the identity, so that its place in the formula shows
        mask.norm.weight.copy_(torch.linspace(0.5, 2.0, P))
        mask.norm.bias.copy_(torch.linspace(-0.3, 0.4, P))
    return mask


def _scores_by_hand(mask: SparsePrefixMask, prefix: torch.Tensor) -> np.ndarray:
    """sigmoid(LayerNorm((m K^T) V)) per image, K = prefix Wk^T + bk and V = prefix Wv^T + bv (P x P each)."""
    m = mask.m.detach().numpy().astype(np.float64)
    wk, bk = mask.key.weight.detach().numpy(), mask.key.bias.detach().numpy()
    wv, bv = mask.value.weight.detach().numpy(), mask.value.bias.detach().numpy()
    gamma, beta = mask.norm.weight.detach().numpy(), mask.norm.bias.detach().numpy()
    out = []
    for x in prefix.detach().numpy().astype(np.float64):
        k, v = x @ wk.T + bk, x @ wv.T + bv
        s = (m @ k.T) @ v
        normed = (s - s.mean()) / np.sqrt(s.var() + 1e-5) * gamma + beta
        out.append(1 / (1 + np.exp(-normed)))
    return np.stack(out)


def test_scores_follow_the_references_formula() -> None:
    mask = _mask()
    prefix = torch.randn(3, P, D, generator=torch.Generator().manual_seed(1))
    probs = mask.scores(prefix)
    assert probs.shape == (3, P)
    np.testing.assert_allclose(probs.detach().numpy(), _scores_by_hand(mask, prefix), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["hard", "ste"])
def test_keep_is_a_strict_threshold_on_the_scores(mode: str) -> None:
    prefix = torch.randn(3, P, D, generator=torch.Generator().manual_seed(2))
    probs = _mask(mode).scores(prefix).detach()
    threshold = float(probs.flatten().sort().values[8])  # some positions above, one exactly at it
    mask = _mask(mode, threshold)
    gate, keep = mask(prefix)
    assert keep.dtype == torch.bool and torch.equal(keep, probs > threshold)
    assert not keep.flatten()[probs.flatten() == threshold].any() and 0 < keep.sum() < keep.numel()
    assert torch.equal(gate.detach(), torch.ones(3, P))


def test_the_defaults_are_the_references_hard_threshold_of_0_1() -> None:
    torch.manual_seed(0)
    mask = SparsePrefixMask(50, D)  # the paper's 50 positions: a few normalised scores fall below -2.2
    prefix = torch.randn(16, 50, D, generator=torch.Generator().manual_seed(3))
    probs = mask.scores(prefix)
    _, keep = mask(prefix)
    assert torch.equal(keep, probs > 0.1) and (probs < 0.1).any() and (probs > 0.1).any()
    assert all(not p.requires_grad for p in mask.parameters())


def test_hard_mask_passes_no_gradient_and_ste_matches_its_forward() -> None:
    torch.manual_seed(0)
    prefix = torch.randn(4, 10, 8, requires_grad=True)
    ste, hard = SparsePrefixMask(10, 8, 0.5, "ste"), SparsePrefixMask(10, 8, 0.5, "hard")
    hard.load_state_dict(ste.state_dict())
    (gate_s, keep_s), (gate_h, keep_h) = ste(prefix), hard(prefix)
    assert torch.equal(keep_s, keep_h) and torch.equal(gate_s.detach(), gate_h)
    assert torch.equal(gate_h, torch.ones_like(gate_h))
    assert 0 < keep_s.sum() < keep_s.numel()
    assert not gate_h.requires_grad and gate_s.requires_grad  # hard: a constant, even for a prefix with gradients
    (prefix * gate_h.unsqueeze(-1)).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in hard.parameters())
    assert torch.equal(prefix.grad, torch.ones_like(prefix))  # the gate passes nothing back to the prefix
    (prefix * gate_s.unsqueeze(-1)).sum().backward()
    assert all(p.grad is not None for p in ste.parameters())


def test_the_straight_through_gate_carries_the_scores_gradient() -> None:
    """d(sum(gate * c)) / d(parameter) = d(sum(scores * c)) / d(parameter): the gate is 1 going forward and
    the scores going backward."""
    prefix = torch.randn(2, P, D, generator=torch.Generator().manual_seed(4))
    weights = torch.randn(2, P, generator=torch.Generator().manual_seed(5))
    mask = _mask("ste")
    gate, _ = mask(prefix)
    through_gate = torch.autograd.grad((gate * weights).sum(), list(mask.parameters()))
    through_scores = torch.autograd.grad((mask.scores(prefix) * weights).sum(), list(mask.parameters()))
    for name, a, b in zip([n for n, _ in mask.named_parameters()], through_gate, through_scores, strict=True):
        torch.testing.assert_close(a, b, msg=name)
        assert a.abs().max() > 0, name


def test_an_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match=r"sparse mask mode must be one of \('hard', 'ste'\), got 'soft'"):
        SparsePrefixMask(P, D, mode="soft")
