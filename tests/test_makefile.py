"""The Makefile's set-up runs once: `make -n` (print, do not run) on a copy of the Makefile and requirements."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def planned(folder: Path, target: str) -> str:
    """The commands ``make`` would run for ``target``, printed without running any."""
    # A clean environment: under `make test` the parent's MAKELEVEL/MAKEFLAGS would make this a sub-make.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    done = subprocess.run(
        ["make", "--no-print-directory", "-n", target], cwd=folder, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_setup_installs_once_and_again_only_when_requirements_change(tmp_path: Path) -> None:
    for name in ("Makefile", "requirements.txt", "requirements-dev.txt", "requirements-app.txt"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    fresh = planned(tmp_path, "test")
    assert "python3 -m venv .venv" in fresh
    assert "pip install" in fresh and "torch==2.14.1 torchvision==0.29.1" in fresh
    assert "-r requirements-dev.txt" in fresh and "command -v java" in fresh
    assert fresh.rstrip().endswith(".venv/bin/python -m pytest -q -n 2")

    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / ".installed").touch()  # what a finished installation leaves
    for target, command in (("test", ".venv/bin/python -m pytest -q -n 2"), ("demo", ".venv/bin/python demo.py")):
        again = planned(tmp_path, target)
        assert "pip install" not in again and "venv" not in again.replace(".venv/bin", "")
        assert again.strip().splitlines()[-1] == command

    later = time.time() + 5
    os.utime(tmp_path / "requirements-dev.txt", (later, later))  # a changed requirements file
    changed = planned(tmp_path, "demo")
    assert "-r requirements-dev.txt" in changed and "python3 -m venv" in changed  # guarded by `test -x`
