"""Mixed precision: bf16 autocast by default on CUDA, fp16 with a gradient scaler, fp32 on the CPU."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# auto: bf16 on CUDA, fp32 on the CPU. Declared here, read by the config schema, --help and the API; torch
# is imported in the functions only, so that parsing a command line does not load it.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(name: str, device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32"
    return "bf16" if name == "auto" else name


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A scaler that is active for fp16 only (a no-op otherwise, so the loop has one code path)."""
    import torch

    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
