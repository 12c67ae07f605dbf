"""Run ``train_scst.py`` with the given arguments and write what it cost to a JSON file.

    python benchmarks/measured_run.py OUT.json [train_scst.py arguments ...]

Records the wall time, the peak resident memory of this process (its DataLoader workers excluded), the
peak CUDA memory, and the time spent in the run's feature caching, validations, checkpoint writes and
final test (the methods of ``engine.runner.Run`` are wrapped with timers; nothing else changes).
"""

from __future__ import annotations

import functools
import json
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_scst  # noqa: E402
from engine.runner import Run  # noqa: E402

TIMED = {"_validate": "validation", "_save": "checkpoint", "_final_test": "test", "_datasets": "data_setup"}


def _timed(method, name: str, totals: dict[str, list[float]]):
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[name].append(time.perf_counter() - started)

    return wrapper


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out, args = Path(argv[0]), argv[1:]
    totals: dict[str, list[float]] = defaultdict(list)
    for method, name in TIMED.items():
        setattr(Run, method, _timed(getattr(Run, method), name, totals))
    started = time.perf_counter()
    status = train_scst.main(args)
    record = {
        "status": status,
        "wall_s": time.perf_counter() - started,
        "peak_host_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_device_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "timers": dict(totals),
    }
    out.write_text(json.dumps(record, indent=1))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
