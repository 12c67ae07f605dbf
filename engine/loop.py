"""The optimisation loop shared by cross-entropy and SCST training."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from utils.config import TrainConfig
from utils.distributed import DistInfo, all_reduce_mean, average_gradients
from utils.logs import MetricsLog
from utils.precision import autocast

logger = logging.getLogger(__name__)

StepFn = Callable[[dict[str, Any]], dict[str, torch.Tensor]]


@dataclass
class TrainState:
    """Counters saved in every checkpoint; ``epoch_step`` batches of ``epoch`` are done."""

    epoch: int = 0
    epoch_step: int = 0
    global_step: int = 0
    best_score: float = -math.inf
    skipped_images: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Trainer:
    """Everything one optimisation step touches."""

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: str
    dist: DistInfo
    cfg: TrainConfig
    metrics: MetricsLog
    state: TrainState = field(default_factory=TrainState)
    sync_gradients: bool = False  # average gradients here when the step bypasses the DDP wrapper
    steps_this_run: int = 0


def run_epoch(
    trainer: Trainer,
    batches: Iterable[dict[str, Any]],
    steps_in_epoch: int,
    step_fn: StepFn,
    save_fn: Callable[[], None],
    desc: str,
) -> bool:
    """Run the rest of the current epoch. Returns False when stopped early by ``stop_after_steps``
    (a checkpoint is then written), True when the epoch is complete."""
    state, cfg = trainer.state, trainer.cfg
    bar = tqdm(total=steps_in_epoch, initial=state.epoch_step, desc=desc, disable=not trainer.dist.is_main)
    started, images_seen = time.perf_counter(), 0
    for batch in batches:
        out = _step(trainer, batch, step_fn)
        state.skipped_images += batch["skipped"]
        if out is None:
            continue
        state.epoch_step += 1
        state.global_step += 1
        trainer.steps_this_run += 1
        images_seen += out.pop("batch_images")
        rate = images_seen * trainer.dist.world_size / max(time.perf_counter() - started, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{out['loss']:.3f}", img_s=f"{rate:.1f}")
        if state.global_step % cfg.log_every == 0 or state.epoch_step == steps_in_epoch:
            lr = trainer.optimizer.param_groups[0]["lr"]
            trainer.metrics.write("train", epoch=state.epoch, step=state.global_step, lr=lr, img_s=rate, **out)
        if cfg.save_every_steps and state.global_step % cfg.save_every_steps == 0:
            save_fn()
        if cfg.stop_after_steps and trainer.steps_this_run >= cfg.stop_after_steps:
            bar.close()
            save_fn()
            logger.info("stopped after %d steps as asked (train.stop_after_steps)", trainer.steps_this_run)
            return False
    bar.close()
    return True


def _step(trainer: Trainer, batch: dict[str, Any], step_fn: StepFn) -> dict[str, float] | None:
    has_data = "images" in batch
    if has_data:
        with autocast(trainer.precision, trainer.dist.device):
            out = step_fn(batch)
        loss = out["loss"]
        local = torch.stack([loss.detach().float(), torch.ones((), device=loss.device)])
    else:
        local = torch.zeros(2, device=trainer.dist.device)
    # One collective per step: the loss for the finiteness check and whether every process has data.
    global_loss, all_have = all_reduce_mean(local).tolist()
    if all_have < 1.0:
        logger.warning("a batch had no readable image on some process: step skipped everywhere")
        trainer.optimizer.zero_grad(set_to_none=True)
        return None
    if not math.isfinite(global_loss):
        raise FloatingPointError(
            f"non-finite loss ({global_loss}) at epoch {trainer.state.epoch}, step {trainer.state.global_step}: "
            "stopping; the last checkpoint is intact (try a lower learning rate or train.precision=fp32)"
        )
    trainer.scaler.scale(loss).backward()
    if trainer.sync_gradients:
        average_gradients(trainer.params)
    trainer.scaler.unscale_(trainer.optimizer)
    if trainer.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(trainer.params, trainer.cfg.grad_clip)
    trainer.scaler.step(trainer.optimizer)
    trainer.scaler.update()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    values = {k: float(v.detach()) for k, v in out.items() if k != "loss" and v.numel() == 1}
    values.update(loss=global_loss, batch_images=len(batch["images"]))
    return values
