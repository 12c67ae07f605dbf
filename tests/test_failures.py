"""Failure injection: the real training CLI in subprocesses, stopped and broken from outside (SIGTERM to the
process group, a file-size limit that makes the disk "full", Java vanishing, kill -9 during a save and at
random points, NaN features), then resumed; the outcome is checked on disk against an uninterrupted run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from faults import (
    BROKEN_IMAGES,
    ODD_IMAGES,
    REPO,
    Job,
    limit_file_size,
    make_images,
    subprocess_env,
    train_command,
    write_hostile_checkpoint,
)
from helpers import tiny_config

import predict
import train_scst
from data.sampler import ShardedSampler
from data.synthetic import generate_dataset
from engine.features import FeatureStore
from engine.runner import Run
from metrics.coco_eval import CaptionScorer
from utils.checkpoint import read_checkpoint

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def restore_logging():
    """In-process runs replace the root logger's handlers (with ones writing to pytest's captured streams)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


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
    cache = ["--data.cache_features", "true", "--data.feature_cache_dir", str(features), "--num_workers", "1",
             "--encoder.drop_path", "0"]  # fmt: skip
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
    steps = _sigterm_mid_epoch(start, out, logs)
    _full_disk_keeps_last_checkpoint(resume, out, logs)
    stale = _kill_during_save(resume, out, logs, steps[-1])
    env = _java_vanishes_before_validation(resume, out, logs, tmp_path, stale)
    _kill_at_random_moments(resume, out, logs, env)

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


def _sigterm_mid_epoch(start: list[str], out: Path, logs: Path) -> list[int]:
    """1. The scheduler's SIGTERM reaches the whole process group (DataLoader worker included) mid-epoch."""
    job = Job(start, logs, "1_sigterm")
    assert job.wait_until(lambda: len(_train_steps(out)) >= 1)
    job.signal_group(signal.SIGTERM)
    assert job.wait(120) == 75, job.error_text()[-3000:]
    assert _last_line(job) == (
        "train_scst.py: stopped by SIGTERM with last.pt written; continue with the same command plus --resume"
    )
    steps = _train_steps(out)
    assert _counters(out)["global_step"] == steps[-1] < 8 and _temporaries(out) == []
    return steps


def _full_disk_keeps_last_checkpoint(resume: list[str], out: Path, logs: Path) -> None:
    """2. The disk "fills up" (a real EFBIG from the kernel): the next save fails with one clear line and
    leaves the previous last.pt byte for byte, with no temporary file."""
    before = _sha256(out / "last.pt")
    limit = (out / "last.pt").stat().st_size // 2
    job = Job(resume, logs, "2_full_disk", preexec_fn=limit_file_size(limit))
    assert job.wait() == 1, job.error_text()[-3000:]
    assert _last_line(job) == (
        f"train_scst.py: error: cannot write checkpoint {out.resolve() / 'last.pt'} (File too large: file size "
        "limit reached (ulimit -f)); the previous last.pt is unchanged"
    )
    assert "Traceback" not in job.error_text()
    assert _sha256(out / "last.pt") == before and _temporaries(out) == []


# python -c _HELD_AT_RENAME MARKER SCRIPT ARGS...: runs SCRIPT as its command line does, except that the first
# os.replace onto a file named last.pt does not happen: MARKER then names the file that was to be renamed, and
# the process waits to be killed (ten minutes at most). The save is held at its last moment: the new checkpoint
# is written (and fsynced) beside last.pt, and last.pt is still the old one.
_HELD_AT_RENAME = """
import os, runpy, sys, time
marker, script = sys.argv[1], sys.argv[2]
real_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(dst) == "last.pt":
        with open(marker + ".part", "w") as handle:
            handle.write(os.fspath(src))
        real_replace(marker + ".part", marker)
        time.sleep(600)
        os._exit(3)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
sys.argv = sys.argv[2:]
sys.path[0] = os.path.dirname(script)
runpy.run_path(script, run_name="__main__")
"""


def _kill_during_save(resume: list[str], out: Path, logs: Path, last_step: int) -> str:
    """3. kill -9 in the middle of saving last.pt, at a fixed point: the new checkpoint is written beside
    last.pt, not yet renamed over it. last.pt is the old one, byte for byte; the temporary file is left
    behind (its name is returned)."""
    before, counters = _sha256(out / "last.pt"), _counters(out)
    assert counters["global_step"] == last_step
    held = logs / "3_held_at_rename"
    job = Job([sys.executable, "-c", _HELD_AT_RENAME, str(held), *resume[1:]], logs, "3_kill_in_save")
    assert job.wait_until(held.exists), job.error_text()[-3000:]
    job.signal_group(signal.SIGKILL)
    assert job.wait(60) == -signal.SIGKILL, job.error_text()[-3000:]
    temporary = Path(held.read_text())
    assert temporary.name.startswith(".last.pt.") and _temporaries(out) == [temporary.name]
    assert _sha256(out / "last.pt") == before
    # The save cut short is the resumed run's first: after its first step, or after the validation that a
    # stop at the end of an epoch left pending (last.pt is saved again once it is done).
    cut_short = read_checkpoint(temporary)["train_state"]["counters"]
    expected = last_step if counters["validation_pending"] else last_step + 1
    assert (cut_short["global_step"], cut_short["validation_pending"]) == (expected, False), cut_short
    return temporary.name


def _java_vanishes_before_validation(
    resume: list[str], out: Path, logs: Path, tmp_path: Path, stale: str
) -> dict[str, str]:
    """4. Java disappears: the first validation fails; the epoch's training is in last.pt, marked as awaiting
    its validation. The stale temporary file of step 3 is gone. Returns the environment with Java back."""
    java_dir, gone = _java_that_vanished(tmp_path)
    env = subprocess_env(PATH=f"{java_dir}{os.pathsep}{os.environ['PATH']}")
    job = Job(resume, logs, "4_java_gone", env=env)
    assert job.wait() == 1, job.error_text()[-3000:]
    assert f"removed 1 incomplete file(s) left by an interrupted write: {stale}\n" in job.error_text()
    # pycocoevalcap ignores Java's exit status: the tokenizer's short output is what names the failure
    assert _last_line(job) == (
        "train_scst.py: error: validating epoch 1 failed (RuntimeError: the PTB tokenizer (Java) returned a "
        "different number of captions than it was given); last.pt holds the training so far: fix the cause and "
        "run the same command with --resume"
    )
    counters = _counters(out)
    assert (counters["epoch"], counters["epoch_step"], counters["global_step"]) == (1, 0, 4)
    assert counters["validation_pending"] and _temporaries(out) == []
    gone.unlink()
    return env


def _kill_at_random_moments(resume: list[str], out: Path, logs: Path, env: dict[str, str]) -> None:
    """5. kill -9 at random moments of the resumed run (validation, steps or saves); last.pt stays readable."""
    rng = random.Random(17)
    for leg in range(2):
        seen = _metrics_lines(out)
        job = Job(resume, logs, f"5_random_kill_{leg}", env=env)
        assert job.wait_until(lambda seen=seen: _metrics_lines(out) > seen), job.error_text()[-3000:]
        time.sleep(rng.uniform(0.0, 1.5))
        assert job.process.poll() is None, job.error_text()[-3000:]  # still running: the kill below is real
        job.signal_group(signal.SIGKILL)
        assert job.wait(60) == -signal.SIGKILL
        read_checkpoint(out / "last.pt")


def _poison_one_image(features: Path, poisoned: Path, data: Path, seed: int) -> int:
    """Copy the feature cache with NaN features for one training image that first appears in the third
    batch of the first epoch; returns that step (3)."""
    shutil.copytree(features, poisoned)
    entries = json.loads((data / "train.json").read_text())
    order = list(ShardedSampler(len(entries), shuffle=True, seed=seed, epoch=0))
    first_step = {}
    for position, index in enumerate(order):
        first_step.setdefault(entries[index]["image"], position // 8 + 1)
    image = next(name for name, step in first_step.items() if step == 3)
    for folder in poisoned.glob("features_*"):
        store = FeatureStore(folder)
        if image in store.paths:
            row = store.paths.index(image)
            data_file = np.memmap(folder / "features.bin", dtype=store.dtype, mode="r+",
                                  shape=(len(store.paths), *store.shape))  # fmt: skip
            data_file[row] = np.nan
            data_file.flush()
            return 3
    raise AssertionError(f"{image} is in no feature store")


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(data, features, reference, tmp_path):
    seed = read_checkpoint(reference / "last.pt")["config"]["train"]["seed"]
    bad_step = _poison_one_image(features, tmp_path / "poisoned", data, seed)
    out = tmp_path / "run"
    command = train_command(data, out, "--data.cache_features", "true", "--encoder.drop_path", "0",
                            "--num_workers", "1",
                            "--data.feature_cache_dir", str(tmp_path / "poisoned"))  # fmt: skip
    job = Job(command, tmp_path / "logs", "nan")
    assert job.wait() == 1, job.error_text()[-3000:]
    line = _last_line(job)
    assert line.startswith(f"train_scst.py: error: non-finite loss (nan) at step {bad_step} "), line
    assert "Traceback" not in job.error_text()
    checkpoint = read_checkpoint(out / "last.pt")
    assert checkpoint["train_state"]["counters"]["global_step"] == bad_step - 1 == _train_steps(out)[-1]
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint["model"].values())
    assert _temporaries(out) == []


@pytest.fixture
def hostile(reference, tmp_path) -> tuple[Path, Path]:
    """(a captioner checkpoint carrying a pickled os.system call, the file that call would create)."""
    marker = tmp_path / "code_was_executed"
    write_hostile_checkpoint(reference / "last.pt", tmp_path / "hostile.pt", marker)
    return tmp_path / "hostile.pt", marker


def test_pickle_payload_in_a_checkpoint_is_refused_and_never_run(data, features, hostile, tmp_path, capsys):
    path, marker = hostile
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    shutil.copy(path, run_dir / "last.pt")
    job = Job(_command(data, features, run_dir, "--resume"), tmp_path / "logs", "resume")  # the real CLI
    assert job.wait() == 1
    errors = {"resume": (run_dir / "last.pt", job.error_text())}
    assert train_scst.main(_command(data, features, tmp_path / "init", "--checkpoint", str(path))[2:]) == 1
    errors["checkpoint"] = (path, capsys.readouterr().err)
    assert predict.main(["--checkpoint", str(path), "--images", str(data), "--no_progress"]) == 2
    errors["predict"] = (path, capsys.readouterr().err)
    for name, (named, text) in errors.items():
        assert f"{named} cannot be read: it pickles a Python object (posix.system)" in text, (name, text)
        assert "Traceback" not in text and "weights_only=False" not in text
    assert not marker.exists(), "the pickled call ran"


def _corrupt(reference: Path, kind: str, target: Path) -> None:
    if kind == "truncated":
        target.write_bytes((reference / "last.pt").read_bytes()[: 3 * 1024 * 1024])
    elif kind == "text":
        target.write_text("this is not a checkpoint\n")
    else:  # bytes flipped in the middle of the archive
        blob = bytearray((reference / "last.pt").read_bytes())
        middle = len(blob) // 2
        blob[middle : middle + 4096] = bytes(4096)
        target.write_bytes(bytes(blob))


@pytest.mark.parametrize("kind", ["truncated", "text", "zeroed"])
def test_corrupted_last_pt_is_named_in_one_line(data, features, reference, tmp_path, capsys, kind):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _corrupt(reference, kind, run_dir / "last.pt")
    before = _sha256(run_dir / "last.pt")
    status = train_scst.main(_command(data, features, run_dir, "--resume")[2:])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1, err
    assert err[0].startswith(f"train_scst.py: error: checkpoint {run_dir / 'last.pt'} cannot be read: ")
    assert _sha256(run_dir / "last.pt") == before and not (run_dir / "best.pt").exists()


def test_resume_without_a_checkpoint_and_other_architectures_are_errors(data, features, reference, tmp_path, capsys):
    empty = tmp_path / "empty"
    assert train_scst.main(_command(data, features, empty, "--resume")[2:]) == 1
    assert capsys.readouterr().err.strip() == (
        f"train_scst.py: error: --resume: nothing to resume, {empty / 'last.pt'} does not exist "
        "(run without --resume to start afresh)"
    )
    assert not (empty / "metrics.jsonl").exists()
    other = ["--mapping_type", "transformer", "--mapper_layers", "1", "--mapper_heads", "2"]
    shutil.copytree(reference, tmp_path / "copy")
    # --resume loads the run's own last.pt (named as the resolved run folder's); --checkpoint the file as given
    resumed = (tmp_path / "copy").resolve() / "last.pt"
    for out, extra, named in (
        (tmp_path / "copy", ["--resume"], resumed),
        (tmp_path / "init", ["--checkpoint", str(reference / "best.pt")], reference / "best.pt"),
    ):
        assert train_scst.main(_command(data, features, out, *other, *extra)[2:]) == 1
        errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line or "Traceback" in line]
        prefix = f"train_scst.py: error: weights in {named} do not fit the model; "
        assert len(errors) == 1 and errors[0].startswith(prefix) and "mapper." in errors[0], errors


def test_without_java_each_entry_point_stops_before_any_work(tmp_path):
    no_java = tmp_path / "bin"
    no_java.mkdir()
    env = subprocess_env(PATH=str(no_java))
    out, demo_out, demo_data = tmp_path / "run", tmp_path / "demo", tmp_path / "demo_data"
    commands = {
        "train_scst.py": [str(REPO / "train_scst.py"), "--output_dir", str(out), "--device", "cpu"],
        "evaluate.py": [
            str(REPO / "evaluate.py"),
            "--results",
            str(tmp_path / "r.json"),
            "--annotations",
            str(tmp_path / "gt.json"),
        ],  # fmt: skip
        "demo.py": [str(REPO / "demo.py"), "--output_dir", str(demo_out), "--data_dir", str(demo_data)],
    }
    for name, command in commands.items():
        done = subprocess.run([sys.executable, *command], env=env, capture_output=True, text=True, timeout=120)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (name, done.stderr[-2000:])
        assert "java not found on PATH" in lines[0] and "install a Java runtime" in lines[0]
    assert not out.exists() and not demo_out.exists() and not demo_data.exists()


def _meteor_processes() -> list[int]:
    """Process ids of METEOR's Java servers started by this process (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b"meteor-1.5.jar" in cmdline and parent == os.getpid():
            found.append(int(entry.name))
    return found


def _process_state(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_meteor_killed_between_calls_is_restarted_by_the_next_one():
    gts = {1: ["a red circle on the left", "one red circle at left"], 2: ["two blue stars", "a pair of blue stars"]}
    res = {1: "a red circle on the left side", 2: "three blue stars on a gray background"}
    with CaptionScorer() as scorer:
        first = scorer.score(gts, res, spice=False).metrics
        [java] = _meteor_processes()
        os.kill(java, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while java in _meteor_processes() and _process_state(java) != "Z":  # dead (a zombie until reaped)
            assert time.monotonic() < deadline, f"Java {java} still {_process_state(java)} 30 s after kill -9"
            time.sleep(0.01)
        second = scorer.score(gts, res, spice=False).metrics
        restarted = _meteor_processes()
    assert second == first and 0 < first["METEOR"] < 1
    assert len(restarted) == 1 and restarted != [java]


def _training_set_with_bad_files(data: Path, root: Path) -> Path:
    """16 generated images, 14 odd but valid ones (CMYK, 16-bit, 1x1, 12000x9000, EXIF-rotated, animated,
    unicode and space-containing names, ...), one of each kind of unreadable file and two empty captions."""
    shutil.copytree(data, root)
    bad = root / "images" / "bad"
    make_images(bad, {name: make for name, (make, _) in BROKEN_IMAGES.items()})
    odd = make_images(root / "images" / "odd", ODD_IMAGES)
    good = json.loads((data / "train.json").read_text())[:16]
    good += [{"image": str(path.relative_to(root)), "caption": "an odd picture"} for path in odd]
    files = ["missing.jpg", *BROKEN_IMAGES]
    entries = good + [{"image": f"images/bad/{name}", "caption": "a red circle on the left"} for name in files]
    entries += [{"image": good[0]["image"], "caption": caption} for caption in ("", " ... !")]
    (root / "train.json").write_text(json.dumps(entries))
    return root


def test_bad_training_files_are_skipped_counted_and_explained(data, tmp_path):
    root = _training_set_with_bad_files(data, tmp_path / "data")
    overrides = {"train.batch_size": 7, "data.num_workers": 2, "train.val_meteor": False}  # 35 entries: 5 steps
    run = Run(tiny_config(root, tmp_path / "run", **overrides))
    try:
        result = run.train()
    finally:
        run.close()
    assert result.test and (tmp_path / "run" / "test_metrics.json").is_file()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3, 4, 5]
    [report] = [r for r in records if r["event"] == "data"]
    expected = {"missing": 1, **{kind: 1 for _, kind in BROKEN_IMAGES.values()}}
    assert report["skipped_images"] == 5 and report["skipped_by_reason"] == expected  # every odd image was read
    assert report["dropped_entries"] == {"empty caption": 2}
    log = (tmp_path / "run" / "train.log").read_text()
    assert "5 unreadable training images skipped so far (1 corrupt or truncated, 1 empty, 1 missing" in log
    assert f"{root / 'train.json'}: 2 training entries with an empty caption left out" in log
    for name in ("missing.jpg", *BROKEN_IMAGES):  # logged by the DataLoader worker processes
        assert f"skipping image: cannot load image '{root / 'images' / 'bad' / name}'" in log, name


def test_predict_captions_odd_files_in_workers_and_names_broken_ones(reference, tmp_path, capsys):
    folder = tmp_path / "photos"
    good = make_images(folder, ODD_IMAGES)
    make_images(folder, {name: make for name, (make, _) in BROKEN_IMAGES.items()})
    (folder / "Nested" / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    out = tmp_path / "captions.json"
    status = predict.main(["--checkpoint", str(reference / "best.pt"), "--images", str(folder), "--output",
                           str(out), "--num_workers", "2", "--batch_size", "4", "--no_progress"])  # fmt: skip
    assert status == 1
    results = json.loads(out.read_text())
    assert sorted(r["file_name"] for r in results) == sorted(map(str, good))
    assert all(r["caption"].strip() for r in results)
    failed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("failed: ")]
    reasons = {"truncated.jpg": "corrupt or truncated", "text.png": "not a recognised image format",
               "empty.jpeg": "empty file", "absurd.png": "image too large to decode safely"}  # fmt: skip
    reasons = {folder / name: reason for name, reason in reasons.items()}
    reasons[folder / "Nested" / "gone.jpg"] = "broken symbolic link"
    assert len(failed) == len(reasons)
    for path, reason in reasons.items():
        assert any(line.startswith(f"failed: {path}: ") and reason in line for line in failed), (path, failed)
