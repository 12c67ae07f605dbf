"""Stop a run cleanly when a scheduler asks: SIGTERM (SLURM's time limit or preemption, ``kill``) or SIGUSR1
(``sbatch --signal=USR1@120``). The handler only records the request; the training loop finishes its
current step, writes ``last.pt`` and the entry script exits with :data:`PREEMPTED_EXIT_CODE`."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# EX_TEMPFAIL from sysexits.h: "a temporary failure; the user is invited to retry" (here: with --resume).
PREEMPTED_EXIT_CODE = 75


class StopRequest:
    """While entered, SIGTERM and SIGUSR1 set :attr:`signal_name` instead of killing the process.

    Outside the main thread (where handlers cannot be installed) it does nothing. A second signal of the
    same kind while a stop is pending is logged and ignored: the step and the checkpoint write finish.
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            logger.warning("%s received: stopping after the current step with a checkpoint", name)
        self.signal_name = self.signal_name or name


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: a scheduler signals every process of the job; the workers must
    survive it so that the main process can finish its step (it shuts them down itself)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class LoaderBatches:
    """Batches of a DataLoader whose workers ignore stop signals, at most ``count`` of them. Leaving the
    ``with`` block stops the workers at once: an exception's traceback could otherwise keep them alive until
    interpreter exit, where multiprocessing's SIGTERM to them is ignored and its join would wait forever."""

    def __init__(self, loader: Iterable[Any], count: int | None = None) -> None:
        self._iterator: Iterator[Any] | None = iter(loader)
        self._count = count

    def __iter__(self) -> Iterator[Any]:
        taken = 0
        while self._iterator is not None and (self._count is None or taken < self._count):
            try:
                batch = next(self._iterator)
            except StopIteration:
                return
            taken += 1
            yield batch

    def __enter__(self) -> LoaderBatches:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._iterator = None  # the only reference: the DataLoader iterator shuts its workers down now
