"""Mixed precision: bf16 autocast (the default on CUDA), fp16 with a gradient scaler, fp32; on CUDA and
the CPU alike, as asked."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# auto: bf16 on CUDA, fp32 on the CPU. Declared here, read by the config schema, --help and the API; torch
# is imported in the functions only, so that parsing a command line does not load it.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA, fp32 elsewhere; bf16 and fp16 run as asked wherever torch has an autocast
    (CUDA and the CPU, with a gradient scaler for fp16 on both); elsewhere they are a ValueError, never
    a silent fp32."""
    import torch

    if name == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name != "fp32" and not torch.amp.is_autocast_available(device.type):
        raise ValueError(f"precision {name}: torch has no autocast on {device.type}; use fp32 there")
    return name


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A scaler that is active for fp16 only (a no-op otherwise, so the loop has one code path); torch
    scales fp16 losses on the CPU as on CUDA."""
    import torch

    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
