"""Mixed precision: bf16 autocast by default on CUDA, fp16 with a gradient scaler, fp32 on the CPU."""

from __future__ import annotations

import contextlib

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(name: str, device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32"
    return "bf16" if name == "auto" else name


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A scaler that is active for fp16 only (a no-op otherwise, so the loop has one code path)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
