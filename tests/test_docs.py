"""The README and docs/ stay true: every command line in their shell blocks that calls one of the project's
entry points uses only options its parser knows, every relative link and image resolves, and the
configuration page's table names every config key.

Parsers are taken from the entry points themselves: ``main`` is called with argparse's parsing replaced by
a stop that hands the parser back, so no work runs.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
# Script or ``-m`` module -> the module whose ``main`` parses its command line.
SCRIPTS = {
    path.relative_to(REPO).as_posix(): ".".join(path.relative_to(REPO).with_suffix("").parts)
    for path in [*REPO.glob("*.py"), *REPO.glob("benchmarks/*.py")]
}
MODULES = {"data.prepare_coco", "data.prepare_custom", "data.synthetic", "utils.plot"}
FORWARDERS = {"scripts/slurm_train.sbatch": "train_scst"}  # scripts that pass their options on to an entry point
COMMAND = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:\S*python3?|torchrun|sbatch|make|bash)\b")


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__("parser captured")
        self.parser = parser


def entry_parser(module_name: str, monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    """The argument parser that ``module_name.main`` builds, captured before it parses anything."""

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Parsed(self)

    module = importlib.import_module(module_name)
    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        try:
            module.main(["--help"])
        except _Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{module_name}.main never parsed its command line")


def shell_blocks(text: str) -> Iterator[str]:
    """The contents of fenced blocks marked as shell (or unmarked)."""
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M):
        if match.group(1) in SHELL_FENCES:
            yield match.group(2)


def command_lines(block: str) -> Iterator[str]:
    """Commands of a block: continuation lines joined, comments dropped, ``&&`` / ``;`` / ``|`` split."""
    joined = re.sub(r"\\\n", " ", block)
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        for part in re.split(r"&&|;|\|\||(?<![\[|])\|(?![\]|])", line):
            part = part.strip()
            if COMMAND.match(part):
                yield part


def tokens_of(command: str) -> list[str]:
    """Shell words, with the ``[...]`` brackets that mark optional parts removed."""
    text = command.replace("[", " ").replace("]", " ")
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()


def entry_point(words: list[str]) -> tuple[str, list[str]] | None:
    """(module of the entry point, its arguments) of a command, or None when it calls none of ours."""
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words) and words[i + 1] in MODULES:
            return words[i + 1], words[i + 2 :]
        path = word.removeprefix("./")
        if path in SCRIPTS:
            return SCRIPTS[path], words[i + 1 :]
        if path in FORWARDERS:
            return FORWARDERS[path], words[i + 1 :]
    return None


def documented_commands() -> list[tuple[str, str, str, list[str]]]:
    """(page, command, entry module, arguments) of every documented call of an entry point."""
    found = []
    for page in PAGES:
        for block in shell_blocks(page.read_text(encoding="utf-8")):
            for command in command_lines(block):
                target = entry_point(tokens_of(command))
                if target is not None:
                    found.append((page.relative_to(REPO).as_posix(), command, *target))
    return found


def unknown_options(parser: argparse.ArgumentParser, arguments: list[str]) -> list[str]:
    """The ``--options`` among ``arguments`` that ``parser`` does not define (values are not checked)."""
    known = parser._option_string_actions  # every spelling argparse accepts
    dashes_free = hasattr(parser, "_normalise")  # the project's dialect: '-' and '_' are the same in names
    missing = []
    for word in arguments:
        if not word.startswith("--") or word == "--":
            continue
        name = word.split("=", 1)[0]
        if dashes_free:
            name = "--" + name[2:].replace("-", "_")
        if name not in known:
            missing.append(name)
    return missing


def test_documented_commands_are_found() -> None:
    modules = {module for _, _, module, _ in documented_commands()}
    assert {"train_scst", "predict", "evaluate", "export", "data.prepare_coco", "utils.plot"} <= modules


def test_every_documented_option_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    parsers: dict[str, argparse.ArgumentParser] = {}
    wrong = []
    for page, command, module, arguments in documented_commands():
        if module not in parsers:
            parsers[module] = entry_parser(module, monkeypatch)
        wrong += [f"{page}: {option} in `{command}`" for option in unknown_options(parsers[module], arguments)]
    assert not wrong, "options the entry points do not accept:\n" + "\n".join(wrong)


def test_the_option_check_catches_a_wrong_option(monkeypatch: pytest.MonkeyPatch) -> None:
    command = "python predict.py --checkpoint x.pt --beam 3 --num-captions 2 [--format coco|csv]"
    module, arguments = entry_point(tokens_of(command))
    assert module == "predict"
    assert unknown_options(entry_parser(module, monkeypatch), arguments) == ["--beam"]


def test_make_targets_exist() -> None:
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
    wrong = []
    for page in PAGES:
        for block in shell_blocks(page.read_text(encoding="utf-8")):
            for command in command_lines(block):
                words = tokens_of(command)
                if words[0] == "make":
                    wrong += [f"{page.name}: make {w}" for w in words[1:] if "=" not in w and w not in targets]
    assert not wrong, wrong


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        if count:
            seen[f"{slug}-{count}"] = 1
    return set(seen)


def links(page: Path) -> Iterator[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    yield from re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    yield from re.findall(r"<img [^>]*src=\"([^\"]+)\"", text)


def test_every_relative_link_and_image_resolves() -> None:
    broken = []
    for page in PAGES:
        for link in links(page):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert not broken, "\n".join(broken)


def test_the_link_check_sees_anchors_and_files(tmp_path: Path) -> None:
    page = tmp_path / "a.md"
    page.write_text("# Title\n## Decoding speed (`bench.py`)\n## Step\n## Step\n[x](b.md) ![i](img.png)\n")
    assert anchors(page) == {"title", "decoding-speed-benchpy", "step", "step-1"}
    assert list(links(page)) == ["b.md", "img.png"]


def test_the_configuration_page_names_every_config_key() -> None:
    from engine.config import SCHEMA

    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `?(top level|\w+)`? \| (.+) \|$", page, flags=re.M))
    named = {
        key if section == "top level" else f"{section}.{key}"
        for section, cells in rows.items()
        for key in re.findall(r"`(\w+)`", cells)
    }
    missing = sorted(set(SCHEMA.leaves) - named)
    unknown = sorted(key for key in named - set(SCHEMA.leaves) if "." in key)
    assert not missing and not unknown, f"config keys not in docs/configuration.md: {missing}; unknown: {unknown}"
