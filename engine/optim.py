"""Optimizer and learning-rate schedule of the recipe."""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from engine.config import TrainConfig

_NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def no_decay_parameters(model: nn.Module) -> set[nn.Parameter]:
    """Biases and normalisation-layer parameters: the group the reference's SCST optimizer exempts from
    weight decay (it matches names, which misses GPT-2's ``ln_1``/``ln_2``/``ln_f`` weights; here every
    LayerNorm counts)."""
    exempt: set[nn.Parameter] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "bias" or isinstance(module, _NORM_LAYERS):
                exempt.add(param)
    return exempt


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (betas ``(0.9, adam_beta2)``, ``adam_eps``), with weight decay on
    all of them or, without ``decay_norm_and_bias``, on all but biases and LayerNorm parameters.

    PyTorch's fused kernel where it has one (CPU, CUDA): on the CPU it steps GPT-2's 6.4M-entry embedding
    matrix about 6x faster than the default multi-tensor one."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups: list[dict] = [{"params": params, "weight_decay": cfg.weight_decay}]
    if not cfg.decay_norm_and_bias:
        exempt = no_decay_parameters(model)
        groups = [
            {"params": [p for p in params if p not in exempt], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p in exempt], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(0.9, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=fused
    )


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float) -> LambdaLR:
    """Linear warm-up from 0 over ``warmup_ratio`` of the steps, then linear decay to 0 at ``total_steps``:
    transformers' ``get_linear_schedule_with_warmup``, which the reference uses (step 0 has learning rate 0)."""
    warmup = warmup_ratio * total_steps

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1.0, warmup)
        return max(0.0, (total_steps - step) / max(1.0, total_steps - warmup))

    return LambdaLR(optimizer, factor)
