"""Per-batch losses: cross-entropy and self-critical sequence training."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from data.datasets import batch_inputs
from data.text import IGNORE_INDEX
from engine.config import ScstConfig, TrainConfig, check_scst_samples
from metrics.cider import CiderD
from models.captioner import EmbeddingBank, OPGCaptioner
from models.captioning import caption_batches
from models.decoding import (
    DecodeOptions,
    DecodeResult,
    captions_from_tokens,
    decode,
    dropout_off,
    teacher_forced_logprobs,
)
from models.losses import scst_loss
from models.static_decode import FastDecode
from utils.distributed import all_reduce_mean

logger = logging.getLogger(__name__)


@dataclass
class XEPlan:
    """What one micro-batch's XE loss needs to know of its whole step (all micro-batches, all processes).

    ``xe_weight``: its token count over the mean, over processes, of a process's step token count, so that
    the summed and process-averaged gradient is that of the mean over all of the step's tokens, as one batch
    in one process. ``bank``: the N-pair loss's embeddings of the step's ``micro_batches`` on this process
    (None for a step of one micro-batch, or without the N-pair loss). ``features``: the frozen encoder's
    output for the micro-batch, kept from computing the bank so that the images are not encoded twice."""

    xe_weight: torch.Tensor
    micro_batches: int = 1
    bank: EmbeddingBank | None = None
    features: torch.Tensor | None = None


def compile_forward(module: nn.Module, backend: str | Callable = "inductor") -> nn.Module:
    """``torch.compile`` of a training forward with dynamic shapes from the first call: one graph serves every
    batch size (a smaller last batch, accumulation's micro-batches) and caption length. The real tokens the
    cross-entropy reads are a data-dependent selection (``nonzero``), captured in the graph by
    :func:`compiled_call` rather than splitting it."""
    return torch.compile(module, dynamic=True, backend=backend)


def compiled_call() -> contextlib.AbstractContextManager:
    """Around every call of a :func:`compile_forward` module (dynamo reads its config when it traces)."""
    return torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True)


class XEStep:
    """Teacher-forced cross-entropy (+ the weighted N-pair loss) of one micro-batch of an optimizer step."""

    def __init__(
        self, forward_model: nn.Module, device: torch.device, cfg: TrainConfig, compiled: nn.Module | None = None
    ) -> None:
        """``forward_model``: the captioner or its DDP wrapper; ``compiled``: its :func:`compile_forward`,
        which then runs the forward passes."""
        self.ddp = forward_model if isinstance(forward_model, DistributedDataParallel) else None
        self.model = forward_model.module if self.ddp is not None else forward_model
        self.forward_model = compiled if compiled is not None else forward_model
        self.compiled = compiled is not None
        self.device = device
        self.aux_weight = cfg.aux_weight if cfg.use_aux_loss else 0.0
        self.aux_text_tokens = cfg.aux_text_tokens
        self.label_smoothing = cfg.label_smoothing

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Around a micro-batch that is not the step's last: DDP keeps its gradients local until the last."""
        return contextlib.nullcontext() if self.ddp is None else self.ddp.no_sync()

    def plan(self, batches: Sequence[dict[str, Any]]) -> list[XEPlan]:
        """One plan per micro-batch of a step (one collective: the step's token count over processes)."""
        tokens = torch.stack([(b["labels"] != IGNORE_INDEX).sum() for b in batches]).float().to(self.device)
        weights = tokens / all_reduce_mean(tokens.sum())
        if len(batches) == 1 or self.aux_weight == 0:
            return [XEPlan(weight) for weight in weights]
        return self._banked_plans(batches, weights)

    def _banked_plans(self, batches: Sequence[dict[str, Any]], weights: torch.Tensor) -> list[XEPlan]:
        """Plans holding the N-pair embeddings of every micro-batch, computed without gradients (cheap next to
        the step: the prefix, and the caption tokens' input embeddings)."""
        model, texts, images, features = self.model, [], [], []
        frozen = not any(p.requires_grad for p in model.encoder.parameters())
        with torch.no_grad():
            for batch in batches:
                inputs = batch_inputs(batch, self.device)
                visual = inputs.get("features")
                if visual is None and frozen:
                    visual = model.encoder(inputs["images"])
                prefix = model.encode(**({"features": visual} if visual is not None else inputs))
                text, image = model.aux_embeddings(prefix, *self._text(batch), self.aux_text_tokens)
                texts.append(text)
                images.append(image)
                features.append(visual)
        starts = np.cumsum([0] + [t.shape[0] for t in texts[:-1]]).tolist()
        text, image = torch.cat(texts), torch.cat(images)
        return [
            XEPlan(weight, len(batches), EmbeddingBank(text, image, start), visual)
            for weight, start, visual in zip(weights, starts, features, strict=True)
        ]

    def __call__(self, batch: dict[str, Any], plan: XEPlan | None = None) -> dict[str, torch.Tensor]:
        """The micro-batch's losses; ``loss`` is its share of the step's objective (what to back-propagate)."""
        plan = plan or self.plan([batch])[0]
        inputs = batch_inputs(batch, self.device)
        features = plan.features if plan.features is not None else inputs.get("features")
        with compiled_call() if self.compiled else contextlib.nullcontext():
            out = self.forward_model(
                None if features is not None else inputs.get("images"),
                *self._text(batch),
                aux_weight=self.aux_weight,
                label_smoothing=self.label_smoothing,
                aux_text_tokens=self.aux_text_tokens,
                features=features,
                aux_bank=plan.bank,
            )
        out["loss"] = out["loss"] + out["xe"] * (plan.xe_weight - 1.0)
        if plan.bank is not None:
            # Every micro-batch computes the whole step's N-pair loss, with gradients for its own rows only:
            # the gradients add up to the step's, and the values, counted 1/N each, add up to its loss.
            out["loss"] = out["loss"] - self.aux_weight * out["aux"].detach() * (1.0 - 1.0 / plan.micro_batches)
        return out

    def _text(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's caption token ids and labels, on the step's device."""
        return batch["input_ids"].to(self.device, non_blocking=True), batch["labels"].to(self.device, non_blocking=True)


def fast_decode_mode(name: str, device: torch.device) -> str:
    """``scst_opts.fast_decode`` for ``device``: ``auto`` is the mode measured fastest there (docs/gpu.md),
    the dynamic cache ("off") on the CPU, where the static cache and teacher-forced scoring cost more
    arithmetic than they save, and the static cache on CUDA; the others as named."""
    if name != "auto":
        return name
    return "static" if device.type == "cuda" else "off"


class ScstStep:
    """Sample captions, reward them with CIDEr-D against the image's references, and weight their
    log-probabilities by reward minus baseline (the greedy caption's reward, or the mean of the other
    samples).

    The random draws of an image's samples depend only on ``seed``, the epoch (:meth:`set_epoch`) and the
    image's index in the training set, so a step samples the same captions however the batch is split
    over processes, and a resumed run samples what the uninterrupted one would have.
    """

    def __init__(
        self,
        model: OPGCaptioner,
        tokenizer: Any,
        cider: CiderD,
        references: Sequence[Sequence[str]],
        opts: ScstConfig,
        device: torch.device,
        seed: int = 0,
    ) -> None:
        check_scst_samples(opts)
        self.model, self.tokenizer, self.cider, self.references = model, tokenizer, cider, references
        self.opts, self.device, self.seed, self.epoch = opts, device, seed, 0
        self.sample_options = DecodeOptions(
            method="sample",
            num_samples=opts.num_samples,
            max_len=opts.sample_max_len,
            min_len=opts.sample_min_len,
            temperature=opts.temperature,
        )
        self.greedy_options = DecodeOptions(method="greedy", max_len=opts.sample_max_len, min_len=opts.sample_min_len)
        mode = fast_decode_mode(opts.fast_decode, device)
        logger.info("SCST decoding: fast_decode %s (%s) on %s", mode, opts.fast_decode, device)
        # One per step object: it keeps the recorded CUDA graphs.
        self.fast = None if mode == "off" else FastDecode(cuda_graphs=mode == "graphs")
        # On the static cache without dropout: sample without gradients, then one teacher-forced pass (False:
        # the decode keeps the gradients, as with dropout on, the faster on the CPU; benchmarks compare them).
        self.teacher_forced = self.fast is not None

    def set_epoch(self, epoch: int) -> None:
        """Seed the coming steps' samples with ``epoch`` (each image is visited once per epoch)."""
        self.epoch = epoch

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Nothing to hold back: SCST averages gradients by hand, once per optimizer step."""
        return contextlib.nullcontext()

    def plan(self, batches: Sequence[dict[str, Any]]) -> list[float]:
        """Each micro-batch's share of the step's captions: the step's loss is the mean over all of them."""
        images = [len(b["indices"]) for b in batches]
        return [n / sum(images) for n in images]

    def __call__(self, batch: dict[str, Any], share: float = 1.0) -> dict[str, torch.Tensor]:
        """The batch's SCST loss times ``share`` (its part of an accumulated step), and what it logs."""
        n = self.opts.num_samples
        samples, logprobs = self._sample(batch)
        # Streamed from shards, a batch carries its references; otherwise they are the data set's
        refs = batch["references"] if "references" in batch else [self.references[i] for i in batch["indices"]]
        sample_refs = [r for r in refs for _ in range(n)]
        rewards = self.cider.score_candidates(captions_from_tokens(self.tokenizer, samples), sample_refs)
        baselines = self._baselines(batch, refs, rewards.reshape(-1, n))
        token_mask = torch.arange(samples.tokens.shape[1], device=self.device)[None] < samples.lengths[:, None]
        rewards_t, baselines_t = logprobs.new_tensor(rewards), logprobs.new_tensor(baselines)
        loss = scst_loss(logprobs, token_mask, rewards_t, baselines_t, self.opts.length_norm) * share
        entropy = -(logprobs.detach() * token_mask).sum() / token_mask.sum()  # every caption has a token
        return {
            "loss": loss,
            "reward": rewards_t.mean(),
            "baseline": baselines_t.mean(),
            "sample_len": samples.lengths.float().mean(),
            "entropy": entropy,
        }

    def _sample(self, batch: dict[str, Any]) -> tuple[DecodeResult, torch.Tensor]:
        """The batch's samples and their log-probabilities (M x T, with gradients).

        With dropout off they are drawn without gradients (on the static cache, replayed as a CUDA graph on
        CUDA when ``fast_decode`` says so) and scored in one teacher-forced pass: the same tokens,
        log-probabilities and gradients as decoding with gradients. With dropout on, a second pass would
        draw other dropout masks than the sampling did, so the decode itself keeps the gradients."""
        inputs, uniforms = batch_inputs(batch, self.device), self._uniforms(batch["indices"])
        if self.opts.dropout or not self.teacher_forced:
            with contextlib.nullcontext() if self.opts.dropout else dropout_off(self.model):
                prefix = self.model.encode(**inputs)
                samples = decode(self.model, prefix, self.sample_options, True, uniforms=uniforms, fast=self.fast)
            return samples, samples.token_logprobs
        with dropout_off(self.model):
            prefix = self.model.encode(**inputs)
            with torch.no_grad():
                samples = decode(self.model, prefix, self.sample_options, uniforms=uniforms, fast=self.fast)
            return samples, teacher_forced_logprobs(self.model, prefix, samples, self.opts.temperature)

    def _uniforms(self, indices: Sequence[int]) -> torch.Tensor:
        """(len(indices) * num_samples) x sample_max_len uniform draws, image-major."""
        shape = (self.opts.num_samples, self.opts.sample_max_len)
        draws = []
        for index in indices:
            seed = ((self.seed * 1_000_003 + self.epoch) * 1_000_003 + int(index)) % 2**63
            draws.append(torch.rand(shape, generator=torch.Generator().manual_seed(seed)))
        return torch.cat(draws).to(self.device)

    def _baselines(self, batch: dict[str, Any], refs: list[Sequence[str]], rewards: np.ndarray) -> np.ndarray:
        """Each sample's baseline, image-major as the samples, from the rewards (images x samples)."""
        n = self.opts.num_samples
        if self.opts.baseline == "mean":
            return ((rewards.sum(axis=1, keepdims=True) - rewards) / (n - 1)).reshape(-1)
        # The baseline is the caption the model would give at test time: greedy and in eval mode (no dropout,
        # no drop path in the encoder), from the image encoded again, under the training step's autocast.
        [(_, greedy)] = caption_batches(self.model, [batch], self.tokenizer, self.greedy_options, fast=self.fast)
        greedy_rewards = self.cider.score_candidates([captions[0].text for captions in greedy], refs)
        return np.repeat(greedy_rewards, n)
