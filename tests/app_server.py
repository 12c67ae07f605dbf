"""The tiny model and running app shared by the web page's tests: ``python app.py`` as a user starts it,
on a free port of 127.0.0.1, with its printed URL read back."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import SHARED, save_model, tiny_config

from models.build import build_captioner

REPO = Path(__file__).resolve().parent.parent
PHOTO = SHARED / "real_images" / "COCO_val2014_000000060623.jpg"
START_TIMEOUT_S = 180


def make_checkpoint(path: Path) -> Path:
    """A tiny random model with a sparse mask that drops some positions (threshold 0.5)."""
    torch.manual_seed(0)
    cfg = tiny_config(**{"decode.beams": 2, "decode.max_len": 8, "decode.min_len": 1, "model.threshold": 0.5})
    save_model(path, build_captioner(cfg), cfg)
    return path


@contextmanager
def running(command: list[str], cwd: Path, env: dict[str, str]) -> Iterator[str]:
    """Start ``command`` (an app that prints ``open http://...``), yield its URL, then stop it with SIGTERM
    and check that it exits cleanly."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def read_output() -> None:
        for line in process.stdout:
            lines.put(line)
        lines.put(None)  # end of output: the process has exited

    threading.Thread(target=read_output, daemon=True).start()
    output: list[str] = []
    try:
        while not output or " open http://" not in output[-1]:
            try:
                line = lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                pytest.fail(f"{command[1]} did not start within {START_TIMEOUT_S} s:\n" + "".join(output))
            if line is None:
                pytest.fail(f"{command[1]} exited before serving:\n" + "".join(output))
            output.append(line)
        yield output[-1].split(" open ", 1)[1].split()[0]
    finally:
        process.terminate()
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
    assert code == 0, f"{command[1]} did not stop cleanly ({code})"


def app_command(checkpoint: Path, *options: str) -> list[str]:
    return [sys.executable, "app.py", "--checkpoint", str(checkpoint), "--port", "0", "--device", "cpu", *options]


def app_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}
