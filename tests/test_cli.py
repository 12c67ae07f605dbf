"""The one command-line dialect: generated --help of every entry point, boolean spellings, aliases,
refused ambiguity, tracebacks of unexpected errors in train.log, and plain progress lines in log files."""

from __future__ import annotations

import argparse
import dataclasses
import io
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
from faults import subprocess_env, train_command
from PIL import Image

import app
import demo
import evaluate
import export
import predict
import train_scst
from data import prepare_coco, prepare_custom, synthetic
from engine.config import CONFIG_DIR, SCHEMA, Config, build_config, parse_overrides
from utils import plot
from utils.cli import ArgumentParser, UsageError, add_flag, add_schema_options, schema_overrides
from utils.config import ConfigError, Schema, option, section
from utils.progress import progress

REPO = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {
    "train_scst.py": train_scst.main, "demo.py": demo.main, "predict.py": predict.main,
    "evaluate.py": evaluate.main, "export.py": export.main, "app.py": app.main,
    "data.prepare_coco": prepare_coco.main, "data.prepare_custom": prepare_custom.main,
    "data.synthetic": synthetic.main, "utils.plot": plot.main,
}  # fmt: skip
TYPES = re.compile(r" (INT|FLOAT|STR|BOOL|PATH|YAML|FILE|\{[^}]+\})( \[.*\])?$")


def help_entries(text: str) -> dict[str, tuple[str, str]]:
    """argparse help -> ``{first option: (invocation, help text)}`` for every option listed."""
    entries: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("  -"):
            invocation, _, rest = line.strip().partition("  ")
            current = invocation.split(",")[0].split(" ")[0]
            entries[current] = [invocation, rest.strip()]
        elif current and line.startswith("      ") and line.strip():
            entries[current][1] = f"{entries[current][1]} {line.strip()}".strip()
        else:
            current = None
    return {name: (invocation, meaning) for name, (invocation, meaning) in entries.items()}


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_help_lists_every_option_with_type_and_meaning(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    assert ENTRY_POINTS[name](["--help"]) == 0
    entries = help_entries(capsys.readouterr().out)
    entries.pop("-h")
    assert len(entries) >= 2
    for option_name, (invocation, meaning) in entries.items():
        assert TYPES.search(invocation), f"{name} {option_name}: no type in {invocation!r}"
        assert len(meaning) > 8, f"{name} {option_name}: no meaning"


def _walk(obj, prefix: str = ""):
    """(dotted key, default) of every field of a config instance, sections flattened."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _walk(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def _shown(value) -> str:
    return str(value).lower() if value is None or isinstance(value, bool) else str(value)


def test_train_help_is_the_schema_with_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    assert train_scst.main(["--help"]) == 0
    entries = help_entries(capsys.readouterr().out)
    leaves = dict(_walk(Config()))
    assert len(leaves) == len(SCHEMA.leaves) == 83
    assert set(entries) == {f"--{key}" for key in leaves} | {"-h", "--config", "--print_config"}
    for key, value in leaves.items():
        assert f"(default: {_shown(value)})" in entries[f"--{key}"][1], key
    assert entries["--train.batch_size"][0] == "--train.batch_size, --batch_size, --bs INT"
    assert entries["--train.lr"][1] == "peak learning rate (AdamW) (default: 2e-05)"
    assert entries["--model.mapping_type"][0].endswith("{mlp,transformer}")
    assert entries["--encoder.checkpoint"][0] == "--encoder.checkpoint PATH"  # no short name: --checkpoint is taken


def _namespace(parsed: argparse.Namespace | int) -> argparse.Namespace:
    assert isinstance(parsed, argparse.Namespace), f"usage error (exit status {parsed})"
    return parsed


def _synthetic_force(argv: list[str]) -> bool:
    """data.synthetic's --force, seen in what main does: regenerate (True) or reuse an identical set."""
    calls: list[bool] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(synthetic, "generate_dataset", lambda out, **_: calls.append(True) or SimpleNamespace(root=out))
        patch.setattr(synthetic, "ensure_dataset", lambda out, **_: calls.append(False) or SimpleNamespace(root=out))
        assert synthetic.main(argv) == 0
    assert len(calls) == 1
    return calls[0]


# Entry point -> (a boolean option of it, other options it needs, the option's value after parsing argv).
BOOLEAN_OPTIONS = {
    "train_scst.py": ("--print_config", ["--batch_size", "3"],
                      lambda argv: train_scst.build_parser().parse_args(argv).print_config),
    "demo.py": ("--only_prefix", ["--output_dir", "o"],  # a config option: what both of the demo's stages get
                lambda argv: build_config([CONFIG_DIR / "demo.yaml"],
                                          demo.shared_overrides(demo.build_parser().parse_args(argv))).model.only_prefix),
    "predict.py": ("--no_progress", ["--checkpoint", "c.pt", "--images", "x.jpg"],
                   lambda argv: predict.build_parser().parse_args(argv).no_progress),
    "evaluate.py": ("--no_spice", ["--results", "r.json", "--annotations", "a.json"],
                    lambda argv: _namespace(evaluate.parse_args(argv)).no_spice),
    "export.py": ("--overwrite", ["--checkpoint", "c.pt", "--out", "o"],
                  lambda argv: _namespace(export.parse_args(argv)).overwrite),
    "app.py": ("--share", ["--port", "0"], lambda argv: _namespace(app.parse_args(argv)).share),
    "data.prepare_coco": ("--drop_missing", ["--karpathy", "k.json", "--image_root", "i", "--out", "o"],
                          lambda argv: _namespace(prepare_coco.parse_args(argv)).drop_missing),
    "data.prepare_custom": ("--skip_invalid", ["--image_root", "i", "--out", "o"],
                            lambda argv: _namespace(prepare_custom.parse_args(argv)).skip_invalid),
    "data.synthetic": ("--force", ["--out", "o"], _synthetic_force),
}  # fmt: skip
SPELLINGS = [
    (["{flag}"], True), (["{flag}=True"], True), (["{flag}", "False"], False), (["{dashed}", "no"], False),
    (["{flag}", "--next_option"], True), ([], False),
]  # fmt: skip


def test_every_entry_point_but_plot_has_a_boolean_option_to_check(capsys, monkeypatch):
    assert set(BOOLEAN_OPTIONS) == set(ENTRY_POINTS) - {"utils.plot"}
    monkeypatch.setenv("COLUMNS", "120")
    assert plot.main(["--help"]) == 0
    invocations = [invocation for invocation, _ in help_entries(capsys.readouterr().out).values()]
    assert invocations == ["-h, --help", "--out PATH", "--title STR"]  # no BOOL option to spell


@pytest.mark.parametrize("spelling,expected", SPELLINGS, ids=lambda v: " ".join(v) if isinstance(v, list) else v)
@pytest.mark.parametrize("name", BOOLEAN_OPTIONS)
def test_booleans_of_every_entry_point_take_every_spelling(name, spelling, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flag, needed, value_of = BOOLEAN_OPTIONS[name]
    tokens = [t.format(flag=flag, dashed="--" + flag[2:].replace("_", "-")) for t in spelling]
    # "--next_option": the flag followed by another option (the ones it needs), not by a value
    argv = [tokens[0], *needed] if tokens[-1:] == ["--next_option"] else [*needed, *tokens]
    assert value_of(argv) is expected


def test_reference_spellings_short_names_and_dotted_names_agree():
    reference = parse_overrides(["--bs", "7", "--lamda", "0.3", "--use_sparce_mask", "False", "--out_dir", "o"])
    short = parse_overrides(["--batch_size=7", "--aux_weight", "0.3", "--use_sparse_mask=no", "--output_dir", "o"])
    dotted = parse_overrides(["--train.batch_size", "7", "--train.aux_weight=0.3", "--model.use_sparse_mask=false",
                              "--output_dir", "o"])  # fmt: skip
    assert reference == short == dotted
    cfg = build_config([], dotted)
    assert (cfg.train.batch_size, cfg.train.aux_weight, cfg.model.use_sparse_mask) == (7, 0.3, False)


def test_unknown_flags_and_abbreviations_are_errors_naming_candidates(capsys):
    assert train_scst.main(["--thresh", "0.2"]) == 2  # argparse would take a unique prefix; we do not
    assert "unknown option --thresh (did you mean --threshold or --model.threshold" in capsys.readouterr().err
    assert train_scst.main(["--train.sed", "3"]) == 2
    assert "did you mean --train.seed" in capsys.readouterr().err
    with pytest.raises(UsageError, match="unexpected argument '0.1'"):
        parse_overrides(["0.1"])


@dataclass
class _Part:
    """a part"""

    seed: int = option(0, "the part's seed")


@dataclass
class _QuietPart:
    """a part whose seed has no short name"""

    seed: int = option(0, "the part's seed", short=False)


@dataclass
class _Clash:
    first: _Part = section(_Part)
    second: _Part = section(_Part)


@dataclass
class _Resolved:
    first: _Part = section(_Part)
    second: _QuietPart = section(_QuietPart)


@dataclass
class _Neither:
    first: _QuietPart = section(_QuietPart)
    second: _QuietPart = section(_QuietPart)


def test_a_short_name_shared_by_two_fields_is_refused_where_declared(tmp_path):
    with pytest.raises(TypeError, match=r"^option name 'seed' would mean both first\.seed and second\.seed: "
                                        r"declare one of them with short=False$"):  # fmt: skip
        Schema(_Clash)
    schema = Schema(_Resolved)
    parser = ArgumentParser(prog="t")
    add_schema_options(parser, schema)
    assert schema_overrides(parser.parse_args(["--seed", "4"]), schema) == {"first.seed": "4"}
    assert schema_overrides(parser.parse_args(["--second.seed", "5"]), schema) == {"second.seed": "5"}
    parser = ArgumentParser(prog="t")
    add_schema_options(parser, Schema(_Neither))
    with pytest.raises(UsageError, match=r"unknown option --seed \(did you mean --first.seed or --second.seed\?\)"):
        parser.parse_args(["--seed", "1"])
    # the same refusal for overrides and flat YAML keys, and the full names still work
    schema = Schema(_Neither)
    candidates = r"unknown option 'seed' \(did you mean first\.seed or second\.seed\?\)"
    with pytest.raises(ConfigError, match=f"^{candidates}$"):
        schema.resolve("seed")
    with pytest.raises(ConfigError, match=f"^{candidates}$"):
        schema.build([], {"seed": "3"})
    flat = tmp_path / "flat.yaml"
    flat.write_text("seed: 3\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(flat.resolve()))}: {candidates}$"):
        schema.build([flat])
    cfg = schema.build([], {"second.seed": "3"})
    assert (cfg.first.seed, cfg.second.seed) == (0, 3)


def test_flag_spellings_on_a_plain_parser():
    parser = ArgumentParser(prog="t")
    add_flag(parser, "--force", "do it")
    parser.add_argument("paths", nargs="*")
    assert parser.parse_args(["--force", "a", "b"]).paths == ["a", "b"]  # a path is not taken as the value
    assert parser.parse_args(["--force", "off", "a"]).force is False
    with pytest.raises(UsageError, match="expected true or false, got 'maybe'"):
        parser.parse_args(["--force=maybe"])


def test_plain_lines_instead_of_bar_frames_when_not_a_terminal():
    stream = io.StringIO()
    for _ in progress(range(95), desc="work", unit="img", stream=stream):
        pass
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 10 and lines[0].startswith("work: 10/95 img (11%), ") and lines[-1].startswith("work: 95/95")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    for _ in progress(range(5), desc="work", stream=terminal):
        pass
    assert "\r" in terminal.getvalue()  # tqdm's bar, as before, on a terminal


def test_predict_writes_plain_progress_lines_to_a_log_file(tiny_checkpoint, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(12):
        Image.new("RGB", (40, 30), (20 * i, 90, 200 - 10 * i)).save(images / f"{i:02d}.png")
    log = tmp_path / "stderr.log"
    command = [
        sys.executable,
        str(REPO / "predict.py"),
        "--checkpoint",
        str(tiny_checkpoint),
        "--images",
        str(images),
        "--batch_size",
        "2",
        "--num_workers",
        "0",
        "--output",
        str(tmp_path / "o.json"),
    ]
    with log.open("w") as stderr:
        done = subprocess.run(command, stderr=stderr, stdout=subprocess.DEVNULL, env=subprocess_env(), timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text
    progress_lines = [line for line in text.splitlines() if line.startswith("captioning: ")]
    assert [line.split(" img")[0] for line in progress_lines] == [f"captioning: {n}/12" for n in range(2, 13, 2)]


def test_unexpected_error_keeps_its_traceback_in_train_log(tmp_path, capsys, monkeypatch):
    data = synthetic.generate_dataset(tmp_path / "data", num_train=16, num_val=4, num_test=4, image_size=64).root
    out = tmp_path / "run"

    def broken_test(self, *args, **kwargs):
        raise KeyError("a bug in testing")

    monkeypatch.setattr("engine.runner.Run._final_test", broken_test)  # after an epoch and its validation
    argv = train_command(data, out, "--num_workers", "0", "--epochs", "1", "--max_steps_per_epoch", "2")[2:]
    assert train_scst.main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"train_scst.py: error: KeyError: 'a bug in testing' (traceback in {out / 'train.log'})"
    )
    assert "Traceback" not in err and "\r" not in err and "epoch 1" in err  # plain progress lines, no bar frames
    log = (out / "train.log").read_text()
    assert "Traceback (most recent call last)" in log and "in broken_test" in log
    assert "KeyError: 'a bug in testing'" in log
