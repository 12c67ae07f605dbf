"""The optimisation loop shared by cross-entropy and SCST training."""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from data.datasets import batch_inputs
from engine.config import TrainConfig
from engine.preemption import StopRequest
from utils.distributed import DistInfo, all_reduce_mean, average_gradients
from utils.logs import MetricsLog
from utils.precision import autocast
from utils.progress import Progress, progress

logger = logging.getLogger(__name__)

class StepFn(Protocol):
    """A training step's losses, one micro-batch at a time (``engine.steps``): ``plan`` looks at all the
    micro-batches of an optimizer step first (one plan each); ``__call__`` gives one micro-batch's outputs,
    whose ``loss`` is its share of the step's objective; ``no_sync`` holds back DDP's gradient sync."""

    def plan(self, batches: Sequence[dict[str, Any]]) -> Sequence[Any]: ...

    def no_sync(self) -> contextlib.AbstractContextManager: ...

    def __call__(self, batch: dict[str, Any], plan: Any) -> dict[str, torch.Tensor]: ...


@dataclass
class TrainState:
    """Counters saved in every checkpoint; ``epoch_step`` batches of ``epoch`` are done."""

    epoch: int = 0
    epoch_step: int = 0
    global_step: int = 0
    best_score: float = -math.inf
    skipped_images: int = 0
    skipped_by_reason: dict[str, int] = field(default_factory=dict)
    # last.pt is written at the end of an epoch before its validation; True until that validation is done,
    # so that a run resumed after a failure there validates the epoch first
    validation_pending: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Optimization:
    """Turns a batch's loss into a parameter update, and owns what the update changes: the trainable
    parameters, the optimizer, the learning-rate schedule and the gradient scaler (saved in last.pt)."""

    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: str  # the autocast of the forward pass; fp16 scales the loss
    grad_clip: float = 0.0  # max gradient norm; 0: no clipping
    sync_gradients: bool = False  # average gradients here when the step bypasses the DDP wrapper

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def update(self, loss: torch.Tensor, where: str) -> None:
        """Back-propagate ``loss`` and step: a step of one batch."""
        self.backward(loss)
        self.step(where)

    def backward(self, loss: torch.Tensor) -> None:
        """Add the gradients of ``loss`` (one micro-batch's share of the step's objective)."""
        self.scaler.scale(loss).backward()

    def step(self, where: str) -> None:
        """Step the optimizer and the schedule on the summed gradients. ``where`` ("step 5 (epoch 1)") names
        the step in the error raised for a non-finite gradient norm."""
        if self.sync_gradients:
            average_gradients(self.params)
        self.scaler.unscale_(self.optimizer)
        max_norm = self.grad_clip if self.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if self.precision != "fp16" and not math.isfinite(grad_norm):
            # fp16's scaler skips such steps by design; elsewhere the update would poison every weight.
            raise FloatingPointError(
                f"non-finite gradient norm ({float(grad_norm)}) at {where} with a finite loss: stopping; "
                "last.pt keeps the last finite step"
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.skip()

    def skip(self) -> None:
        """Drop the gradients of a step that is not taken."""
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        """The optimizer, schedule and scaler states, under the keys last.pt has always used."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


@dataclass
class Trainer:
    """The loop across epochs: how a loss becomes an update (``optimization``), the counters saved in
    checkpoints (``state``) and those of this process's life (``steps_this_run``), the stop request, and
    where the loop reports (``metrics``) under which settings (``cfg``) on which process (``dist``)."""

    optimization: Optimization
    dist: DistInfo
    cfg: TrainConfig
    metrics: MetricsLog
    state: TrainState = field(default_factory=TrainState)
    steps_this_run: int = 0
    stop: StopRequest = field(default_factory=StopRequest)


class EpochEnd(enum.Enum):
    """Why :func:`run_epoch` returned."""

    COMPLETE = "complete"
    STEP_LIMIT = "train.stop_after_steps reached"
    SIGNAL = "stop signal"


def run_epoch(
    trainer: Trainer,
    batches: Iterable[dict[str, Any]],
    steps_in_epoch: int,
    step_fn: StepFn,
    save_fn: Callable[[], None],
    desc: str,
) -> EpochEnd:
    """Run the rest of the current epoch. Stopping early (``stop_after_steps``, or a stop signal that any
    process received) writes a checkpoint after the current step first."""
    bar = progress(total=steps_in_epoch, initial=trainer.state.epoch_step, desc=desc, disable=not trainer.dist.is_main)
    with bar:  # closed on errors too, so that an error message starts on its own line
        return _run_steps(trainer, bar, batches, steps_in_epoch, step_fn, save_fn)


def _run_steps(
    trainer: Trainer,
    bar: Progress,
    batches: Iterable[dict[str, Any]],
    steps_in_epoch: int,
    step_fn: StepFn,
    save_fn: Callable[[], None],
) -> EpochEnd:
    state, cfg = trainer.state, trainer.cfg
    started, images_seen = time.perf_counter(), 0
    for group in _micro_batches(batches, cfg.accum_steps):
        out, stop_signal = _step(trainer, group, step_fn)
        for batch in group:
            _count_skipped(state, batch)
        if out is not None:
            state.epoch_step += 1
            state.global_step += 1
            trainer.steps_this_run += 1
            images_seen += out.pop("batch_images")
            rate = images_seen * trainer.dist.world_size / max(time.perf_counter() - started, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.3f}", img_s=f"{rate:.1f}")
            if state.global_step % cfg.log_every == 0 or state.epoch_step == steps_in_epoch:
                lr = trainer.optimization.lr
                trainer.metrics.write("train", epoch=state.epoch, step=state.global_step, lr=lr, img_s=rate, **out)
        stop = EpochEnd.SIGNAL if stop_signal else None
        if out is not None and cfg.stop_after_steps and trainer.steps_this_run >= cfg.stop_after_steps:
            stop = EpochEnd.STEP_LIMIT
        if stop is not None and state.epoch_step < steps_in_epoch:
            save_fn()
            logger.info("stopped at step %d (%s) with a checkpoint", state.global_step, stop.value)
            return stop
        if out is not None and cfg.save_every_steps and state.global_step % cfg.save_every_steps == 0:
            save_fn()
    return EpochEnd.COMPLETE


def _micro_batches(batches: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    """The loader's batches in groups of ``size``: the micro-batches of one optimizer step each (an
    incomplete group at the end is dropped: the loader yields ``size`` per step)."""
    group: list[dict[str, Any]] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def _count_skipped(state: TrainState, batch: dict[str, Any]) -> None:
    state.skipped_images += batch["skipped"]
    for reason, count in batch.get("skipped_why", {}).items():
        state.skipped_by_reason[reason] = state.skipped_by_reason.get(reason, 0) + count


def _step(trainer: Trainer, batches: list[dict[str, Any]], step_fn: StepFn) -> tuple[dict[str, float] | None, bool]:
    """One optimisation step over ``batches``, its micro-batches (``train.accum_steps``). Returns its logged
    values (None when skipped) and whether any process was asked to stop."""
    optimization, device = trainer.optimization, trainer.dist.device
    have = float(all(batch_inputs(batch) for batch in batches))
    # Whether every process has data for every micro-batch, and whether any process was signalled (all
    # processes must stop after the same step), in one collective before any work.
    all_have, any_stop = all_reduce_mean(torch.tensor([have, float(trainer.stop.requested)], device=device)).tolist()
    stop_signal = any_stop > 0
    where = f"step {trainer.state.global_step + 1} (epoch {trainer.state.epoch + 1})"
    if all_have < 1.0:
        logger.warning("%s: a batch had no readable image on some process: step skipped everywhere", where)
        optimization.skip()
        return None, stop_signal
    outs = accumulate(optimization, batches, step_fn, device)
    global_loss = float(all_reduce_mean(torch.stack([out["loss"] for out in outs]).sum()))
    if not math.isfinite(global_loss):
        raise FloatingPointError(
            f"non-finite loss ({global_loss}) at {where}: stopping; last.pt keeps the last finite step (try a "
            "lower learning rate or train.precision=fp32)"
        )
    optimization.step(where)
    keys = [k for k, v in outs[0].items() if k != "loss" and v.numel() == 1]
    values = {k: sum(float(out[k]) for out in outs) / len(outs) for k in keys}
    values.update(loss=global_loss, batch_images=sum(len(next(iter(batch_inputs(b).values()))) for b in batches))
    return values, stop_signal


def accumulate(
    optimization: Optimization, batches: list[dict[str, Any]], step_fn: StepFn, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """Forward and backward each micro-batch, DDP's gradient sync on the last one only; their detached
    outputs (``loss``: each one's share of the step's objective, so that they add up to it)."""
    outs = []
    with autocast(optimization.precision, device):
        plans = step_fn.plan(batches)
    for number, (batch, plan) in enumerate(zip(batches, plans, strict=True)):
        with contextlib.nullcontext() if number == len(batches) - 1 else step_fn.no_sync():
            with autocast(optimization.precision, device):
                out = step_fn(batch, plan)
            optimization.backward(out["loss"])
        outs.append({k: v.detach().float() for k, v in out.items()})
    return outs
