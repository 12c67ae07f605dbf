"""Configuration machinery: typed dataclass schemas whose fields carry their help, choices and short name;
YAML files holding only what differs (``base:`` inheritance); overrides; unknown keys rejected.

The schemas themselves live with the code they configure: ``models/config.py`` (architecture, decoding)
and ``engine/config.py`` (the training run). :func:`option` declares a field; :class:`Schema` loads,
coerces, validates and converts; :mod:`utils.cli` turns a schema into command-line options.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
BOOL_WORDS = _TRUE | _FALSE


class ConfigError(ValueError):
    """A configuration file or command-line option that cannot be applied."""


def option(
    default: Any, help: str, *, choices: Sequence[str] | None = None, short: bool = True, path: bool = False
) -> Any:
    """A schema field: its default, a one-line meaning (shown by ``--help``), the allowed values, whether
    its last name alone (``--lr``) may stand for it, and whether it is a file path (resolved against the
    folder of the YAML file that sets it). Mutable defaults (dicts) are copied per instance."""
    meta = {"help": help, "choices": tuple(choices) if choices else None, "short": short, "path": path}
    if isinstance(default, dict):
        return dataclasses.field(default_factory=lambda: dict(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def section(cls: type) -> Any:
    """A nested schema (a dataclass of options)."""
    return dataclasses.field(default_factory=cls)


def parse_bool(text: str | bool, key: str = "value") -> bool:
    """Parse a boolean in any usual spelling; ``bool('False')`` is True, this is not."""
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{key}: expected a boolean (true/false), got {text!r}")


@dataclass(frozen=True)
class Leaf:
    """One option of a schema: its dotted key, value type and declaration."""

    key: str
    kind: type  # bool, int, float, str or dict
    optional: bool  # None allowed
    default: Any
    help: str
    choices: tuple[str, ...] | None
    short: bool
    path: bool
    section: str  # "" at the top level


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(type, optional) of a hint such as ``int | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def _leaves(cls: type, prefix: str = "") -> list[Leaf]:
    hints = typing.get_type_hints(cls)
    defaults = cls()
    leaves: list[Leaf] = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            leaves += _leaves(hints[f.name], f"{prefix}{f.name}.")
            continue
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name}: declare it with option(default, help)")
        kind, optional = _base_type(hints[f.name])
        meta = f.metadata
        leaves.append(Leaf(f"{prefix}{f.name}", typing.get_origin(kind) or kind, optional, getattr(defaults, f.name),
                           meta["help"], meta["choices"], meta["short"], meta["path"], prefix.rstrip(".")))  # fmt: skip
    return leaves


class Schema:
    """Everything the configuration system does with one root dataclass ``cls``.

    ``aliases`` maps extra spellings (e.g. the reference code's ``lamda``) to dotted keys. Each field's
    last name is also accepted when the field is declared ``short``; two short fields with the same last
    name are refused here, so a new field can never change what an existing flag means.
    """

    def __init__(self, cls: type, aliases: dict[str, str] | None = None) -> None:
        self.cls = cls
        self.leaves = {leaf.key: leaf for leaf in _leaves(cls)}
        self.names = {key: key for key in self.leaves}
        hints = typing.get_type_hints(cls)
        self.titles = {f.name: f"{f.name}: {(hints[f.name].__doc__ or '').strip().splitlines()[0]}"
                       for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}  # fmt: skip
        for leaf in self.leaves.values():
            last = leaf.key.rsplit(".", 1)[-1]
            if leaf.short and last != leaf.key:
                self._add_name(last, leaf.key)
        for alias, key in (aliases or {}).items():
            self._add_name(alias, key)

    def _add_name(self, name: str, key: str) -> None:
        if name in self.names:
            raise TypeError(f"option name {name!r} would mean both {self.names[name]} and {key}: "
                            "declare one of them with short=False")  # fmt: skip
        if key not in self.leaves:
            raise TypeError(f"alias {name!r} names no option ({key})")
        self.names[name] = key

    def spellings(self, key: str) -> list[str]:
        """Every name of ``key``: the dotted key first, then its short name and aliases."""
        return [key] + [name for name, target in self.names.items() if target == key and name != key]

    def resolve(self, name: str) -> str:
        """A spelling -> its dotted key; an unknown name is an error listing the likely candidates."""
        name = name.replace("-", "_")
        if name in self.names:
            return self.names[name]
        raise ConfigError(f"unknown option {name!r}{self.suggest(name)}")

    def suggest(self, name: str) -> str:
        """`` (did you mean ...?)`` for a mistyped or ambiguous name, or an empty string."""
        last = name.rsplit(".", 1)[-1]
        same_last = [key for key in self.leaves if key.rsplit(".", 1)[-1] == last]
        close = difflib.get_close_matches(name, list(self.names), n=3)
        candidates = list(dict.fromkeys(same_last + [self.names[c] for c in close]))
        return f" (did you mean {' or '.join(candidates)}?)" if candidates else ""

    def coerce(self, key: str, value: Any) -> Any:
        """``value`` (a string from the command line, or a YAML value) as the type of option ``key``."""
        leaf = self.leaves[key]
        if value is None or (leaf.optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
            if leaf.optional:
                return None
            raise ConfigError(f"{key} cannot be empty")
        try:
            if leaf.kind is bool:
                return parse_bool(value, key)
            if leaf.kind is dict:
                value = yaml.safe_load(value) if isinstance(value, str) else value
                if not isinstance(value, dict):
                    raise ConfigError(f"{key}: expected a mapping, got {value!r}")
                return value
            if leaf.kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return leaf.kind(value)
        except (TypeError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"{key}: cannot read {value!r} as {leaf.kind.__name__}") from err

    def flatten(self, tree: dict, prefix: str = "") -> dict[str, Any]:
        """A nested mapping -> ``{name: value}`` (mapping-valued options such as ``model.gpt2_config`` kept)."""
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            full = f"{prefix}{key}"
            leaf = self.leaves.get(full)
            if isinstance(value, dict) and not (leaf and leaf.kind is dict):
                flat.update(self.flatten(value, f"{full}."))
            else:
                flat[full] = value
        return flat

    def load_yaml(self, path: str | Path) -> dict[str, Any]:
        """Flat ``{dotted key: value}`` from a YAML file and the files it names as ``base`` (recursively).

        Relative paths inside a file are resolved against that file's folder.
        """
        path = Path(path).expanduser().resolve()
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"cannot read config file {path}: {err}") from err
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        base = tree.pop("base", None)
        values = self.load_yaml(path.parent / base) if base else {}
        for raw_key, value in self.flatten(tree).items():
            try:
                key = self.resolve(raw_key)
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from err
            if self.leaves[key].path and isinstance(value, str) and not Path(value).expanduser().is_absolute():
                value = os.path.normpath(path.parent / value)
            values[key] = self.coerce(key, value)
        return values

    def build(self, files: Sequence[str | Path] = (), overrides: dict[str, Any] | None = None) -> Any:
        """Defaults, then each YAML file in order, then overrides (any spelling; raw strings or typed values)."""
        cfg = self.cls()
        for path in files:
            for key, value in self.load_yaml(path).items():
                set_value(cfg, key, value)
        for name, value in (overrides or {}).items():
            key = self.resolve(name)
            set_value(cfg, key, self.coerce(key, value))
        self.check_choices(cfg)
        return cfg

    def check_choices(self, cfg: Any) -> None:
        for leaf in self.leaves.values():
            value = get_value(cfg, leaf.key)
            if leaf.choices and value not in leaf.choices:
                raise ConfigError(f"{leaf.key} must be one of {', '.join(leaf.choices)}; got {value!r}")

    def from_dict(self, tree: dict[str, Any]) -> Any:
        """Rebuild a config saved with :func:`to_dict` (e.g. inside a checkpoint); unknown keys rejected."""
        cfg = self.cls()
        for key, value in self.flatten(tree).items():
            set_value(cfg, self.resolve(key), value)
        return cfg


def set_value(cfg: Any, key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    target = cfg
    for name in sections:
        target = getattr(target, name)
    setattr(target, leaf, value)


def get_value(cfg: Any, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def section_from_dict(cls: type, tree: dict[str, Any], where: str) -> Any:
    """One section of a saved config (``where`` names it in errors); unknown keys rejected."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping, got {tree!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(tree) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(unknown)}")
    return cls(**tree)
