"""The OPG captioner. ``from models import load_captioner`` gives the two-line Python API
(:mod:`models.api`); it is imported on first use, so ``import models`` itself loads nothing heavy."""

from __future__ import annotations

from typing import Any

__all__ = ["Captioner", "ScoredCaption", "load_captioner"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from models import api

        return getattr(api, name)
    raise AttributeError(f"module 'models' has no attribute {name!r}")
