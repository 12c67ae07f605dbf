"""Live training dashboards: TensorBoard and Weights & Biases (``train.report_to``), fed by the metrics log.

Every numeric value of a ``metrics.jsonl`` event is logged as ``EVENT/KEY`` (``train/loss``, ``train/lr``,
``train/reward``, ``train/baseline``, ``train/entropy``, ``val/CIDEr``, ``test/CIDEr``, ...) at the event's
step; texts (sample captions) go to the dashboard's text panel. Both libraries are optional and imported
only when asked for.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

REPORTERS = ("tensorboard", "wandb")
_NOT_SCALARS = {"epoch", "step", "time"}


class Reporter(Protocol):
    def scalars(self, event: str, values: Mapping[str, float], step: int) -> None: ...

    def text(self, tag: str, text: str, step: int) -> None: ...

    def close(self) -> None: ...


def parse_report_to(value: str) -> list[str]:
    """``"none"``, ``"tensorboard"``, ``"wandb"`` or a comma-separated list -> the reporter names."""
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    names = [name for name in names if name != "none"]
    unknown = [name for name in names if name not in REPORTERS]
    if unknown:
        raise ValueError(f"train.report_to: unknown {unknown}; choose from none, {', '.join(REPORTERS)}")
    return names


def open_reporters(value: str, run_dir: Path, config: dict[str, Any]) -> list[Reporter]:
    """The reporters named by ``train.report_to`` writing under ``run_dir``."""
    reporters: list[Reporter] = []
    for name in parse_report_to(value):
        reporters.append(TensorBoardReporter(run_dir) if name == "tensorboard" else WandbReporter(run_dir, config))
    return reporters


def scalar_values(values: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of an event, without its counters."""
    return {
        key: float(value)
        for key, value in values.items()
        if key not in _NOT_SCALARS
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def sample_table(captions: Mapping[Any, str], references: Mapping[Any, Sequence[str]], count: int = 5) -> str:
    """A markdown table of the first ``count`` images' predicted caption and first reference."""
    rows = ["| image | caption | a reference |", "|---|---|---|"]
    for image_id in list(captions)[:count]:
        reference = (references.get(image_id) or [""])[0]
        rows.append(f"| {image_id} | {captions[image_id]} | {reference} |")
    return "\n".join(rows)


class TensorBoardReporter:
    """Event files in ``RUN/tensorboard`` (``tensorboard --logdir runs``)."""

    def __init__(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ValueError("train.report_to=tensorboard needs tensorboard: pip install tensorboard") from err
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def scalars(self, event: str, values: Mapping[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{event}/{key}", value, step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A Weights & Biases run in ``RUN/wandb``; offline unless ``WANDB_MODE`` says otherwise (sync an offline
    run later with ``wandb sync RUN/wandb/offline-run-*``)."""

    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as err:
            raise ValueError("train.report_to=wandb needs the wandb package: pip install wandb") from err
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "opg-captioner"),
            name=run_dir.name,
            dir=str(run_dir),
            config=config,
            mode=os.environ.get("WANDB_MODE", "offline"),
        )

    def scalars(self, event: str, values: Mapping[str, float], step: int) -> None:
        self.run.log({f"{event}/{key}": value for key, value in values.items()}, step=step)

    def text(self, tag: str, text: str, step: int) -> None:
        self.run.log({tag: self.wandb.Html(f"<pre>{text}</pre>")}, step=step)

    def close(self) -> None:
        self.run.finish()
