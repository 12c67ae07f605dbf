"""The OPG captioner: frozen image encoder -> mapping network -> (sparse mask) -> GPT-2."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GPT2LMHeadModel

from data.text import IGNORE_INDEX
from models.checkpointing import enable_gpt2_checkpointing, same_rates_on_recompute
from models.gpt2 import gpt2_attention_mask
from models.losses import caption_xe_loss, npair_loss
from models.sparse_mask import SparsePrefixMask
from utils.distributed import gather_with_grad


@dataclass
class Prefix:
    """GPT-2 prefix for a batch: ``embeds`` B x P x D (already gated), ``keep`` B x P (bool)."""

    embeds: torch.Tensor
    keep: torch.Tensor

    def repeat_interleave(self, n: int) -> Prefix:
        """Each image's prefix ``n`` times in a row (B*n rows), for beams and samples."""
        return Prefix(self.embeds.repeat_interleave(n, dim=0), self.keep.repeat_interleave(n, dim=0))


@dataclass
class EmbeddingBank:
    """The N-pair loss's embeddings of a whole accumulated batch on this process, computed without gradients
    before its first micro-batch: ``text`` and ``image`` B x D (B: the images of every micro-batch, in
    order). A micro-batch's loss takes its own rows, from ``start`` on, with gradients and the others as
    constants, so that its negatives are those of the whole batch (as open_clip's ``--accum-freq``)."""

    text: torch.Tensor
    image: torch.Tensor
    start: int

    def with_rows(self, text: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank with rows ``start .. start + b - 1`` replaced by ``text`` and ``image`` (b x D)."""
        end = self.start + text.shape[0]
        text = torch.cat([self.text[: self.start].to(text.dtype), text, self.text[end:].to(text.dtype)])
        image = torch.cat([self.image[: self.start].to(image.dtype), image, self.image[end:].to(image.dtype)])
        return text, image


def attention_mask(key_keep: torch.Tensor, query_start: int, num_queries: int) -> torch.Tensor:
    """Boolean B x 1 x Q x K mask (True = may attend) for queries at positions
    ``query_start .. query_start + Q - 1`` over keys ``0 .. K-1``.

    Causal and restricted to kept keys, as GPT-2 applies a padding mask. A query with no kept key at all
    (a dropped position at the start of the prefix) sees itself instead of nothing, which would give NaNs;
    no other position reads it.
    """
    device = key_keep.device
    q_pos = torch.arange(query_start, query_start + num_queries, device=device)
    k_pos = torch.arange(key_keep.shape[1], device=device)
    causal = k_pos[None, :] <= q_pos[:, None]
    allowed = causal[None] & key_keep[:, None, :]
    empty = ~allowed.any(dim=-1, keepdim=True)
    allowed = allowed | (empty & (k_pos[None, :] == q_pos[:, None])[None])
    return allowed[:, None]


class OPGCaptioner(nn.Module):
    """Image -> caption model. ``forward`` returns the training losses; decoding lives in
    ``models.decoding`` and drives :meth:`encode` and :meth:`gpt` with the same masks and positions."""

    def __init__(
        self,
        encoder: nn.Module,
        mapper: nn.Module,
        gpt: GPT2LMHeadModel,
        sparse_mask: SparsePrefixMask | None = None,
        only_prefix: bool = False,
        output_ids: torch.Tensor | None = None,
        apply_sparse_mask: bool = True,
    ) -> None:
        """``output_ids``: sorted GPT-2 ids the model may produce (its output vocabulary); None for all.
        ``apply_sparse_mask`` False keeps ``sparse_mask``'s weights but lets GPT-2 read every position."""
        super().__init__()
        self.encoder = encoder
        self.mapper = mapper
        self.gpt = gpt
        self.sparse_mask = sparse_mask
        self.apply_sparse_mask = apply_sparse_mask
        self.only_prefix = only_prefix
        self.register_buffer("output_ids", None if output_ids is None else output_ids.long())
        if only_prefix:
            self.gpt.requires_grad_(False)
            self.gpt.eval()

    def enable_grad_checkpointing(self) -> None:
        """Activation checkpointing in training: GPT-2's blocks (transformers' own) and the transformer
        mapper's layers recompute their activations during backward instead of keeping them. The same losses
        and gradients; paused while decoding, which needs GPT-2's KV cache."""
        context_fn = same_rates_on_recompute(self)
        enable_gpt2_checkpointing(self.gpt, context_fn)
        if hasattr(self.mapper, "checkpoint_context"):
            self.mapper.checkpoint_context = context_fn

    @property
    def masks_prefix(self) -> bool:
        """Whether the sparse mask decides which prefix positions GPT-2 reads."""
        return self.sparse_mask is not None and self.apply_sparse_mask

    @property
    def prefix_length(self) -> int:
        return self.mapper.prefix_length

    def train(self, mode: bool = True) -> OPGCaptioner:
        super().train(mode)
        if self.only_prefix:
            self.gpt.eval()
        return self

    def encode(self, images: torch.Tensor | None = None, *, features: torch.Tensor | None = None) -> Prefix:
        """Normalised ``images`` B x 3 x H x W, or their precomputed encoder ``features`` B x N x C (the
        feature cache), -> prefix. Exactly one of the two."""
        if (images is None) == (features is None):
            raise ValueError("encode takes images or their encoder features, exactly one of the two")
        if features is not None:
            return self.prefix_from_visual(features)
        frozen = not any(p.requires_grad for p in self.encoder.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            visual = self.encoder(images)
        return self.prefix_from_visual(visual)

    def prefix_from_visual(self, visual: torch.Tensor) -> Prefix:
        """Visual tokens B x N x C -> prefix (B x P x D embeddings and the keep mask)."""
        embeds = self.mapper(visual)
        if not self.masks_prefix:
            keep = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
            return Prefix(embeds, keep)
        gate, keep = self.sparse_mask(embeds)
        return Prefix(embeds * gate.unsqueeze(-1).to(embeds.dtype), keep)

    def token_hidden(self, prefix: Prefix, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced GPT-2 states B x T x D; state ``t`` predicts ``input_ids[:, t]``.

        This owns the offset between the prefix and the caption: GPT-2 reads
        ``[prefix ; input_ids[:, :-1]]`` at positions ``0 .. P+T-2`` and the states from position P-1
        on predict the caption tokens.
        """
        batch, steps = input_ids.shape
        tokens = self.gpt.transformer.wte(input_ids[:, :-1])
        embeds = torch.cat([prefix.embeds.to(tokens.dtype), tokens], dim=1)
        keep = torch.cat([prefix.keep, prefix.keep.new_ones(batch, steps - 1)], dim=1)
        length = embeds.shape[1]
        out = self.gpt.transformer(
            inputs_embeds=embeds,
            attention_mask=gpt2_attention_mask(self.gpt, attention_mask(keep, 0, length)),
            position_ids=torch.arange(length, device=embeds.device).unsqueeze(0),
            use_cache=False,
        )
        return out.last_hidden_state[:, self.prefix_length - 1 :]

    def output_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight V' x D and bias (V' or None) of the output layer over the output vocabulary."""
        head = self.gpt.lm_head
        if self.output_ids is None:
            return head.weight, head.bias
        return head.weight[self.output_ids], None if head.bias is None else head.bias[self.output_ids]

    def output_embeddings(self) -> torch.Tensor:
        """GPT-2 input embeddings of the output vocabulary, V' x D (row i embeds output token i)."""
        weight = self.gpt.transformer.wte.weight
        return weight if self.output_ids is None else weight[self.output_ids]

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """GPT-2 states ... x D -> logits ... x V' over the output vocabulary (V' = len(output_ids))."""
        return F.linear(hidden, *self.output_layer())

    def vocab_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """GPT-2 states ... x D -> logits ... x V over all GPT-2 ids, -inf outside the output vocabulary."""
        logits = self.output_logits(hidden)
        if self.output_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.gpt.config.vocab_size), -math.inf)
        return full.index_copy(-1, self.output_ids, logits)

    def output_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """GPT-2 ids -> their indices in the output vocabulary; ValueError for ids outside it."""
        if self.output_ids is None:
            return token_ids
        index = torch.searchsorted(self.output_ids, token_ids).clamp(max=len(self.output_ids) - 1)
        if torch.compiler.is_compiling():
            # No data-dependent branch in a compiled graph; training's captions are the vocabulary's source.
            return index
        outside = self.output_ids[index] != token_ids
        if outside.any():
            unknown = sorted(set(token_ids[outside].tolist()))[:10]
            raise ValueError(f"caption token ids {unknown} are outside the model's output vocabulary")
        return index

    def token_logits(self, prefix: Prefix, input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits B x T x V for the caption tokens ``input_ids`` (B x T)."""
        return self.vocab_logits(self.token_hidden(prefix, input_ids))

    def aux_embeddings(
        self, prefix: Prefix, input_ids: torch.Tensor, labels: torch.Tensor, text_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The N-pair loss's pair per image: the mean GPT-2 input embedding of the first ``text_tokens`` real
        caption tokens (``input_ids`` B x T, ``labels`` -100 at padding) and the mean prefix embedding; B x D each."""
        first = (labels != IGNORE_INDEX)[:, :text_tokens].unsqueeze(-1)
        token_embeds = self.gpt.transformer.wte(input_ids[:, :text_tokens]) * first
        return token_embeds.sum(1) / first.sum(1).clamp(min=1), prefix.embeds.mean(1)

    def forward(
        self,
        images: torch.Tensor | None,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        aux_weight: float = 0.0,
        label_smoothing: float = 0.0,
        aux_text_tokens: int = 20,
        features: torch.Tensor | None = None,
        aux_bank: EmbeddingBank | None = None,
    ) -> dict[str, torch.Tensor]:
        """Training losses for images B x 3 x H x W (or, with ``images`` None, cached encoder ``features``
        B x N x C) and captions ``input_ids`` B x T; ``labels`` equal ``input_ids`` with padding set to -100.
        Returns ``loss``
        (= xe + aux_weight * aux), ``xe`` and ``aux``.

        ``aux`` is the N-pair loss of the reference: each caption's text embedding (the mean GPT-2 input
        embedding of its first ``aux_text_tokens`` tokens) must pick its own image (the mean prefix
        embedding) among the images of the whole batch, over all processes (and over all micro-batches of an
        accumulated step with ``aux_bank``). The reference's mean also counts the padding of captions shorter
        than that; here it covers real tokens only."""
        prefix = self.encode(images, features=features)
        hidden = self.token_hidden(prefix, input_ids)
        real = labels != IGNORE_INDEX
        # The vocabulary projection dominates the cost: apply it to real tokens only.
        targets = self.output_index(labels[real])
        xe = caption_xe_loss(self.output_logits(hidden[real]), targets, label_smoothing)
        losses = {"xe": xe}
        if aux_weight > 0:
            text_mean, image_mean = self.aux_embeddings(prefix, input_ids, labels, aux_text_tokens)
            if aux_bank is not None:
                text_mean, image_mean = aux_bank.with_rows(text_mean, image_mean)
            losses["aux"] = npair_loss(gather_with_grad(text_mean), gather_with_grad(image_mean))
            losses["loss"] = xe + aux_weight * losses["aux"]
        else:
            losses["loss"] = xe
        return losses
