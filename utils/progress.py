"""Progress of long loops: a tqdm bar on a terminal, plain lines elsewhere.

tqdm redraws its bar with carriage returns; written to a file (a cluster job's log, ``2> train.err``)
every frame stays, and the log grows by megabytes of bar frames. When the stream is not a terminal,
:func:`progress` prints one ordinary line every tenth of the loop instead (and one at the end).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm import tqdm

LINES = 10  # plain lines per loop of known length


class PlainProgress:
    """The part of tqdm's interface the loops use (iteration, ``update``, ``set_postfix``, context
    manager), printing ``desc: n/total unit (p%), elapsed, rate, postfix`` lines to ``stream``."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, initial: int,
                 stream: IO[str], every: int | None = None) -> None:  # fmt: skip
        self.iterable, self.total, self.desc, self.unit, self.stream = iterable, total, desc, unit, stream
        self.n = self.printed = self.start = initial
        self.every = every or (max(1, math.ceil((total - initial) / LINES)) if total else 100)
        self.postfix = ""
        self.started = time.perf_counter()

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n - self.printed >= self.every:
            self._print()

    def set_postfix(self, **values: object) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if self.n != self.printed:
            self._print()

    def _print(self) -> None:
        elapsed = time.perf_counter() - self.started
        rate = (self.n - self.start) / elapsed if elapsed > 0 else 0.0
        done = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.desc}: {done} {self.unit}{share}", f"{elapsed:.0f} s", f"{rate:.2f} {self.unit}/s"]
        self.stream.write(", ".join(parts + ([self.postfix] if self.postfix else [])) + "\n")
        self.stream.flush()
        self.printed = self.n


Progress = tqdm | PlainProgress


def progress(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    leave: bool = True,
    stream: IO[str] | None = None,
) -> Progress:
    """A progress display of ``iterable`` (or of ``update`` calls up to ``total``) on ``stream`` (stderr):
    tqdm's bar on a terminal, plain lines otherwise, nothing when ``disable``."""
    stream = stream or sys.stderr
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    if disable or stream.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, leave=leave,
                    file=stream)  # fmt: skip
    return PlainProgress(iterable, total, desc or "progress", unit, initial, stream)
