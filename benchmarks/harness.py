"""Shared pieces of the end-to-end benchmarks: model sizes, host-memory sampling, a timed training run."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from engine.config import CONFIG_DIR, Config, build_config  # noqa: E402

# The paper's model with random weights (Swin-B 224, GPT-2 small's shape, full vocabulary, sparse mask), and
# a CPU-sized stand-in with the same pipeline.
SIZES: dict[str, dict[str, Any]] = {
    "paper": {"encoder.vision_config": "xvlm_swin_b_224",
              "model.gpt2_config": {"n_layer": 12, "n_embd": 768, "n_head": 12}},
    "demo": {"encoder.vision_config": "swin_demo",
             "model.gpt2_config": {"n_layer": 2, "n_embd": 128, "n_head": 4}},
}  # fmt: skip


def coco_config(annotations: Path, image_root: Path, output_dir: Path, scst: bool, **overrides: Any) -> Config:
    """configs/xe.yaml (or scst.yaml) pointed at a COCO-like set, random weights, then ``overrides``."""
    values: dict[str, Any] = {
        "encoder.checkpoint": None,
        "data.image_root": str(image_root),
        "data.train_file": str(annotations / "train.json"),
        "data.val_file": str(annotations / "val.json"),
        "data.test_file": str(annotations / "test.json"),
        "data.cider_df": None,
        "output_dir": str(output_dir),
        "train.log_every": 1,
        **overrides,
    }
    return build_config([CONFIG_DIR / ("scst.yaml" if scst else "xe.yaml")], values)


def rss_anon_mib() -> float:
    """Anonymous resident memory of this process (heap, not file pages such as memory maps), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (VmHWM), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class MemorySampler:
    """Samples :func:`rss_anon_mib` in a thread; ``samples`` holds (seconds, MiB)."""

    def __init__(self, every: float = 0.25) -> None:
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._start = time.perf_counter()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - self._start, rss_anon_mib()))
            self._stop.wait(self.every)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter() - self._start, rss_anon_mib()))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_for(cfg: Config) -> tuple[float, list[dict[str, Any]]]:
    """Run ``cfg`` (set ``train.stop_after_steps``) in this process; (wall seconds, its train records)."""
    from engine.runner import Run

    started = time.perf_counter()
    run = Run(cfg)
    try:
        run.train()
    finally:
        run.close()
    seconds = time.perf_counter() - started
    return seconds, [r for r in read_metrics(Path(cfg.output_dir)) if r["event"] == "train"]
