"""Self-describing checkpoints: written atomically, loaded strictly, no code executed on load."""

from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from utils.io import WriteError, atomic_write

logger = logging.getLogger(__name__)

FORMAT = "opg-captioner"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is unreadable or does not fit the model."""


class CheckpointWriteError(WriteError):
    """A checkpoint could not be written (disk full, quota, permissions); the previous file is unchanged."""


_ZIP_SIGNATURE = b"PK\x03\x04"  # torch.save's format
_BLOCKED_GLOBAL = re.compile(r"unsupported (?:GLOBAL|global:?)\s+(?:GLOBAL\s+)?([\w.]+)", re.IGNORECASE)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`utils.io.atomic_write`: a crash or a kill never leaves a partial file
    where a good one was. A failed write (e.g. a full disk) raises :class:`CheckpointWriteError` naming
    ``path``."""
    try:
        with atomic_write(path, binary=True, what="checkpoint") as handle:
            torch.save(obj, handle)
    except WriteError as err:
        error = CheckpointWriteError(str(err))
        error.errno = err.errno
        raise error from err


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


def resume_checkpoint(run_dir: str | Path) -> Path:
    """``run_dir/last.pt``, the checkpoint ``--resume`` continues from; a missing one is an error."""
    path = Path(run_dir).expanduser() / "last.pt"
    if not path.is_file():
        raise CheckpointError(
            f"--resume: nothing to resume, {path} does not exist (run without --resume to start afresh)"
        )
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, without unpickling arbitrary objects.

    Every failure is a :class:`CheckpointError` with a one-line message that names the file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    damage = _archive_damage(path)
    if damage:
        raise CheckpointError(f"checkpoint {path} cannot be read: {damage}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} cannot be read: {_load_failure(err)}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an {FORMAT} checkpoint (no 'format': '{FORMAT}' entry)")
    return payload


def _archive_damage(path: Path) -> str | None:
    """Why the file is not an intact torch archive, or None. torch.load does not check the CRC-32 that
    torch.save stores for every record, so flipped or zeroed bytes would otherwise load silently."""
    with open(path, "rb") as handle:
        if handle.read(4) != _ZIP_SIGNATURE:
            return "not a torch checkpoint (empty, text or another format: no zip archive signature)"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        return f"truncated or corrupted file ({type(err).__name__}: {err})"
    return f"corrupted file (record {bad} fails its CRC-32 check)" if bad else None


def _load_failure(err: Exception) -> str:
    """One line on why ``torch.load`` failed. A refused global means the file pickles code or objects:
    say so, and never suggest ``weights_only=False`` as torch's own message does."""
    text = str(err)
    blocked = _BLOCKED_GLOBAL.search(text)
    if blocked:
        return f"it pickles a Python object ({blocked.group(1)}), refused: checkpoints hold tensors and plain data only"
    if isinstance(err, EOFError) or "zip archive" in text:
        return f"truncated or corrupted file ({type(err).__name__}: not a complete torch zip archive)"
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first[:200]}"


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
