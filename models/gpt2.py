"""GPT-2 decoder: pretrained weights from a directory or hub name, or a randomly initialised config."""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

from models.hub import hub_reachable
from models.tokenizer import GPT2_VOCAB_SIZE

logger = logging.getLogger(__name__)

# Recent transformers releases renamed GPT-2's ``past_key_values`` (argument and output field) to ``cache``.
_CACHE_FIELD = "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"


def build_gpt2(name_or_dir: str, config: dict[str, Any] | None = None) -> GPT2LMHeadModel:
    """Load pretrained GPT-2 from ``name_or_dir``, or build random weights from ``config`` fields.

    ``config`` is a dict of ``GPT2Config`` fields (e.g. ``{n_layer: 2, n_embd: 128, n_head: 2}``); the
    vocabulary defaults to GPT-2's 50257 tokens.
    """
    if config is not None:
        fields = {"vocab_size": GPT2_VOCAB_SIZE, **config}
        return GPT2LMHeadModel(GPT2Config(**fields))
    path = Path(name_or_dir).expanduser()
    if path.is_dir():
        return GPT2LMHeadModel.from_pretrained(path)
    try:
        return GPT2LMHeadModel.from_pretrained(name_or_dir, local_files_only=True)
    except OSError:
        if not hub_reachable():
            raise RuntimeError(
                f"GPT-2 weights {name_or_dir!r}: not a local directory, not in the Hugging Face cache, and "
                "the hub is unreachable. Download them once (e.g. save_pretrained to a folder) and set "
                "model.gpt2 to that folder, or give model.gpt2_config to train from random weights."
            ) from None
    return GPT2LMHeadModel.from_pretrained(name_or_dir)


def forward_with_cache(transformer: GPT2Model, cache: Any, **kwargs: Any) -> tuple[Any, Any]:
    """Run ``transformer`` with a KV cache (None on the first call) under either transformers spelling;
    returns its output and the updated cache."""
    out = transformer(**{_CACHE_FIELD: cache}, use_cache=True, **kwargs)
    return out, getattr(out, _CACHE_FIELD)


# Attention implementations that apply a 4D mask given as it is: SDPA reads a boolean one, eager adds it to the
# scores (a boolean mask added as 0/1 would leave every position visible, so eager gets an additive one).
# Flash and flex attention take no such mask, so they could not apply the sparse prefix mask.
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def gpt2_attention_mask(gpt: GPT2Model | GPT2LMHeadModel, allowed: torch.Tensor) -> torch.Tensor:
    """The boolean B x 1 x Q x K mask ``allowed`` (True: may attend) in the form ``gpt``'s attention
    implementation applies; ValueError for an implementation that cannot apply it."""
    implementation = gpt.config._attn_implementation
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        blocked = torch.finfo(torch.float32).min
        return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, blocked)
    raise ValueError(
        f"GPT-2 attention implementation {implementation!r} is not supported: the sparse prefix mask and "
        f"training's positions need a 4D attention mask, which only {ATTENTION_IMPLEMENTATIONS} apply"
    )
