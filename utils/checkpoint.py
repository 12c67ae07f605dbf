"""Self-describing checkpoints: written atomically, loaded strictly, no code executed on load."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

FORMAT = "opg-captioner"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is unreadable or does not fit the model."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename: a crash never leaves a partial file
    where a good one was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    config: dict[str, Any],
    architecture: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> None:
    """Write model weights, the run's config, the architecture needed to rebuild the model and
    optionally the training state (optimizer, scheduler, scaler, counters, RNG)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": config,
        "architecture": architecture,
        "model": state,
    }
    if train_state is not None:
        payload["train_state"] = train_state
    atomic_save(payload, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, without unpickling arbitrary objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an {FORMAT} checkpoint (no 'format': '{FORMAT}' entry)")
    return payload


def _summarise(keys: list[str], limit: int = 30) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load every weight or fail with the missing, unexpected and mis-shaped keys listed by name."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = sorted(
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(own[k].shape)})"
        for k in set(own) & set(state)
        if own[k].shape != state[k].shape
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing: {_summarise(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_summarise(unexpected)}")
    if mis_shaped:
        problems.append(f"{len(mis_shaped)} with another shape: {_summarise(mis_shaped)}")
    if problems:
        raise CheckpointError(f"weights in {source} do not fit the model; " + "; ".join(problems))
    model.load_state_dict(state, strict=True)
