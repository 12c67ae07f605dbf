"""Console/file logging and the JSON-lines metrics log of a run."""

from __future__ import annotations

import logging
import math
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from utils.io import append_jsonl
from utils.reporting import Reporter, scalar_values


def setup_logging(rank: int = 0, log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Rank 0 logs at ``level`` (console and ``log_file``), other ranks warnings only. Replaces (and closes)
    the root logger's handlers, so that runs one after another in one process log once, each to its own file."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(fmt)
    # Records logged with extra={"file_only": True} (tracebacks of errors already reported in one line)
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    root.addHandler(console)
    if log_file is not None and rank == 0:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file)
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
    root.setLevel(level if rank == 0 else logging.WARNING)
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def report_failure(prog: str, err: BaseException, unexpected: bool) -> None:
    """One line on stderr naming the error; its full traceback in the run's log file (``train.log``).

    Without a log file the traceback of an ``unexpected`` error (a bug) goes to stderr instead, before the
    line: it must land somewhere. Expected errors (bad input, a diverged run) need no traceback on screen.
    """
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    kind = f"{type(err).__name__}: " if unexpected else ""
    if files:
        logging.getLogger(prog).error("stopped: %s%s", kind, err, exc_info=err, extra={"file_only": True})
        where = f" (traceback in {files[0].baseFilename})" if unexpected else ""
    else:
        if unexpected:
            traceback.print_exception(err, file=sys.stderr)
        where = ""
    print(f"{prog}: error: {kind}{err}{where}", file=sys.stderr)


class MetricsLog:
    """Appends one JSON object per event to ``metrics.jsonl`` (no-op when ``path`` is None) and passes its
    numbers on to the dashboards in ``reporters`` at the event's ``step`` (the last one seen without it)."""

    def __init__(self, path: Path | None, reporters: Sequence[Reporter] = ()) -> None:
        self.path = path
        self.reporters = list(reporters)
        self.last_step = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **values: Any) -> None:
        plain = {k: _plain(v) for k, v in values.items()}
        self.last_step = int(plain.get("step", self.last_step))
        for reporter in self.reporters:
            reporter.scalars(event, scalar_values(plain), self.last_step)
        if self.path is None:
            return
        append_jsonl(self.path, {"event": event, "time": round(time.time(), 3), **plain})

    def text(self, tag: str, text: str) -> None:
        """A text (e.g. a table of sample captions) for the dashboards, at the last step."""
        for reporter in self.reporters:
            reporter.text(tag, text, self.last_step)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
