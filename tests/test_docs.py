"""The README and docs/ stay true to the code.

Every command line in their shell blocks, and in their prose's inline code, that calls one of the project's
entry points uses only options that the entry point's parser defines, with a value of the right kind where
the value is written out (a choice among the option's choices, a number, true or false), and so does every
command of ``scripts/*.sh``; every ``make`` target named exists; every relative link and image resolves,
anchors included; every page of docs/ is linked from the README; the configuration page names every config
key.

The parsers are the entry points' own: ``main(["--help"])`` runs with argparse's parsing replaced by a
stop that hands back the parser, so the command's work never starts (each ``main`` parses first).
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine.config import SCHEMA
from utils.cli import bool_arg

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_FENCES = {"", "bash", "sh", "shell", "console"}
# Runnable files of the tree (repository-relative) -> the module whose ``main`` parses their command line;
# the packages' ones run as ``python -m data.prepare_coco`` too.
SCRIPTS = {
    path.relative_to(REPO).as_posix(): ".".join(path.relative_to(REPO).with_suffix("").parts)
    for path in [*REPO.glob("*.py"), *REPO.glob("*/*.py")]
    if re.search(r"^def main\(", path.read_text(encoding="utf-8"), flags=re.M) and path.parent.name != "tests"
}
MODULES = {module for path, module in SCRIPTS.items() if "/" in path}
FORWARDERS = {"scripts/slurm_train.sbatch": "train_scst"}  # scripts that hand their options to an entry point
KINDS = {int: "an integer", float: "a number", bool_arg: "true or false"}  # values checked by type
LAUNCHERS = re.compile(r"^(\S*/)?(python3?|torchrun|srun|sbatch|make)$")  # words that start one of our commands


@dataclass(frozen=True)
class Command:
    page: str
    text: str
    words: list[str]


class _Parsed(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__("parser captured")
        self.parser = parser


def entry_parser(module_name: str) -> argparse.ArgumentParser:
    """The argument parser that ``module_name.main`` builds, taken before it parses anything."""

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Parsed(self)

    module = importlib.import_module(module_name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
        try:
            module.main(["--help"])
        except _Parsed as parsed:
            return parsed.parser
    raise AssertionError(f"{module_name}.main returned without parsing its command line")


def shell_blocks(text: str) -> Iterator[str]:
    """The contents of fenced blocks marked as shell, or not marked at all."""
    for match in re.finditer(r"^ *```(\w*)\n(.*?)^ *```", text, flags=re.S | re.M):
        if match.group(1) in SHELL_FENCES:
            yield match.group(2)


def command_lines(block: str) -> Iterator[str]:
    """A block's commands: continuation lines joined, prompts and comments dropped, ``&&`` ``;`` ``|`` split."""
    joined = re.sub(r"\\\n", " ", block)
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line.strip().removeprefix("$ ")).strip()
        # a "|" between square brackets separates alternative values ([--format coco|jsonl]), not commands
        for part in re.split(r"&&|;|\|\||(?<![\w\]])\s*\|\s*(?![\w\[])", line):
            if part.strip():
                yield part.strip()


def words_of(command: str) -> list[str]:
    """Shell words with the ``[ ]`` that mark optional parts removed; leading ``VAR=value`` and ``nice`` dropped."""
    text = command.replace("[", " ").replace("]", " ")
    try:
        words = shlex.split(text)
    except ValueError:  # an unbalanced quote in prose-like lines
        words = text.split()
    while words and (re.match(r"^[A-Z_]+=", words[0]) or words[0] == "nice"):
        words = words[3:] if words[0] == "nice" and words[1:2] == ["-n"] else words[1:]
    return words


def inline_commands(text: str) -> Iterator[str]:
    """Commands quoted in the prose as inline code, such as ``python -m utils.plot RUN --out curves.png``."""
    prose = re.sub(r"^ *```.*?^ *```", "", text, flags=re.S | re.M)
    for code in re.findall(r"`([^`]+)`", prose):
        yield from command_lines(code.replace("\n", " "))


def documented_commands() -> list[Command]:
    """Every command of the README's and docs/'s shell blocks and inline code that starts with a launcher."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for command in [c for block in shell_blocks(text) for c in command_lines(block)] + [*inline_commands(text)]:
            words = words_of(command)
            if words and (LAUNCHERS.match(words[0]) or words[0] in SCRIPTS):  # `predict.py --beams 3` in prose
                found.append(Command(page.relative_to(REPO).as_posix(), command, words))
    return found


def entry_point(words: list[str]) -> tuple[str, list[str]] | None:
    """(module of the entry point, its arguments) of a command, or None when it calls none of ours."""
    for i, word in enumerate(words):
        if word == "-m" and words[i + 1 : i + 2] and words[i + 1] in MODULES:
            return words[i + 1], words[i + 2 :]
        path = word.removeprefix("./")
        if path in SCRIPTS:
            return SCRIPTS[path], words[i + 1 :]
        if path in FORWARDERS:
            return FORWARDERS[path], words[i + 1 :]
    return None


def _is_placeholder(value: str) -> bool:
    """``FILE``, ``N``, ``coco|csv``, ``$VAR``: a stand-in for a value, not one to check."""
    return "|" in value or "$" in value or value.isupper() or value.startswith("-")


def wrong_options(parser: argparse.ArgumentParser, arguments: list[str]) -> list[str]:
    """The ``--options`` among ``arguments`` that ``parser`` does not define, and literal values outside an
    option's choices."""
    dialect = hasattr(parser, "_normalise")  # the project's dialect: '-' and '_' are the same inside names
    wrong = []
    for i, word in enumerate(arguments):
        if not word.startswith("--") or word == "--":
            continue
        name, eq, value = word.partition("=")
        if dialect:
            name = "--" + name[2:].replace("-", "_")
        action = parser._option_string_actions.get(name)
        if action is None:
            wrong.append(name)
            continue
        if not eq and action.nargs != 0 and i + 1 < len(arguments):
            value = arguments[i + 1]
        if not value or _is_placeholder(value):
            continue
        if action.choices and value not in action.choices:
            wrong.append(f"{name} {value} (choices: {', '.join(map(str, action.choices))})")
        elif action.type in KINDS and (eq or action.type is not bool_arg):  # a bare flag takes no value
            try:
                action.type(value)
            except (ValueError, argparse.ArgumentTypeError):
                wrong.append(f"{name} {value} (not {KINDS[action.type]})")
    return wrong


def test_the_pages_call_the_main_entry_points() -> None:
    called = {target[0] for c in documented_commands() if (target := entry_point(c.words))}
    assert {"train_scst", "predict", "evaluate", "demo", "export", "app", "data.prepare_coco"} <= called


def check_options(commands: list[tuple[str, str]]) -> tuple[set[str], list[str]]:
    """(the entry points that ``commands``, pairs of (file name, command), call; their options and values
    that the entry points do not accept)."""
    parsers: dict[str, argparse.ArgumentParser] = {}
    wrong = []
    for where, command in commands:
        target = entry_point(words_of(command))
        if target is None:
            continue
        module, arguments = target
        if module not in parsers:
            parsers[module] = entry_parser(module)
        wrong += [f"{where}: {w} in `{command}`" for w in wrong_options(parsers[module], arguments)]
    return set(parsers), wrong


def test_every_documented_option_exists() -> None:
    _, wrong = check_options([(c.page, c.text) for c in documented_commands()])
    assert not wrong, "options the entry points do not accept:\n" + "\n".join(wrong)


def test_the_scripts_call_the_entry_points_with_options_they_accept() -> None:
    """scripts/gpu_check.sh runs on a lent GPU machine for a few minutes: a renamed option must fail here,
    not there."""
    scripts = sorted((REPO / "scripts").glob("*.sh"))
    commands = [(s.name, c) for s in scripts for c in command_lines(s.read_text(encoding="utf-8"))]
    called, wrong = check_options(commands)
    benchmarks = {"bench_steps", "bench_scst", "bench_memory", "rehearsal"}
    assert {f"benchmarks.{name}" for name in benchmarks} <= called
    assert not wrong, "options the entry points do not accept:\n" + "\n".join(wrong)


def test_the_option_check_catches_a_wrong_option_and_value() -> None:
    text = "python predict.py --checkpoint x.pt --beam 3 --method beem --num-captions 2 [--format coco|csv]"
    module, arguments = entry_point(words_of(text))
    assert module == "predict"
    wrong = wrong_options(entry_parser(module), arguments)
    assert wrong == ["--beam", "--method beem (choices: greedy, beam, sample)"]
    arguments = words_of("train_scst.py --only-prefix=maybe --mapping_type=mpl --epochs 2 --lr FLOAT")[1:]
    wrong = wrong_options(entry_parser("train_scst"), arguments)
    assert wrong == ["--only_prefix maybe (not true or false)", "--mapping_type mpl (choices: mlp, transformer)"]
    wrong = wrong_options(entry_parser("benchmarks.bench_decode"), ["--batch_sizes", "8x", "--max-len", "20"])
    assert wrong == ["--batch_sizes 8x (not an integer)", "--max-len"]


def test_commands_are_split_joined_and_found_as_written() -> None:
    block = (
        "# a comment\n$ torchrun --standalone --nproc_per_node 8 train_scst.py \\\n    --batch_size 240  # total\n"
        "nice -n 10 .venv/bin/python -m data.prepare_coco --out d && make demo\n"
        "python predict.py --images a/ [--format coco|jsonl] | head\n"
    )
    commands = [words_of(c) for c in command_lines(block)]
    assert [entry_point(w) for w in commands] == [
        ("train_scst", ["--batch_size", "240"]),
        ("data.prepare_coco", ["--out", "d"]),
        None,
        ("predict", ["--images", "a/", "--format", "coco|jsonl"]),
        None,
    ]
    assert commands[2] == ["make", "demo"]


def test_make_targets_exist() -> None:
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(encoding="utf-8"), flags=re.M))
    wrong = [
        f"{c.page}: make {word}"
        for c in documented_commands()
        if c.words[0] == "make"
        for word in c.words[1:]
        if not word.startswith("-") and "=" not in word and word not in targets
    ]
    assert not wrong, wrong


def _prose(page: Path) -> str:
    """A page without its fenced blocks and inline code, where links are never meant."""
    text = re.sub(r"^ *```.*?^ *```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(page: Path) -> set[str]:
    """The anchors GitHub gives a page's headings (a repeated heading gets -1, -2, ...)."""
    text = re.sub(r"^ *```.*?^ *```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    seen: dict[str, int] = {}
    found = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(f"{slug}-{count}" if count else slug)
    return found


def links(page: Path) -> Iterator[str]:
    """Targets of a page's Markdown links and images and of its ``<img src>`` tags."""
    text = _prose(page)
    yield from re.findall(r"\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)", text)
    yield from re.findall(r"<img [^>]*src=\"([^\"]+)\"", text)


def test_every_relative_link_and_image_resolves() -> None:
    broken = []
    for page in PAGES:
        for link in links(page):
            if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in anchors(target):
                broken.append(f"{page.name}: {link} (no heading with that anchor in {target.name})")
    assert not broken, "\n".join(broken)


def test_the_link_check_sees_files_anchors_and_images(tmp_path: Path) -> None:
    page = tmp_path / "a.md"
    page.write_text(
        "# Title\n## Decoding speed (`bench.py`)\n## Step\n## Step\n```bash\n# not a heading [x](gone.md)\n```\n"
        '[x](b.md#step-1) ![i](img.png) `[y](code.md)` <img src="c.png" alt="c">\n'
    )
    assert anchors(page) == {"title", "decoding-speed-benchpy", "step", "step-1"}
    assert list(links(page)) == ["b.md#step-1", "img.png", "c.png"]


PACKAGES = ("benchmarks", "configs", "data", "engine", "metrics", "models", "scripts", "tests", "utils", "webapp")
# files of the paper's, X-VLM's and self-critical.pytorch's repositories that the pages name
OTHER_REPOSITORIES = {
    "configs/Captioning.yaml",
    "configs/Captioning_scst.yaml",
    "configs/config_swinB_224.json",
    "scripts/prepro_ngrams.py",
}


def named_sources(page: Path) -> Iterator[str]:
    """The project files and modules a page's inline code names: ``models/decoding.py``, ``metrics.cider.CiderD``."""
    prose = re.sub(r"^ *```.*?^ *```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    for code in re.findall(r"`([^`\n]+)`", prose):
        for word in code.split():
            word = word.strip("(),;:")
            path = re.fullmatch(rf"({'|'.join(PACKAGES)})/[\w./-]*\w", word)
            module = re.fullmatch(rf"({'|'.join(PACKAGES)})(\.\w+)+", word) and not re.search(
                r"\.(py|jsonl?|ya?ml|gz|txt|csv|md|png|pt)$", word
            )
            if (path and word not in OTHER_REPOSITORIES) or (module and word not in SCHEMA.leaves):
                yield word


def source_exists(name: str) -> bool:
    """A path of the tree, or a dotted name: its longest module or package prefix exists and defines or
    imports the next part (``models.load_captioner``, ``metrics.cider.CiderD``)."""
    if "/" in name:
        return (REPO / name).exists()
    parts = name.split(".")
    for length in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:length])
        source = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        if source.exists():
            rest = parts[length:]
            return not rest or rest[0] in defined_names(source)
    return False


def defined_names(source: Path) -> set[str]:
    """Names a module defines, imports or exports at its top level (functions, classes, assignments,
    imports, ``__all__``)."""
    names = set()
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if "__all__" in names and isinstance(node.value, ast.List):  # lazily exported names
                names.update(e.value for e in node.value.elts if isinstance(e, ast.Constant))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def test_every_named_source_file_and_module_exists() -> None:
    missing = [f"{page.name}: {name}" for page in PAGES for name in named_sources(page) if not source_exists(name)]
    assert not missing, "files or modules the pages name that the tree lacks:\n" + "\n".join(missing)


def test_the_source_check_sees_paths_and_modules(tmp_path: Path) -> None:
    page = tmp_path / "a.md"
    page.write_text(
        "See `models/decoding.py`, `metrics.cider.CiderD`, `data.augment`, (`data/gone.py`), `models.nothing`.\n"
    )
    names = list(named_sources(page))
    assert names == ["models/decoding.py", "metrics.cider.CiderD", "data/gone.py", "models.nothing"]
    assert [source_exists(n) for n in names] == [True, True, False, False]


def test_every_docs_page_is_linked_from_the_readme() -> None:
    linked = {(REPO / link.partition("#")[0]).resolve() for link in links(REPO / "README.md")}
    missing = [page.name for page in PAGES[1:] if page.resolve() not in linked]
    assert not missing, f"docs pages the README does not link: {missing}"


def test_the_readme_stays_a_front_door() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text


def test_the_configuration_page_names_every_config_key() -> None:
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| `?(top level|\w+)`? \| (.+) \|$", page, flags=re.M))
    named = {
        key if section == "top level" else f"{section}.{key}"
        for section, cells in rows.items()
        for key in re.findall(r"(?:^|, )`(\w+)`", cells)
    }
    missing = sorted(set(SCHEMA.leaves) - named)
    unknown = sorted(named - set(SCHEMA.leaves))
    assert not missing and not unknown, f"docs/configuration.md lacks {missing}; names unknown keys {unknown}"
