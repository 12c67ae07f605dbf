"""Activation checkpointing (``train.grad_checkpointing``): GPT-2's blocks through transformers' own switch
and the transformer mapper's layers through ``torch.utils.checkpoint``, recomputed in backward under the
dropout rates their forward pass ran with."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn
from transformers import GPT2LMHeadModel

ContextFn = Callable[[], tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]]


def rated_modules(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every dropout module (its rate in ``p``) and drop-path layer (timm's ``DropPath``: ``drop_prob``)."""
    rated = [(m, "p") for m in model.modules() if isinstance(m, nn.Dropout)]
    return rated + [(m, "drop_prob") for m in model.modules() if isinstance(getattr(m, "drop_prob", None), float)]


@contextlib.contextmanager
def rates_set(rated: list[tuple[nn.Module, str]], rates: list[float]) -> Iterator[None]:
    """Run the block with ``rated``'s rates set to ``rates``, then restore them."""
    before = [getattr(module, name) for module, name in rated]
    for (module, name), rate in zip(rated, rates, strict=True):
        setattr(module, name, rate)
    try:
        yield
    finally:
        for (module, name), rate in zip(rated, before, strict=True):
            setattr(module, name, rate)


def same_rates_on_recompute(model: nn.Module) -> ContextFn:
    """A ``context_fn`` for ``torch.utils.checkpoint``: the recomputation in backward runs with the dropout
    rates of the forward pass, which may have differed (SCST scores its samples with dropout off, then
    back-propagates after the rates are restored); the random state is restored by the checkpoint itself."""
    rated = rated_modules(model)

    def context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), rates_set(rated, [getattr(m, name) for m, name in rated])

    return context_fn


def enable_gpt2_checkpointing(gpt: GPT2LMHeadModel, context_fn: ContextFn) -> None:
    """transformers' own activation checkpointing of every GPT-2 block (non-reentrant): in training mode
    with gradients, each block keeps only its input and recomputes the rest during backward."""
    kwargs = {"use_reentrant": False, "context_fn": context_fn}
    enable = getattr(gpt, "activation_checkpointing_enable", None)  # the name since transformers 5.25
    if enable is not None:
        enable(kwargs)
    else:
        gpt.gradient_checkpointing_enable(kwargs)


@contextlib.contextmanager
def checkpointing_paused(gpt: GPT2LMHeadModel) -> Iterator[None]:
    """Checkpointing off inside: GPT-2 drops its KV cache whenever checkpointing is on in training mode, and
    decoding (SCST samples in training mode) needs the cache. transformers' switch is each module's
    ``gradient_checkpointing`` flag; disabling through its API and enabling again would add input hooks."""
    modules = [m for m in gpt.modules() if getattr(m, "gradient_checkpointing", False)]
    for module in modules:
        module.gradient_checkpointing = False
    try:
        yield
    finally:
        for module in modules:
            module.gradient_checkpointing = True
