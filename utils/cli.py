"""The one command-line dialect of every entry point.

``--name value`` or ``--name=value``; ``-`` and ``_`` are the same inside names; booleans take every usual
spelling (``--flag``, ``--flag=True``, ``--flag False``, ``--flag no``); no prefix abbreviations; an unknown
option is an error naming the likely candidates. ``--help`` shows each option's type, default and meaning.
Config schemas (:class:`utils.config.Schema`) add one ``--section.key`` option per field.
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from utils.config import BOOL_WORDS, ConfigError, Schema, parse_bool

_TYPE_NAMES = {bool: "BOOL", int: "INT", float: "FLOAT", str: "STR", dict: "YAML", Path: "PATH"}


class UsageError(ConfigError):
    """A command line that cannot be parsed."""


def bool_arg(text: str) -> bool:
    """argparse ``type`` of boolean options (see :func:`add_flag`)."""
    try:
        return parse_bool(text)
    except ConfigError as err:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}") from err


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    if isinstance(value, list | tuple):
        return " ".join(map(str, value)) or "none"
    return str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Metavars name the type (INT, FLOAT, BOOL, PATH, STR); an option's help ends with its default."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=40, width=min(120, shutil.get_terminal_size().columns))

    def _format_action_invocation(self, action: argparse.Action) -> str:
        """``--train.batch_size, --batch_size, --bs INT``: the spellings, then the value once."""
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        value = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {value}"

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        if action.type is bool_arg:
            return "BOOL"
        return _TYPE_NAMES.get(action.type, getattr(action.type, "__name__", "STR").upper())  # type: ignore[arg-type]

    def _get_default_metavar_for_positional(self, action: argparse.Action) -> str:
        return self._get_default_metavar_for_optional(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = getattr(action, "shown_default", action.default)
        if not action.option_strings or isinstance(action, argparse._HelpAction) or default is argparse.SUPPRESS:
            return text
        if action.required:
            return f"{text} (required)"
        # Schema options always show theirs. Otherwise the help may say it in words ("default: stdout"), and
        # None means "not given" (the group's or the option's help says what happens then)
        if not hasattr(action, "shown_default") and ("default" in text or default is None):
            return text
        return f"{text} (default: {_shown(default).replace('%', '%%')})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse in this project's dialect; :meth:`parse` returns an exit status instead of exiting, after
    one line on stderr for a usage error (``--help`` shows the usage)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace | int:
        """The parsed options, or the exit status after ``--help`` (0) or a usage error (2, message printed)."""
        try:
            return self.parse_args(argv)
        except UsageError as err:
            print(f"{self.prog}: error: {err}", file=sys.stderr)
            return 2
        except SystemExit as stop:  # --help
            return stop.code if isinstance(stop.code, int) else 0

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        """Like argparse's, but raises :class:`UsageError` (unknown options name their likely candidates)."""
        tokens = self._normalise(list(sys.argv[1:] if args is None else args))
        parsed, extra = self.parse_known_args(tokens, namespace)
        if extra:
            raise UsageError(self._unknown(extra[0]))
        return parsed

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)

    def _normalise(self, tokens: list[str]) -> list[str]:
        """``--a-b`` -> ``--a_b``; a boolean option followed by a boolean word, or by nothing, -> ``--flag=word``."""
        out: list[str] = []
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token == "--":
                return out + tokens[i:]
            if token.startswith("--") and len(token) > 2:
                name, eq, value = token.partition("=")
                name = "--" + name[2:].replace("-", "_")
                action = self._option_string_actions.get(name)
                if action is not None and action.type is bool_arg and not eq:
                    following = tokens[i + 1] if i + 1 < len(tokens) else ""
                    eq, value = "=", following if following.lower() in BOOL_WORDS else "true"
                    i += following.lower() in BOOL_WORDS
                token = name + eq + value
            out.append(token)
            i += 1
        return out

    def _unknown(self, token: str) -> str:
        if not token.startswith("-"):
            return f"unexpected argument {token!r} (options look like --name value)"
        name = token.split("=", 1)[0]
        options = [o for o in self._option_string_actions if o.startswith("--") and o != "--help"]
        last = name.rsplit(".", 1)[-1].lstrip("-")
        same_last = [o for o in options if o.rsplit(".", 1)[-1].lstrip("-") == last and "." in o]
        longer = [o for o in options if o.startswith(name)]
        candidates = list(dict.fromkeys(same_last + longer + difflib.get_close_matches(name, options, n=3)))[:4]
        hint = f" (did you mean {' or '.join(candidates)}?)" if candidates else " (see --help)"
        return f"unknown option {name}{hint}"


def add_flag(parser: Any, name: str, help: str, default: bool = False) -> argparse.Action:
    """A boolean option: ``--name`` alone is true; ``--name=false`` and ``--name no`` work too."""
    return parser.add_argument(name, type=bool_arg, default=default, help=help)


def add_schema_options(parser: ArgumentParser, schema: Schema, exclude: Sequence[str] = ()) -> None:
    """One ``--dotted.key`` option (plus its short name and aliases) per field of ``schema`` but the keys in
    ``exclude``, grouped by section. They have no argparse default: only what the command line gives
    overrides the YAML files (:func:`schema_overrides`); ``--help`` shows the schema's defaults."""
    groups: dict[str, Any] = {"": parser.add_argument_group("run")}
    for leaf in schema.leaves.values():
        if leaf.key in exclude:
            continue
        if leaf.section not in groups:
            groups[leaf.section] = parser.add_argument_group(schema.titles[leaf.section])
        action = groups[leaf.section].add_argument(
            *("--" + name for name in schema.spellings(leaf.key)),
            dest=leaf.key,
            type=bool_arg if leaf.kind is bool else None,  # the schema coerces the other values itself
            choices=leaf.choices,
            default=argparse.SUPPRESS,
            metavar=None if leaf.choices else "PATH" if leaf.path else _TYPE_NAMES.get(leaf.kind, "STR"),
            help=leaf.help.replace("%", "%%"),
        )
        action.shown_default = leaf.default  # read by HelpFormatter


def schema_overrides(args: argparse.Namespace, schema: Schema) -> dict[str, Any]:
    """``{dotted key: value}`` of the schema options given on the command line."""
    given = vars(args)
    return {key: given[key] for key in schema.leaves if key in given}
