"""Where captions are made: batches of images (or of their cached encoder features) -> captions.

:func:`caption_batches` is the one routine that turns images into caption texts. Validation and the test
split (``engine/evaluation.py``), ``predict.py``, SCST's greedy baseline (``engine/steps.py``), the Python
API (``models/api.py``) and the web app (``webapp/service.py``) all call it, so a checkpoint captions an
image the same way everywhere: eval mode, the same autocast precision, the same decoder
(:mod:`models.decoding`), the same token-to-text step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch

from data.datasets import batch_inputs
from models.captioner import OPGCaptioner
from models.decoding import DecodeOptions, captions_from_tokens, decode, eval_mode
from models.static_decode import FastDecode
from utils.precision import autocast


class ScoredCaption(NamedTuple):
    """A caption and its score: summed token log-probability / length ** length_penalty (higher is better)."""

    text: str
    score: float


Batch = Mapping[str, Any]


def caption_batches(
    model: OPGCaptioner,
    batches: Iterable[Batch],
    tokenizer: Any,
    options: DecodeOptions,
    precision: str = "fp32",
    generator: torch.Generator | None = None,
    fast: FastDecode | None = None,
) -> Iterator[tuple[Batch, list[list[ScoredCaption]]]]:
    """Caption each batch in eval mode under ``precision``'s autocast, without gradients.

    A batch is a collated dict whose model inputs are ``images`` (B x 3 x R x R, normalised) or
    ``features`` (B x N x C, cached encoder output); its other keys (``indices``, failures, ...) are the
    caller's. Yields every batch with, per input image in order, ``options.captions_per_image`` captions
    best first; a batch without inputs (no image could be read) comes back with none. ``precision`` "fp32"
    adds no autocast, so a caller's own autocast (SCST's training step) applies. The model's training
    mode is restored before each batch is handed back. ``generator`` seeds sampling; ``fast`` selects SCST's
    static-cache decoding (:mod:`models.static_decode`) for greedy decoding and sampling.
    """
    device = next(model.parameters()).device
    for batch in batches:
        inputs = batch_inputs(batch, device)
        captions = _caption_inputs(model, inputs, tokenizer, options, precision, generator, fast) if inputs else []
        yield batch, captions


@torch.no_grad()
def _caption_inputs(
    model: OPGCaptioner,
    inputs: dict[str, torch.Tensor],
    tokenizer: Any,
    options: DecodeOptions,
    precision: str,
    generator: torch.Generator | None,
    fast: FastDecode | None,
) -> list[list[ScoredCaption]]:
    device = next(iter(inputs.values())).device
    with eval_mode(model), autocast(precision, device):
        result = decode(model, model.encode(**inputs), options, generator=generator, fast=fast)
    texts = captions_from_tokens(tokenizer, result)
    scores = result.scores.float().tolist()
    n = options.captions_per_image
    per_image = [
        [ScoredCaption(text, score) for text, score in zip(texts[i : i + n], scores[i : i + n], strict=True)]
        for i in range(0, len(texts), n)
    ]
    return [sorted(captions, key=lambda c: -c.score) for captions in per_image]
