"""Caption decoding: greedy, beam search and sampling, batched over images, with GPT-2's KV cache.

One implementation serves validation, prediction and SCST. It reads GPT-2 with the positions and masks of
training (:meth:`OPGCaptioner.token_hidden`): the prefix occupies positions ``0 .. P-1`` whether the sparse
mask keeps a position or not, caption token ``t`` sits at position ``P + t``, and dropped prefix positions
are never attended to by later positions.

Lengths: ``max_len`` counts every generated token including the stop token; a stop token can only come
after ``min_len`` other tokens. Finished sequences are padded with ``pad_id`` at log-probability 0.

Log-probabilities are those of the model at temperature 1 for greedy and beam search, and of the tempered
distribution for sampling; bans (``min_len``, ``no_repeat_ngram``) and top-k / top-p truncation only decide
which tokens may be chosen. A sequence's score is the sum of its token log-probabilities divided by
``length ** length_penalty``.

Beam search follows the semantics of Hugging Face ``generate`` with ``early_stopping=False``: every step
keeps the best ``(1 + number of stop ids) * beams`` continuations; those ending in a stop token that rank
among the first ``beams`` become finished hypotheses (scored with the length penalty), the best ``beams``
others continue; an image is done once it holds ``beams`` finished hypotheses and its best running beam,
normalised at the current length, cannot beat the worst of them. At ``max_len`` every continuation
finishes. With one beam this is exactly greedy decoding. ``num_return`` (<= ``beams``) returns each image's
best finished hypotheses, best first, like ``num_return_sequences``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Self

import torch

from models.captioner import OPGCaptioner, Prefix, attention_mask
from models.checkpointing import checkpointing_paused, rated_modules, rates_set
from models.config import DecodeConfig
from models.gpt2 import forward_with_cache, gpt2_attention_mask
from models.static_decode import FastDecode, StaticPrefixLM, dropout_active, supports_static_cache
from models.tokenizer import GPT2_END_OF_TEXT_ID, GPT2_PERIOD_ID

METHODS = ("greedy", "beam", "sample")


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode. ``beams`` and ``num_return`` (captions per image, at most ``beams``) only for
    ``beam``; ``temperature``, ``top_k`` (0: off), ``top_p`` (1: off) and ``num_samples`` (captions per
    image) only for ``sample``."""

    method: str = "greedy"
    beams: int = 1
    max_len: int = 20
    min_len: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    num_samples: int = 1
    num_return: int = 1
    stop_ids: tuple[int, ...] = (GPT2_PERIOD_ID, GPT2_END_OF_TEXT_ID)
    pad_id: int = GPT2_END_OF_TEXT_ID

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_ids", tuple(int(i) for i in self.stop_ids))
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {METHODS}, got {self.method!r}")
        if self.beams < 1 or (self.beams > 1 and self.method != "beam"):
            problems.append(f"beams={self.beams}: must be >= 1, and 1 unless method='beam'")
        if self.num_samples < 1 or (self.num_samples > 1 and self.method != "sample"):
            problems.append(f"num_samples={self.num_samples}: must be >= 1, and 1 unless method='sample'")
        if not 1 <= self.num_return <= self.beams:
            problems.append(f"num_return={self.num_return}: must be between 1 and beams ({self.beams})")
        if not 0 <= self.min_len <= self.max_len or self.max_len < 1:
            problems.append(f"need 0 <= min_len <= max_len and max_len >= 1, got {self.min_len}, {self.max_len}")
        if self.temperature <= 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.no_repeat_ngram < 0:
            problems.append("need temperature > 0, top_k >= 0, 0 < top_p <= 1 and no_repeat_ngram >= 0")
        if problems:
            raise ValueError("invalid decoding options: " + "; ".join(problems))

    @classmethod
    def from_config(cls, cfg: DecodeConfig, **overrides: object) -> DecodeOptions:
        """Options from the config's ``decode`` section (beam search when ``beams > 1``), then overrides."""
        values: dict[str, object] = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
        values["method"] = "beam" if cfg.beams > 1 else "greedy"
        values.update(overrides)
        return cls(**values)

    @property
    def rows_per_image(self) -> int:
        """Sequences decoded side by side for each image (beams or samples)."""
        return self.beams if self.method == "beam" else self.num_samples

    @property
    def captions_per_image(self) -> int:
        """Captions returned for each image (``num_return`` best beams or ``num_samples`` samples)."""
        return self.num_return if self.method == "beam" else self.num_samples


@dataclass
class DecodeResult:
    """Decoded captions, M = images x ``options.captions_per_image`` (image-major) in input order.

    ``tokens`` M x T (padded after each caption), ``lengths`` M (tokens including the stop token),
    ``stopped`` M (True: ends with a stop token, False: cut at ``max_len``), ``token_logprobs`` M x T
    (0 after the caption; carries gradients when decoding ran with them) or None, ``scores`` M."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    token_logprobs: torch.Tensor | None
    scores: torch.Tensor


class CachedPrefixLM:
    """GPT-2 over ``[prefix ; tokens]`` one token per step, with a KV cache, training's positions and the
    prefix keep mask. Rows are independent sequences; :meth:`select` reorders or drops them.

    Logits and tokens are indices into the model's output vocabulary (GPT-2 ids when it has none)."""

    def __init__(self, model: OPGCaptioner, prefix: Prefix) -> None:
        self.gpt = model.gpt
        # Gathered once per decode: per-step gathers would each scatter a full-vocabulary gradient.
        self.head = model.output_layer()
        self.embeddings = model.output_embeddings()
        self.prefix = prefix
        self.key_keep = prefix.keep
        self.cache = None

    def prefill(self, repeats: int = 1) -> torch.Tensor:
        """Run the prefix once per image, then copy its cache ``repeats`` times (image-major rows).
        Returns the logits of the first caption token, (B * repeats) x V, float32."""
        embeds = self.prefix.embeds.to(self.embeddings.dtype)
        logits = self._forward(embeds)
        if repeats > 1:
            self.cache.batch_repeat_interleave(repeats)
            self.key_keep = self.key_keep.repeat_interleave(repeats, dim=0)
            logits = logits.repeat_interleave(repeats, dim=0)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed each row's latest token (R) and return the next-token logits, R x V, float32."""
        ones = self.key_keep.new_ones(self.key_keep.shape[0], 1)
        self.key_keep = torch.cat([self.key_keep, ones], dim=1)
        return self._forward(self.embeddings[tokens].unsqueeze(1))

    def select(self, rows: torch.Tensor) -> None:
        """Keep the rows ``rows`` (LongTensor, may repeat or reorder them) for the following steps."""
        if rows.numel() == self.key_keep.shape[0] and torch.equal(rows, torch.arange(rows.numel(), device=rows.device)):
            return
        self.cache.batch_select_indices(rows)
        self.key_keep = self.key_keep[rows]

    def static_parts(self) -> tuple:
        """What :meth:`StaticPrefixLM.from_prefilled` copies: transformer, cache, keep mask, head, embeddings."""
        return self.gpt.transformer, self.cache, self.key_keep, self.head, self.embeddings

    def _forward(self, embeds: torch.Tensor) -> torch.Tensor:
        count = embeds.shape[1]
        start = self.key_keep.shape[1] - count
        out, self.cache = forward_with_cache(
            self.gpt.transformer,
            self.cache,
            inputs_embeds=embeds,
            attention_mask=gpt2_attention_mask(self.gpt, attention_mask(self.key_keep, start, count)),
            position_ids=torch.arange(start, start + count, device=embeds.device).unsqueeze(0),
        )
        # The vocabulary projection dominates small models: apply it to the last position only.
        return torch.nn.functional.linear(out.last_hidden_state[:, -1], *self.head).float()


def decode(
    model: OPGCaptioner,
    prefix: Prefix,
    options: DecodeOptions,
    with_logprobs: bool = False,
    generator: torch.Generator | None = None,
    uniforms: torch.Tensor | None = None,
    fast: FastDecode | None = None,
) -> DecodeResult:
    """Decode captions for a batch of prefixes (``prefix.embeds`` B x P x D, ``prefix.keep`` B x P).

    Returns ``options.captions_per_image`` captions per image (image-major): one, the ``num_samples``
    samples, or the ``num_return`` best beams, best first. With
    ``with_logprobs`` and grad mode on, greedy decoding and sampling keep the graph of their forward passes
    so that ``token_logprobs`` can be back-propagated (SCST); beam search never does, as choosing among
    beams is not differentiable. ``generator`` seeds sampling.
    """
    positions = prefix.embeds.shape[1] + options.max_len - 1
    if positions > model.gpt.config.n_positions:
        raise ValueError(
            f"prefix ({prefix.embeds.shape[1]}) + max_len ({options.max_len}) - 1 = {positions} positions exceed "
            f"GPT-2's n_positions ({model.gpt.config.n_positions})"
        )
    differentiable = torch.is_grad_enabled() and with_logprobs and options.method != "beam"
    local = _in_output_vocabulary(model, options)
    with torch.set_grad_enabled(differentiable), checkpointing_paused(model.gpt):
        lm = CachedPrefixLM(model, prefix)
        logits = lm.prefill(options.rows_per_image)
        if options.method == "beam":
            result = _beam_search(lm, logits, local)
        elif fast is not None and supports_static_cache(model.gpt):
            result = _decode_static(lm, logits, local, fast, generator, uniforms)
        else:
            result = _decode_rows(lm, logits, local, generator, uniforms)
    if model.output_ids is not None:
        caption = torch.arange(result.tokens.shape[1], device=result.tokens.device)[None] < result.lengths[:, None]
        result.tokens = torch.where(caption, model.output_ids[result.tokens], options.pad_id)
    if not with_logprobs:
        result.token_logprobs = None
    return result


def _in_output_vocabulary(model: OPGCaptioner, options: DecodeOptions) -> DecodeOptions:
    """``options`` with stop ids as output-vocabulary indices (ids outside it can never be produced) and
    a placeholder pad that :func:`decode` replaces."""
    if model.output_ids is None:
        return options
    stop_ids = model.output_ids.new_tensor(options.stop_ids)
    stop_ids = stop_ids[torch.isin(stop_ids, model.output_ids)]
    return replace(options, stop_ids=tuple(model.output_index(stop_ids).tolist()), pad_id=0)


def teacher_forced_logprobs(
    model: OPGCaptioner, prefix: Prefix, result: DecodeResult, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probabilities M x T of the captions of ``result`` (GPT-2 ids, the same number of captions for each image of
    ``prefix``, image-major) from one teacher-forced pass, with gradients when grad mode is on; 0 after
    each caption. With dropout off they equal the ``token_logprobs`` of the decode that drew the captions
    (sampling at ``temperature``; 1 for greedy), so captions can be drawn without gradients (on a static
    cache, replayed as a CUDA graph) and scored in one pass."""
    prefix = prefix.repeat_interleave(result.tokens.shape[0] // prefix.embeds.shape[0])
    positions = torch.arange(result.tokens.shape[1], device=result.tokens.device)
    caption = positions[None] < result.lengths[:, None]
    hidden = model.token_hidden(prefix, result.tokens)  # M x T x D; state t predicts token t
    logits = model.output_logits(hidden[caption]).float() / temperature
    targets = model.output_index(result.tokens[caption])
    chosen = torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    return chosen.new_zeros(caption.shape).masked_scatter(caption, chosen)


def captions_from_tokens(tokenizer, result: DecodeResult) -> list[str]:
    """Caption texts of a decode result, without their stop token, stripped."""
    ends = result.lengths - result.stopped.long()
    rows = [row[:end] for row, end in zip(result.tokens.tolist(), ends.tolist(), strict=True)]
    return [text.strip() for text in tokenizer.batch_decode(rows)]


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run the block in eval mode (no dropout), then restore the model's training mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def dropout_off(model: torch.nn.Module) -> Iterator[None]:
    """Run the block with every dropout and drop-path rate at 0 (training mode otherwise kept), then
    restore them. Drop-path layers (timm's ``DropPath``) keep their rate in ``drop_prob``."""
    rated = rated_modules(model)
    with rates_set(rated, [0.0] * len(rated)):
        yield


def _decode_rows(
    lm: CachedPrefixLM,
    logits: torch.Tensor,
    options: DecodeOptions,
    generator: torch.Generator | None,
    uniforms: torch.Tensor | None = None,
) -> DecodeResult:
    """Greedy decoding or sampling; every row is independent and finished rows leave the batch."""
    rows = logits.shape[0]
    stop_ids = logits.new_tensor(options.stop_ids, dtype=torch.long)
    tokens = logits.new_full((rows, options.max_len), options.pad_id, dtype=torch.long)
    lengths = logits.new_full((rows,), options.max_len, dtype=torch.long)
    stopped = logits.new_zeros(rows, dtype=torch.bool)
    active = torch.arange(rows, device=logits.device)
    step_logprobs = []
    for t in range(options.max_len):
        if options.method == "sample":
            logits = logits / options.temperature
        logprobs = torch.log_softmax(logits, dim=-1)
        allowed = _apply_bans(logprobs.detach(), tokens[active, :t], t, stop_ids, options)
        if options.method == "sample":
            draw = None if uniforms is None else uniforms[active, t].unsqueeze(1)
            chosen = _sample(allowed, options.top_k, options.top_p, generator, draw)
        else:
            chosen = allowed.argmax(dim=-1)
        tokens[active, t] = chosen
        chosen_logprobs = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
        step_logprobs.append(chosen_logprobs.new_zeros(rows).index_put((active,), chosen_logprobs))
        ends = torch.isin(chosen, stop_ids)
        if ends.any():
            lengths[active[ends]] = t + 1
            stopped[active[ends]] = True
            running = ~ends
            active, chosen = active[running], chosen[running]
            if active.numel() == 0:
                break
            lm.select(running.nonzero().squeeze(1))
        if t + 1 < options.max_len:
            logits = lm.step(chosen)
    token_logprobs = torch.stack(step_logprobs, dim=1)
    return _finish(tokens, lengths, stopped, token_logprobs, options.length_penalty)


@dataclass
class _PerImage:
    """Tensors with one row per image and one column per slot (N x S, or N x S x L for sequences)."""

    def take(self, index: torch.Tensor) -> Self:
        """Slots ``index`` (N x K) of each image."""
        return replace(self, **{f.name: _gather_slots(getattr(self, f.name), index) for f in fields(self)})

    def rows(self, keep: torch.Tensor) -> Self:
        """The images ``keep`` (bool N, or indices)."""
        return replace(self, **{f.name: getattr(self, f.name)[keep] for f in fields(self)})


@dataclass
class _Beams(_PerImage):
    """Running beams after t steps: summed log-probabilities ``scores`` N x K, ``tokens`` and their
    ``logprobs`` N x K x t."""

    scores: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor

    @classmethod
    def start(cls, images: int, beams: int, like: torch.Tensor) -> _Beams:
        # Only the first of the identical initial beams may expand, or all beams would pick the same tokens.
        scores = like.new_full((images, beams), -math.inf)
        scores[:, 0] = 0.0
        tokens = like.new_zeros(images, beams, 0, dtype=torch.long)
        return cls(scores, tokens, like.new_zeros(images, beams, 0))


@dataclass
class _Finished(_PerImage):
    """Finished hypotheses: length-normalised ``scores`` N x S (-inf in empty slots), ``tokens`` and
    ``logprobs`` N x S x max_len (padded), ``lengths``, ``stopped`` (ends in a stop token) and ``filled``
    (the slot holds a hypothesis), N x S."""

    scores: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor
    lengths: torch.Tensor
    stopped: torch.Tensor
    filled: torch.Tensor

    @classmethod
    def empty(cls, images: int, slots: int, max_len: int, pad_id: int, like: torch.Tensor) -> _Finished:
        shape = (images, slots)
        return cls(
            scores=like.new_full(shape, -math.inf),
            tokens=like.new_full((*shape, max_len), pad_id, dtype=torch.long),
            logprobs=like.new_zeros(*shape, max_len),
            lengths=like.new_ones(shape, dtype=torch.long),
            stopped=like.new_zeros(shape, dtype=torch.bool),
            filled=like.new_zeros(shape, dtype=torch.bool),
        )

    @classmethod
    def of(cls, candidates: _Beams, stopped: torch.Tensor, ready: torch.Tensor, options: DecodeOptions) -> _Finished:
        """The ``ready`` candidates (N x C) as finished hypotheses; the other slots stay empty."""
        length = candidates.tokens.shape[2]
        return cls(
            scores=(candidates.scores / length**options.length_penalty).masked_fill(~ready, -math.inf),
            tokens=_pad(candidates.tokens, options.max_len, options.pad_id),
            logprobs=_pad(candidates.logprobs, options.max_len, 0.0),
            lengths=torch.full_like(stopped, length, dtype=torch.long),
            stopped=stopped,
            filled=ready,
        )

    def merge(self, new: _Finished, slots: int) -> _Finished:
        """The best ``slots`` hypotheses of each image among these and ``new``."""
        merged = _Finished(*(torch.cat([getattr(self, f.name), getattr(new, f.name)], dim=1) for f in fields(self)))
        return merged.take(merged.scores.topk(slots, dim=1).indices)

    def cannot_improve(self, running: _Beams, penalty: float) -> torch.Tensor:
        """N bools: every slot is filled and the best running beam, normalised at its current length,
        cannot beat the worst of them."""
        best_running = running.scores[:, 0] / running.tokens.shape[2] ** penalty
        return self.filled.all(dim=1) & (best_running <= self.scores.min(dim=1).values)

    def put(self, images: torch.Tensor, source: _Finished) -> None:
        """Store the best slots of ``source`` (one row per entry of ``images``) as images ``images``."""
        slots = self.scores.shape[1]
        for f in fields(self):
            getattr(self, f.name)[images] = getattr(source, f.name)[:, :slots]


def _decode_static(
    prefilled: CachedPrefixLM,
    logits: torch.Tensor,
    options: DecodeOptions,
    fast: FastDecode,
    generator: torch.Generator | None,
    uniforms: torch.Tensor | None,
) -> DecodeResult:
    """:func:`_decode_rows` on a static cache: every row runs every step (finished rows produce padding
    at log-probability 0), and whether all rows have finished is read every ``fast.check_every`` steps."""
    rows, device, max_len = logits.shape[0], logits.device, options.max_len
    lm = StaticPrefixLM.from_prefilled(*prefilled.static_parts(), max_len - 1)
    step = lm.step
    # A graph replays fixed kernels: no autograd graph to build, no dropout draws (kept simple).
    if fast.cuda_graphs and device.type == "cuda" and not (torch.is_grad_enabled() or dropout_active(lm.transformer)):
        step = fast.graphs.step_fn(lm)
    slots = torch.arange(lm.keep.shape[1] - (max_len - 1), lm.keep.shape[1], device=device)
    stop_ids = logits.new_tensor(options.stop_ids, dtype=torch.long)
    tokens = logits.new_full((rows, max_len), options.pad_id, dtype=torch.long)
    lengths = logits.new_full((rows,), max_len, dtype=torch.long)
    done = logits.new_zeros(rows, dtype=torch.bool)
    step_logprobs = []
    for t in range(max_len):
        if options.method == "sample":
            logits = logits / options.temperature
        logprobs = torch.log_softmax(logits, dim=-1)
        allowed = _apply_bans(logprobs.detach(), tokens[:, :t], t, stop_ids, options)
        if options.method == "sample":
            draw = None if uniforms is None else uniforms[:, t : t + 1]
            chosen = _sample(allowed, options.top_k, options.top_p, generator, draw)
        else:
            chosen = allowed.argmax(dim=-1)
        chosen = chosen.masked_fill(done, options.pad_id)
        tokens[:, t] = chosen
        step_logprobs.append(logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).masked_fill(done, 0.0))
        ends = torch.isin(chosen, stop_ids) & ~done
        lengths = lengths.masked_fill(ends, t + 1)
        done = done | ends
        if t + 1 == max_len or ((t + 1) % fast.check_every == 0 and bool(done.all())):
            break
        logits = step(chosen, slots[t : t + 1])
    token_logprobs = torch.stack(step_logprobs, dim=1)
    return _finish(tokens, lengths, done, token_logprobs, options.length_penalty)


def _beam_search(lm: CachedPrefixLM, logits: torch.Tensor, options: DecodeOptions) -> DecodeResult:
    """Batched beam search (semantics in the module docstring); images that are done leave the batch."""
    beams, device = options.beams, logits.device
    images, vocab = logits.shape[0] // beams, logits.shape[1]
    stop_ids = logits.new_tensor(options.stop_ids, dtype=torch.long)
    # Enough candidates that `beams` of them still run on when the best ones all end in a stop token.
    num_candidates = min((1 + max(1, len(options.stop_ids))) * beams, beams * vocab)
    top_ranks = torch.arange(num_candidates, device=device) < beams
    image_ids = torch.arange(images, device=device)
    running = _Beams.start(images, beams, logits)
    finished = _Finished.empty(images, beams, options.max_len, options.pad_id, logits)
    best = _Finished.empty(images, options.num_return, options.max_len, options.pad_id, logits)
    for t in range(options.max_len):
        candidates, parent, token = _expand(running, logits, num_candidates, stop_ids, options)
        stopped = torch.isin(token, stop_ids)
        ends = stopped | (t + 1 == options.max_len)
        finished = finished.merge(_Finished.of(candidates, stopped, ends & top_ranks, options), beams)
        # The best candidates that do not end run on.
        running_scores = candidates.scores.masked_fill(ends, -math.inf)
        pick = running_scores.topk(beams, dim=1).indices
        running, parent = replace(candidates, scores=running_scores).take(pick), parent.gather(1, pick)
        done = finished.cannot_improve(running, options.length_penalty) | (t + 1 == options.max_len)
        best.put(image_ids[done], finished.rows(done))
        if done.all():
            break
        rows = torch.arange(image_ids.numel(), device=device).unsqueeze(1) * beams + parent
        lm.select(rows[~done].view(-1))
        image_ids, running, finished = image_ids[~done], running.rows(~done), finished.rows(~done)
        logits = lm.step(running.tokens[:, :, -1].reshape(-1))
    return _finish(best.tokens.flatten(0, 1), best.lengths.flatten(0, 1), best.stopped.flatten(0, 1),
                   best.logprobs.flatten(0, 1), options.length_penalty)  # fmt: skip


def _expand(
    running: _Beams, logits: torch.Tensor, count: int, stop_ids: torch.Tensor, options: DecodeOptions
) -> tuple[_Beams, torch.Tensor, torch.Tensor]:
    """The ``count`` best one-token continuations of each image's running beams (``logits`` (N*K) x V),
    best first: as beams N x count x (t + 1), with their parent beam and new token, N x count each."""
    history = running.tokens.flatten(0, 1)
    scores, parent, token, token_logprobs = _continuations(logits, running.scores, history, count, stop_ids, options)
    previous = running.take(parent)
    tokens = torch.cat([previous.tokens, token.unsqueeze(2)], dim=2)
    logprobs = torch.cat([previous.logprobs, token_logprobs.unsqueeze(2)], dim=2)
    return _Beams(scores, tokens, logprobs), parent, token


def _continuations(
    logits: torch.Tensor,
    run_scores: torch.Tensor,
    history: torch.Tensor,
    count: int,
    stop_ids: torch.Tensor,
    options: DecodeOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``count`` best continuations per image of its running beams.

    ``logits`` (N*K) x V; ``run_scores`` N x K; ``history`` (N*K) x t. Returns, each N x
    ``count`` and best first: summed log-probabilities, parent beam, token, the token's log-probability.
    The best continuations across beams are among each beam's own best, so the beam scores are added to
    those few candidates only, not to the whole (N*K) x V table.
    """
    images = run_scores.shape[0]
    logprobs = torch.log_softmax(logits, dim=-1)
    allowed = _apply_bans(logprobs, history, history.shape[1], stop_ids, options, inplace=True)
    top_logprobs, top_tokens = allowed.topk(min(count, logits.shape[1]), dim=1)
    token_logprobs = top_logprobs.view(images, -1)
    totals = token_logprobs + run_scores.repeat_interleave(top_tokens.shape[1], dim=1)
    scores, pick = totals.topk(count, dim=1)
    parent = torch.div(pick, top_tokens.shape[1], rounding_mode="floor")
    return scores, parent, top_tokens.view(images, -1).gather(1, pick), token_logprobs.gather(1, pick)


def _gather_slots(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values`` (N x S or N x S x L) at slots ``index`` (N x K) of each row."""
    if values.dim() == 3:
        index = index.unsqueeze(2).expand(-1, -1, values.shape[2])
    return values.gather(1, index)


def _pad(values: torch.Tensor, length: int, fill: float) -> torch.Tensor:
    """Pad N x S x L' on the right to N x S x ``length``."""
    return torch.nn.functional.pad(values, (0, length - values.shape[2]), value=fill)


def _apply_bans(
    scores: torch.Tensor,
    history: torch.Tensor,
    step: int,
    stop_ids: torch.Tensor,
    options: DecodeOptions,
    inplace: bool = False,
) -> torch.Tensor:
    """-inf for tokens that may not come next: stop tokens before ``min_len`` and tokens that would repeat
    an n-gram of ``history`` (R x step). ``scores`` (R x V) are changed only if ``inplace``."""
    allowed = scores
    if step < options.min_len and stop_ids.numel():
        allowed = allowed.index_fill_(1, stop_ids, -math.inf) if inplace else allowed.index_fill(1, stop_ids, -math.inf)
    n = options.no_repeat_ngram
    if n and step >= n:
        grams = history.unfold(1, n, 1)  # R x (step - n + 1) x n
        same_start = (grams[:, :, : n - 1] == history[:, step - n + 1 :].unsqueeze(1)).all(dim=2)
        rows, where = same_start.nonzero(as_tuple=True)
        banned = (rows, grams[rows, where, n - 1])
        fill = allowed.new_tensor(-math.inf)
        allowed = allowed.index_put_(banned, fill) if inplace else allowed.index_put(banned, fill)
    return allowed


def _sample(
    logits: torch.Tensor,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row (R x V logits) by inverse-CDF sampling after top-k / top-p truncation, with the
    uniform draws ``uniform`` (R x 1) or fresh ones from ``generator``.

    ``searchsorted`` over the cumulative probabilities draws from the same distribution as
    ``torch.multinomial`` at a fraction of its cost over a 50k vocabulary; ``right=True`` never lands on a
    zero-probability token, nor does a draw that rounds up to the total (it takes the last token with mass).
    """
    if 0 < top_k < logits.shape[1]:
        kth = logits.topk(top_k, dim=1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        ordered, order = logits.sort(dim=1, descending=True)
        probs = torch.softmax(ordered, dim=1)
        mass_before = probs.cumsum(dim=1) - probs
        ordered = ordered.masked_fill(mass_before >= top_p, -math.inf)
        logits = logits.scatter(1, order, ordered)  # back to vocabulary order (every entry is written)
    cdf = torch.softmax(logits, dim=1).cumsum(dim=1)
    if uniform is None:
        uniform = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)
    total = cdf[:, -1:].contiguous()  # R x 1
    chosen = torch.searchsorted(cdf, uniform.to(cdf.dtype) * total, right=True)
    return torch.minimum(chosen, torch.searchsorted(cdf, total)).squeeze(1)


def _finish(
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    stopped: torch.Tensor,
    token_logprobs: torch.Tensor,
    length_penalty: float,
) -> DecodeResult:
    """Trim to the longest caption and score each: summed log-probability / length ** length_penalty."""
    width = int(lengths.max())
    token_logprobs = token_logprobs[:, :width]
    scores = token_logprobs.detach().sum(dim=1) / lengths.to(token_logprobs.dtype) ** length_penalty
    return DecodeResult(tokens[:, :width], lengths, stopped, token_logprobs, scores)
