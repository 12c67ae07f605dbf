"""Train the OPG captioner: cross-entropy (``--scst=False``, default) or SCST from a checkpoint.

    python train_scst.py [--config FILE ...] [--print_config] [--section.key VALUE | --key VALUE ...]

Without ``--config`` the run reads configs/xe.yaml, or configs/scst.yaml with ``--scst=True``.
"""

from __future__ import annotations

import logging
import sys

from utils.config import CONFIG_DIR, ConfigError, build_config, parse_bool, parse_overrides, to_yaml

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
    from engine.runner import Run

    try:
        run = Run(cfg)
        try:
            run.train()
        finally:
            run.close()
    except (FileNotFoundError, ValueError, FloatingPointError) as err:
        # Bad input (a missing file, a checkpoint that does not fit, data that cannot be read) or a
        # diverged run: the message says what and where; the traceback goes to the log file only.
        logging.getLogger("train_scst").debug("stopped", exc_info=True)
        print(f"train_scst.py: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
