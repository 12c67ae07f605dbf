"""Config system: defaults, YAML inheritance, command-line overrides and the reference's spellings."""

import re
from pathlib import Path

import pytest
import yaml

import train_scst
from engine.config import CONFIG_DIR, build_config, from_dict, parse_overrides
from utils.config import ConfigError, parse_bool, to_dict

PAPER_XE = [
    "--scst=False", "--device=cuda:0", "--mapping_type=mlp", "--use_sparce_mask=True", "--use_aux_loss=True",
    "--threshold=0.1", "--lamda=0.1",
]  # fmt: skip


@pytest.mark.parametrize("text,expected", [("True", True), ("false", False), ("1", True), ("no", False)])
def test_parse_bool_spellings(text, expected):
    assert parse_bool(text) is expected


def test_parse_bool_rejects_garbage():
    with pytest.raises(ConfigError, match=r"^value: expected a boolean \(true/false\), got 'maybe'$"):
        parse_bool("maybe")


@pytest.mark.parametrize(
    "argv,expected",
    [(["--only_prefix"], True), (["--only_prefix=True"], True), (["--only_prefix", "False"], False),
     (["--only_prefix=false"], False), (["--only_prefix", "--lr", "1e-4"], True)],
)  # fmt: skip
def test_boolean_flags_in_every_spelling(argv, expected):
    cfg = build_config([], parse_overrides(argv))
    assert cfg.model.only_prefix is expected


def test_paper_xe_command_means_what_it_says():
    cfg = build_config([CONFIG_DIR / "xe.yaml"], parse_overrides(PAPER_XE))
    assert cfg.scst is False
    assert cfg.device == "cuda:0"
    assert cfg.model.mapping_type == "mlp"
    assert cfg.model.use_sparse_mask is True
    assert cfg.train.use_aux_loss is True
    assert cfg.model.threshold == pytest.approx(0.1)
    assert cfg.train.aux_weight == pytest.approx(0.1)


def test_false_flags_are_false():
    cfg = build_config([], parse_overrides(["--use_aux_loss", "False", "--use_sparce_mask=False"]))
    assert cfg.train.use_aux_loss is False and cfg.model.use_sparse_mask is False


def test_print_config_for_paper_commands(capsys):
    assert train_scst.main([*PAPER_XE, "--print_config"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert (out["scst"], out["model"]["use_sparse_mask"], out["device"]) == (False, True, "cuda:0")
    assert train_scst.main(["--scst=True", "--checkpoint", "x.pt", "--print_config"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert (out["scst"], out["train"]["lr"], out["train"]["batch_size"]) == (True, 5e-6, 7)


def test_unknown_and_ambiguous_options_are_rejected(capsys):
    assert train_scst.main(["--treshold=0.2"]) == 2
    assert capsys.readouterr().err == (
        "train_scst.py: error: unknown option --treshold (did you mean --threshold or --model.threshold?)\n"
    )
    with pytest.raises(ConfigError, match="unexpected argument '0.1'"):
        parse_overrides(["0.1"])


def test_the_real_schemas_shared_last_name_means_the_top_level_key(tmp_path: Path):
    """checkpoint and encoder.checkpoint both end in "checkpoint": the top-level key owns the name, and
    encoder.checkpoint answers to its dotted name only."""
    assert parse_overrides(["--checkpoint", "x.pt"]) == {"checkpoint": "x.pt"}
    assert parse_overrides(["--encoder.checkpoint", "e.pt"]) == {"encoder.checkpoint": "e.pt"}
    (tmp_path / "c.yaml").write_text("checkpoint: x.pt\nencoder:\n  checkpoint: e.pt\n")
    cfg = build_config([tmp_path / "c.yaml"])
    assert (cfg.checkpoint, cfg.encoder.checkpoint) == (str(tmp_path / "x.pt"), str(tmp_path / "e.pt"))


def test_bad_values_name_the_option():
    with pytest.raises(ConfigError, match=r"^train\.lr: cannot read 'fast' as float$"):
        build_config([], {"train.lr": "fast"})
    with pytest.raises(ConfigError, match=r"^model\.mapping_type must be one of mlp, transformer; got 'lstm'$"):
        build_config([], {"model.mapping_type": "lstm"})


def test_yaml_inheritance_and_relative_paths(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("train:\n  lr: 0.5\ndata:\n  train_file: ann/train.json\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  epochs: 3\n")
    cfg = build_config([tmp_path / "child.yaml"], {"epochs": "4"})
    assert cfg.train.lr == 0.5 and cfg.train.epochs == 4
    assert cfg.data.train_file == str(tmp_path / "ann" / "train.json")


def test_unknown_yaml_key_names_the_file(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: 1\n")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(bad.resolve()))}: unknown option 'train.learning_rate'"):
        build_config([bad])


def test_dict_round_trip():
    cfg = build_config([CONFIG_DIR / "demo.yaml"])
    assert to_dict(cfg) != to_dict(build_config())  # a config that differs from the defaults
    assert from_dict(to_dict(cfg)) == cfg


def test_the_scst_stage_runs_without_the_sparse_mask_and_keeps_its_weights(capsys):
    """As the reference's SCST stage: its sampling, baseline and evaluation pass no mask to generate."""
    xe = build_config([CONFIG_DIR / "xe.yaml"])
    scst = build_config([CONFIG_DIR / "scst.yaml"])
    assert xe.model.use_sparse_mask and xe.model.apply_sparse_mask
    assert scst.model.use_sparse_mask and not scst.model.apply_sparse_mask  # built (loaded), not applied
    kept = build_config([CONFIG_DIR / "scst.yaml"], parse_overrides(["--apply_sparse_mask"]))
    assert kept.model.apply_sparse_mask
    for argv, applied in (([], True), (["--scst=True", "--checkpoint", "x.pt"], False)):
        capsys.readouterr()
        assert train_scst.main([*argv, "--print_config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["model"]["apply_sparse_mask"] is applied


CACHEABLE = {"data.augment": False, "encoder.drop_path": 0.0}  # with data.cache_features


@pytest.mark.parametrize(
    "overrides, message",
    [({"train.accum_steps": 0}, "train.batch_size, train.accum_steps and decode.beams must be >= 1, train.epochs >= 0"),
     ({"train.epochs": -1}, "train.batch_size, train.accum_steps and decode.beams must be >= 1, train.epochs >= 0"),
     ({"data.cache_features": True, **CACHEABLE, "encoder.drop_path": 0.1}, "data.cache_features needs deterministic "
      "features: a frozen encoder, data.augment=false and encoder.drop_path=0"),
     ({"data.cache_features": True, **CACHEABLE, "data.val_shards": "v-{0..1}.tar"}, "data.train_shards and "
      "data.val_shards stream the images: no data.cache_features, and no model.output_vocab=train with train_shards"),
     ({"data.shuffle_buffer": 0}, "data.train_samples (when given) and data.shuffle_buffer must be >= 1"),
     ({"train.total_steps": 0}, "train.total_steps must be >= 1 or empty, got 0"),
     ({"train.collapse_warn": 1.5}, "train.collapse_warn must be in [0, 1], got 1.5"),
     ({"model.threshold": 1.0}, "model.threshold must be in (0, 1), got 1.0"),
     ({"scst": True, "scst_opts.num_samples": 0}, "scst_opts.num_samples must be >= 1 with scst_opts.baseline greedy, "
      "got 0"),
     ({"scst": True, "scst_opts.baseline": "mean", "scst_opts.num_samples": 1}, "scst_opts.num_samples must be >= 2 "
      "with scst_opts.baseline mean, got 1")],
)  # fmt: skip
def test_combinations_that_would_fail_inside_a_run_are_refused_at_once(overrides: dict, message: str):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        build_config([], overrides)


@pytest.mark.parametrize(
    "overrides",
    [{"data.cache_features": True, **CACHEABLE},
     {"scst": True, "scst_opts.baseline": "mean", "scst_opts.num_samples": 2},
     {"scst_opts.baseline": "mean", "scst_opts.num_samples": 1}, {"train.total_steps": 1, "train.collapse_warn": 0.0},
     {"data.train_samples": 1, "data.shuffle_buffer": 1, "train.epochs": 0}],
)  # fmt: skip
def test_the_edges_of_those_combinations_are_accepted(overrides: dict):
    """Each rule's boundary case, and SCST options outside an SCST run (ignored there)."""
    cfg = build_config([], overrides)
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        assert getattr(getattr(cfg, section) if section else cfg, name) == value
