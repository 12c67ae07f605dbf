"""One configuration system: typed defaults in code, YAML files holding only what differs, command-line
overrides, unknown keys rejected."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class EncoderConfig:
    vision_config: str = "xvlm_swin_b_224"  # preset name or X-VLM Swin JSON file
    checkpoint: str | None = None  # X-VLM checkpoint; None builds random weights (tests, demo)
    image_res: int | None = None  # None: the vision config's resolution
    frozen: bool = True
    # Stochastic depth of the Swin blocks in training mode. The reference builds Swin with 0.1 and its
    # model.train() turns it on in the frozen encoder too; 0 gives deterministic features (feature caching)
    drop_path: float = 0.1


@dataclass
class ModelConfig:
    mapping_type: str = "mlp"  # mlp | transformer
    prefix_length: int | None = None  # None: one prefix position per visual token (50)
    mapper_layers: int = 6
    mapper_heads: int = 8
    gpt2: str = "gpt2"  # hub name or local directory of pretrained weights
    gpt2_config: dict | None = None  # GPT2Config fields: build random weights instead of loading
    tokenizer: str = "gpt2"
    only_prefix: bool = False  # freeze GPT-2, train the mapper (and mask) only
    use_sparse_mask: bool = True
    sparse_mask_mode: str = "hard"  # hard (reference: a fixed threshold, never learns) | ste (learns)
    threshold: float = 0.1
    # full: softmax over GPT-2's 50257 tokens; train: over the tokens of the training captions only
    # (and the stop tokens), which makes the output layer cheaper; kept by checkpoints trained with it
    output_vocab: str = "full"


@dataclass
class DataConfig:
    image_root: str = "datasets/coco/images"
    train_file: str = "datasets/coco/annotations/train.json"
    val_file: str = "datasets/coco/annotations/val.json"
    test_file: str = "datasets/coco/annotations/test.json"
    cider_df: str | None = "datasets/coco/annotations/cider_df.json.gz"  # None: computed from train_file
    synthetic: bool = False  # generate the built-in demo data set into image_root unless one is there
    max_words: int = 30
    max_tokens: int = 30  # GPT-2 tokens per training caption (longer ones are cut, as in the reference)
    augment: bool = True
    cache_features: bool = False  # encode each image once (frozen encoder, no augmentation; memory-mapped file)
    feature_cache_dir: str | None = None  # keep the features there for later runs and the node's other processes
    feature_cache_dtype: str = "float16"  # float16 | float32: storage of the cached features
    num_workers: int = 4


@dataclass
class TrainConfig:
    epochs: int = 10
    # Length of the learning-rate schedule in steps (None: epochs x steps per epoch); the run ends after
    # train.epochs or total_steps, whichever comes first
    total_steps: int | None = None
    batch_size: int = 30  # per step, over all processes
    lr: float = 2e-5
    weight_decay: float = 0.01
    decay_norm_and_bias: bool = True  # false: no weight decay on biases and LayerNorm parameters
    adam_beta2: float = 0.999
    adam_eps: float = 1e-6  # transformers' AdamW default, which the reference's XE stage uses
    warmup_ratio: float = 0.01
    grad_clip: float = 0.0  # 0: no clipping
    label_smoothing: float = 0.0
    use_aux_loss: bool = True
    aux_weight: float = 0.1
    aux_text_tokens: int = 20  # the N-pair loss's text embedding: mean of the first N caption tokens
    precision: str = "fp32"  # fp32 | bf16 | fp16 | auto (bf16 on CUDA, fp32 on CPU)
    seed: int = 42
    max_steps_per_epoch: int | None = None  # cap on steps per epoch (quick runs)
    save_every_steps: int = 1000  # also checkpoint mid-epoch every N steps (0: at epoch ends only)
    stop_after_steps: int | None = None  # stop with a checkpoint after N steps of this invocation
    log_every: int = 50
    eval_batch_size: int = 64
    eval_split: str = "val"  # split evaluated each epoch to pick the best checkpoint
    val_meteor: bool = True  # METEOR at each validation too (Java, ~4 s per 1,000 images); test always has it
    report_to: str = "none"  # none | tensorboard | wandb | tensorboard,wandb: live dashboards (utils/reporting.py)


@dataclass
class ScstConfig:
    num_samples: int = 5
    baseline: str = "greedy"  # greedy (reference) | mean (mean of the other samples)
    sample_max_len: int = 20  # also the greedy baseline's
    sample_min_len: int = 0  # the reference passes no minimum length to its sampler
    temperature: float = 1.0
    length_norm: bool = True  # average log-probabilities over each sample's tokens
    dropout: bool = True  # sample with dropout on, as the reference does; false samples the test-time model
    # auto: sampling and the greedy baseline on a static KV cache (CUDA graphs for the baseline on CUDA);
    # off: Hugging Face's dynamic cache. Same tokens for the same draws (README: SCST decoding speed)
    fast_decode: str = "auto"
    # Score captions and references as "words <eos>" (the reference's wrap; its coco-train-words.p counts
    # <eos>), so the reward sees whether a caption ended; false scores the bare words
    reward_eos: bool = True


@dataclass
class DecodeConfig:
    """Test-time decoding (and SCST's validation); XE always validates greedily. The defaults are the
    reference's XE evaluation: greedy, up to 30 tokens."""

    beams: int = 1
    max_len: int = 30
    min_len: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram: int = 0


@dataclass
class Config:
    scst: bool = False
    checkpoint: str | None = None  # weights to start from (required for SCST)
    resume: bool = False  # continue the run in output_dir from its last checkpoint
    output_dir: str = "runs/opg"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scst_opts: ScstConfig = field(default_factory=ScstConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)


# Spellings of the reference command lines.
ALIASES = {
    "use_sparce_mask": "model.use_sparse_mask",
    "lamda": "train.aux_weight",
    "bs": "train.batch_size",
    "out_dir": "output_dir",
}
PATH_KEYS = (
    "checkpoint", "output_dir", "encoder.checkpoint", "data.image_root", "data.train_file",
    "data.val_file", "data.test_file", "data.cider_df", "data.feature_cache_dir",
)  # fmt: skip
_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


class ConfigError(ValueError):
    """A configuration file or command-line option that cannot be applied."""


def _leaf_types(cls: type = Config, prefix: str = "") -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    leaves: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            leaves.update(_leaf_types(hint, f"{prefix}{f.name}."))
        else:
            leaves[f"{prefix}{f.name}"] = hint
    return leaves


LEAF_TYPES = _leaf_types()


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(type, optional) of a hint such as ``int | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


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


def _coerce(key: str, value: Any) -> Any:
    kind, optional = _base_type(LEAF_TYPES[key])
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{key} cannot be empty")
    try:
        if kind is bool:
            return parse_bool(value, key)
        if kind is dict:
            value = yaml.safe_load(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            return value
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}: cannot read {value!r} as {kind.__name__}") from err


def _resolve_key(name: str) -> str:
    name = name.replace("-", "_")
    if name in ALIASES:
        return ALIASES[name]
    if name in LEAF_TYPES:
        return name
    matches = [k for k in LEAF_TYPES if k.rsplit(".", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"option --{name} is ambiguous: use one of {', '.join('--' + m for m in matches)}")
    hint = difflib.get_close_matches(name, list(LEAF_TYPES) + list(ALIASES), n=1)
    raise ConfigError(f"unknown option {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and not (full in LEAF_TYPES and _base_type(LEAF_TYPES[full])[0] is dict):
            flat.update(_flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


def load_yaml(path: str | Path) -> dict[str, Any]:
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
    values = load_yaml(path.parent / base) if base else {}
    for raw_key, value in _flatten(tree).items():
        try:
            key = _resolve_key(raw_key)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from err
        if key in PATH_KEYS and isinstance(value, str) and not Path(value).expanduser().is_absolute():
            value = os.path.normpath(path.parent / value)
        values[key] = _coerce(key, value)
    return values


def parse_overrides(tokens: Sequence[str]) -> dict[str, str | bool]:
    """Command-line tokens -> ``{dotted key: raw value}``. Accepts ``--k v``, ``--k=v`` and a bare
    ``--flag`` for booleans."""
    overrides: dict[str, str | bool] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r} (options look like --name value)")
        name, eq, value = token[2:].partition("=")
        key = _resolve_key(name)
        if not eq:
            nxt = tokens[i + 1] if i + 1 < len(tokens) else None
            is_bool = _base_type(LEAF_TYPES[key])[0] is bool
            if nxt is None or nxt.startswith("--"):
                if not is_bool:
                    raise ConfigError(f"option --{name} needs a value")
                value = "true"
            else:
                value, i = nxt, i + 1
        overrides[key] = value
        i += 1
    return overrides


def _set(cfg: Config, key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    target = cfg
    for section in sections:
        target = getattr(target, section)
    setattr(target, leaf, value)


def build_config(files: Sequence[str | Path] = (), overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then each YAML file in order, then overrides (raw strings or typed values)."""
    cfg = Config()
    for path in files:
        for key, value in load_yaml(path).items():
            _set(cfg, key, value)
    for name, value in (overrides or {}).items():
        key = _resolve_key(name)
        _set(cfg, key, _coerce(key, value))
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject values that would only fail later, deep inside a run."""
    choices = {
        "model.mapping_type": ("mlp", "transformer"),
        "model.sparse_mask_mode": ("ste", "hard"),
        "model.output_vocab": ("full", "train"),
        "train.precision": ("auto", "fp32", "bf16", "fp16"),
        "scst_opts.baseline": ("greedy", "mean"),
        "scst_opts.fast_decode": ("auto", "off"),
        "train.eval_split": ("val", "test"),
    }
    for key, allowed in choices.items():
        value = get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
    if cfg.train.batch_size < 1 or cfg.train.epochs < 0 or cfg.decode.beams < 1:
        raise ConfigError("train.batch_size and decode.beams must be >= 1, train.epochs >= 0")
    if cfg.data.cache_features and (cfg.data.augment or not cfg.encoder.frozen or cfg.encoder.drop_path > 0):
        raise ConfigError(
            "data.cache_features needs deterministic features: a frozen encoder, data.augment=false and "
            "encoder.drop_path=0"
        )
    if cfg.train.total_steps is not None and cfg.train.total_steps < 1:
        raise ConfigError(f"train.total_steps must be >= 1 or empty, got {cfg.train.total_steps}")
    if not 0.0 < cfg.model.threshold < 1.0:
        raise ConfigError(f"model.threshold must be in (0, 1), got {cfg.model.threshold}")


def get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a config saved with :func:`to_dict` (e.g. inside a checkpoint); unknown keys rejected."""
    cfg = Config()
    for key, value in _flatten(tree).items():
        _set(cfg, _resolve_key(key), value)
    return cfg


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
