"""Train the OPG captioner: cross-entropy (``--scst=False``, default) or SCST from a checkpoint.

    python train_scst.py [--config FILE ...] [--print_config] [--section.key VALUE | --key VALUE ...]

Without ``--config`` the run reads configs/xe.yaml, or configs/scst.yaml with ``--scst=True``.

Exit status: 0 done; 1 error (one line on stderr; a failed run keeps its last.pt); 2 bad options or no Java;
75 stopped by SIGTERM or SIGUSR1 after writing last.pt: run the same command with ``--resume`` to continue.
"""

from __future__ import annotations

import logging
import os
import sys

from utils.config import CONFIG_DIR, ConfigError, build_config, parse_bool, parse_overrides, to_yaml
from utils.java import java_missing

USAGE = __doc__


def split_args(argv: list[str]) -> tuple[list[str], bool, list[str]]:
    """Separate ``--config`` files and ``--print_config`` from the config overrides."""
    files: list[str] = []
    print_config = False
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--print_config":
            print_config = True
        elif arg.startswith("--print_config="):
            print_config = parse_bool(arg.split("=", 1)[1], "--print_config")
        elif arg == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file")
            files.append(argv[i + 1])
            i += 1
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return files, print_config, rest


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(USAGE)
        return 0
    try:
        files, print_config, rest = split_args(argv)
        overrides = parse_overrides(rest)
        if not files:
            scst = parse_bool(overrides.get("scst", False), "--scst")
            files = [str(CONFIG_DIR / ("scst.yaml" if scst else "xe.yaml"))]
        cfg = build_config(files, overrides)
    except ConfigError as err:
        print(f"train_scst.py: {err}", file=sys.stderr)
        return 2
    if print_config:
        print(to_yaml(cfg), end="")
        return 0
    missing_java = java_missing() if os.environ.get("RANK", "0") == "0" else None  # only rank 0 scores
    if missing_java:
        print(f"train_scst.py: error: {missing_java}", file=sys.stderr)
        return 2
    from utils.checkpoint import CheckpointError, resume_checkpoint

    try:
        if cfg.resume:  # before the slow imports; Run checks the file itself
            resume_checkpoint(cfg.output_dir)
    except CheckpointError as err:
        print(f"train_scst.py: error: {err}", file=sys.stderr)
        return 1
    return train(cfg)


def train(cfg) -> int:
    from engine.preemption import PREEMPTED_EXIT_CODE
    from engine.runner import Run, ValidationError
    from utils.checkpoint import CheckpointWriteError

    try:
        run = Run(cfg)
        try:
            result = run.train()
        finally:
            run.close()
    except (FileNotFoundError, ValueError, FloatingPointError, CheckpointWriteError, ValidationError) as err:
        # Bad input (a missing file, a checkpoint that does not fit, data that cannot be read), a diverged
        # run, a full disk or a failed validation: one line says what and where; the traceback goes to the log.
        if logging.getLogger().handlers:  # set up by the run: the traceback goes to train.log only
            logging.getLogger("train_scst").error("stopped: %s", err, exc_info=True, extra={"file_only": True})
        print(f"train_scst.py: error: {err}", file=sys.stderr)
        return 1
    if result.signal:
        print(f"train_scst.py: stopped by {result.signal} with last.pt written; continue with the same "
              "command plus --resume", file=sys.stderr)  # fmt: skip
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
