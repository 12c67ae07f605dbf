"""Per-batch losses: cross-entropy and self-critical sequence training."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from models.captioner import OPGCaptioner, Prefix
from models.decoding import DecodeOptions, captions_from_tokens, decode, dropout_off, eval_mode
from models.losses import IGNORE_INDEX, scst_loss
from utils.cider import CiderD
from utils.config import DecodeConfig, ScstConfig, TrainConfig
from utils.distributed import all_reduce_mean


class XEStep:
    """Teacher-forced cross-entropy (+ the weighted N-pair loss) of one batch."""

    def __init__(self, forward_model: nn.Module, device: torch.device, cfg: TrainConfig) -> None:
        self.forward_model = forward_model
        self.device = device
        self.aux_weight = cfg.aux_weight if cfg.use_aux_loss else 0.0
        self.label_smoothing = cfg.label_smoothing

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        labels = batch["labels"].to(self.device, non_blocking=True)
        out = self.forward_model(
            batch["images"].to(self.device, non_blocking=True),
            batch["input_ids"].to(self.device, non_blocking=True),
            labels,
            aux_weight=self.aux_weight,
            label_smoothing=self.label_smoothing,
        )
        if dist.is_initialized():
            # Weight each process's token mean by its share of the tokens, so that the averaged gradient
            # is that of the mean over all tokens of the combined batch, as in one process.
            tokens = (labels != IGNORE_INDEX).sum().float()
            out["loss"] = out["loss"] + out["xe"] * (tokens / all_reduce_mean(tokens) - 1.0)
        return out


class ScstStep:
    """Sample captions, reward them with CIDEr-D against the image's references, and weight their
    log-probabilities by reward minus baseline (the greedy caption's reward, or the mean of the other
    samples)."""

    def __init__(
        self,
        model: OPGCaptioner,
        tokenizer: Any,
        cider: CiderD,
        references: Sequence[Sequence[str]],
        opts: ScstConfig,
        decode_cfg: DecodeConfig,
        device: torch.device,
    ) -> None:
        if opts.baseline == "mean" and opts.num_samples < 2:
            raise ValueError("the mean-of-others baseline needs scst_opts.num_samples >= 2")
        self.model, self.tokenizer, self.cider, self.references = model, tokenizer, cider, references
        self.opts, self.device = opts, device
        self.sample_options = DecodeOptions(
            method="sample",
            num_samples=opts.num_samples,
            max_len=opts.sample_max_len,
            min_len=decode_cfg.min_len,
            temperature=opts.temperature,
        )
        self.greedy_options = DecodeOptions(method="greedy", max_len=opts.sample_max_len, min_len=decode_cfg.min_len)

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        n = self.opts.num_samples
        with contextlib.nullcontext() if self.opts.dropout else dropout_off(self.model):
            prefix = self.model.encode(batch["images"].to(self.device, non_blocking=True))
            samples = decode(self.model, prefix, self.sample_options, with_logprobs=True)
        refs = [self.references[i] for i in batch["indices"]]
        sample_refs = [r for r in refs for _ in range(n)]
        rewards = self.cider.score_candidates(captions_from_tokens(self.tokenizer, samples), sample_refs)
        baselines = self._baselines(prefix, refs, rewards.reshape(-1, n)).reshape(-1)
        token_mask = torch.arange(samples.tokens.shape[1], device=self.device)[None] < samples.lengths[:, None]
        logprobs = samples.token_logprobs
        rewards_t = torch.as_tensor(rewards, dtype=torch.float32, device=self.device)
        baselines_t = torch.as_tensor(baselines, dtype=torch.float32, device=self.device)
        loss = scst_loss(logprobs, token_mask, rewards_t, baselines_t, self.opts.length_norm)
        entropy = -(logprobs.detach() * token_mask).sum() / token_mask.sum().clamp(min=1)
        return {
            "loss": loss,
            "reward": rewards_t.mean(),
            "baseline": baselines_t.mean(),
            "sample_len": samples.lengths.float().mean(),
            "entropy": entropy,
        }

    def _baselines(self, prefix: Prefix, refs: list[Sequence[str]], rewards: np.ndarray) -> np.ndarray:
        n = self.opts.num_samples
        if self.opts.baseline == "mean":
            return (rewards.sum(axis=1, keepdims=True) - rewards) / (n - 1)
        # The baseline is the caption the model would give at test time: greedy, without dropout.
        with eval_mode(self.model), torch.no_grad():
            greedy = decode(self.model, Prefix(prefix.embeds.detach(), prefix.keep), self.greedy_options)
        greedy_rewards = self.cider.score_candidates(captions_from_tokens(self.tokenizer, greedy), refs)
        return np.repeat(greedy_rewards[:, None], n, axis=1)
