"""Train the OPG captioner: cross-entropy (``--scst=False``, default) or SCST from a checkpoint.

Without --config the run reads configs/xe.yaml, or configs/scst.yaml with --scst=True; options given here
override the files. Each option is --section.key, or its last name alone (--lr, --beams) where the help
lists one; --flag, --flag=True and --flag False all work for booleans. Defaults shown are the code's
(the YAML files change some); --print_config shows the resolved values.

Exit status: 0 done; 1 error (one line on stderr, the traceback in OUTPUT_DIR/train.log; a failed run keeps
its last.pt); 2 bad options or no Java; 75 stopped by SIGTERM or SIGUSR1 after writing last.pt: run the
same command with --resume to continue.
"""

from __future__ import annotations

import os
import sys

from engine.config import CONFIG_DIR, SCHEMA, Config, add_config_options, build_config
from metrics.java import java_missing
from utils.cli import ArgumentParser, add_flag, schema_overrides
from utils.config import ConfigError, to_yaml
from utils.logs import report_failure

PROG = "train_scst.py"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog=PROG, description=__doc__, usage=f"{PROG} [--config FILE ...] [--print_config] [--section.key VALUE ...]"
    )
    add_flag(parser, "--print_config", "print the resolved config (YAML) and exit")
    add_config_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse(argv)
    if isinstance(args, int):
        return args
    overrides = schema_overrides(args, SCHEMA)
    files = args.config or [str(CONFIG_DIR / ("scst.yaml" if overrides.get("scst") else "xe.yaml"))]
    try:
        cfg = build_config(files, overrides)
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    missing_java = java_missing() if os.environ.get("RANK", "0") == "0" else None  # only rank 0 scores
    if missing_java:
        print(f"{PROG}: error: {missing_java}", file=sys.stderr)
        return 2
    from utils.checkpoint import CheckpointError, resume_checkpoint

    try:
        if cfg.resume:  # before the slow imports; Run checks the file itself
            resume_checkpoint(cfg.output_dir)
    except CheckpointError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    return train(cfg)


def train(cfg: Config) -> int:
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
        # run, a full disk or a failed validation: one line says what and where.
        report_failure(PROG, err, unexpected=False)
        return 1
    except Exception as err:  # a bug: the full traceback goes to train.log, the terminal keeps one line
        report_failure(PROG, err, unexpected=True)
        return 1
    if result.signal:
        print(f"{PROG}: stopped by {result.signal} with last.pt written; continue with the same "
              "command plus --resume", file=sys.stderr)  # fmt: skip
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
