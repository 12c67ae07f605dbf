"""Failure injection: the real training CLI in subprocesses, stopped and broken from outside (SIGTERM to the
process group, a file-size limit that makes the disk "full", Java vanishing, kill -9 during a save and at
random points, NaN features), then resumed; the outcome is checked on disk against an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import stat
import time
from pathlib import Path

import pytest
import torch
from faults import Job, limit_file_size, subprocess_env, train_command

from data.synthetic import generate_dataset
from utils.checkpoint import read_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults") / "data"
    generate_dataset(root, num_train=48, num_val=8, num_test=8, image_size=64, seed=3)
    return root


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """Encoder features shared by every run of this module (written by the reference run)."""
    return tmp_path_factory.mktemp("features")


def _command(data: Path, features: Path, out: Path, *extra: str) -> list[str]:
    cache = ["--data.cache_features", "true", "--data.feature_cache_dir", str(features), "--num_workers", "1"]
    return train_command(data, out, *cache, *extra)


@pytest.fixture(scope="module")
def reference(data, features, tmp_path_factory) -> Path:
    """The same run, never interrupted."""
    out = tmp_path_factory.mktemp("reference")
    job = Job(_command(data, features, out), out / "logs", "run")
    assert job.wait() == 0, job.error_text()[-3000:]
    return out


def _train_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
    return [record["step"] for record in map(json.loads, lines) if record["event"] == "train"]


def _metrics_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _temporaries(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob(".*.tmp"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _last_line(job: Job) -> str:
    # progress bars redraw with carriage returns: a line's last segment is what a terminal shows
    lines = [line.split("\r")[-1] for line in job.error_text().splitlines() if line.split("\r")[-1].strip()]
    return lines[-1] if lines else ""


def _counters(run_dir: Path) -> dict:
    return read_checkpoint(run_dir / "last.pt")["train_state"]["counters"]


def _java_that_vanished(tmp_path: Path) -> tuple[Path, Path]:
    """A ``java`` first on PATH that fails while ``gone`` exists, else runs the real one."""
    folder, gone = tmp_path / "javabin", tmp_path / "java_gone"
    folder.mkdir()
    wrapper = folder / "java"
    real = shutil.which("java")
    assert real, "the tests need Java"
    wrapper.write_text(f'#!/bin/sh\nif [ -e "{gone}" ]; then echo "java: gone" >&2; exit 127; fi\nexec "{real}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    gone.touch()
    return folder, gone


def _assert_same_model(run_dir: Path, reference: Path, name: str) -> None:
    mine, theirs = read_checkpoint(run_dir / name)["model"], read_checkpoint(reference / name)["model"]
    assert mine.keys() == theirs.keys()
    different = [key for key, value in theirs.items() if not torch.equal(mine[key], value)]
    assert not different, f"{name} differs from the uninterrupted run at {different[:5]}"


def test_sigterm_full_disk_java_loss_and_kill_9_then_resume_equals_the_uninterrupted_run(
    data, features, reference, tmp_path
):
    out, logs = tmp_path / "run", tmp_path / "logs"
    start = _command(data, features, out)
    resume = [*start, "--resume"]

    # 1. The scheduler's SIGTERM reaches the whole process group (DataLoader worker included) mid-epoch.
    job = Job(start, logs, "1_sigterm")
    assert job.wait_until(lambda: len(_train_steps(out)) >= 1)
    job.signal_group(signal.SIGTERM)
    assert job.wait(120) == 75, job.error_text()[-3000:]
    assert "stopped by SIGTERM" in _last_line(job)
    steps = _train_steps(out)
    assert _counters(out)["global_step"] == steps[-1] < 8 and _temporaries(out) == []

    # 2. The disk "fills up" (a real EFBIG from the kernel): the next save fails with one clear line and
    #    leaves the previous last.pt byte for byte, with no temporary file.
    before = _sha256(out / "last.pt")
    limit = (out / "last.pt").stat().st_size // 2
    job = Job(resume, logs, "2_full_disk", preexec_fn=limit_file_size(limit))
    assert job.wait() == 1, job.error_text()[-3000:]
    line = _last_line(job)
    assert f"cannot write checkpoint {out / 'last.pt'}" in line and "File too large" in line, line
    assert "previous last.pt is unchanged" in line and "Traceback" not in job.error_text()
    assert _sha256(out / "last.pt") == before and _temporaries(out) == []

    # 3. kill -9 while last.pt is being written: last.pt is the old or the new one, never a partial file.
    job = Job(resume, logs, "3_kill_in_save")
    assert job.wait_until(lambda: bool(_temporaries(out)), poll=0.002), job.error_text()[-3000:]
    job.signal_group(signal.SIGKILL)
    job.wait(60)
    assert _counters(out)["global_step"] in (steps[-1], steps[-1] + 1)

    # 4. Java disappears: the first validation fails; the epoch's training is in last.pt, marked as
    #    awaiting its validation. The stale temporary file of step 3 is gone.
    java_dir, gone = _java_that_vanished(tmp_path)
    env = subprocess_env(PATH=f"{java_dir}{os.pathsep}{os.environ['PATH']}")
    job = Job(resume, logs, "4_java_gone", env=env)
    assert job.wait() == 1, job.error_text()[-3000:]
    line = _last_line(job)
    assert line.startswith("train_scst.py: error: validating epoch 1 failed") and "PTB tokenizer (Java)" in line, line
    assert "last.pt holds the training so far" in line and "--resume" in line
    counters = _counters(out)
    assert (counters["epoch"], counters["epoch_step"], counters["global_step"]) == (1, 0, 4)
    assert counters["validation_pending"] and _temporaries(out) == []
    gone.unlink()

    # 5. kill -9 at random moments of the resumed run (validation, steps or saves).
    rng = random.Random(17)
    for leg in range(2):
        seen = _metrics_lines(out)
        job = Job(resume, logs, f"5_random_kill_{leg}", env=env)
        assert job.wait_until(lambda seen=seen: _metrics_lines(out) > seen), job.error_text()[-3000:]
        time.sleep(rng.uniform(0.0, 1.5))
        job.signal_group(signal.SIGKILL)
        job.wait(60)
        read_checkpoint(out / "last.pt")

    # 6. Resumed to the end: the same weights, counters, best checkpoint and test captions as never stopped.
    job = Job(resume, logs, "6_finish", env=env)
    assert job.wait() == 0, job.error_text()[-3000:]
    _assert_same_model(out, reference, "last.pt")
    _assert_same_model(out, reference, "best.pt")
    assert _counters(out) == _counters(reference)
    assert json.loads((out / "test_predictions.json").read_text()) == json.loads(
        (reference / "test_predictions.json").read_text()
    )
    assert _temporaries(out) == []
