"""The training run's configuration: the captioner's sections (``models/config.py``) plus data,
optimisation and SCST. Defaults in code hold the reference recipe; ``configs/*.yaml`` hold what differs;
the command line overrides both (``utils/cli.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.config import CaptionerConfig
from utils.cli import ArgumentParser, add_schema_options, schema_overrides
from utils.config import ConfigError, Schema, option, section
from utils.precision import PRECISIONS

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
FEATURE_CACHE_DTYPES = ("float16", "float32")
EVAL_SPLITS = ("val", "test")
SCST_BASELINES = ("greedy", "mean")
FAST_DECODE_MODES = ("auto", "static", "graphs", "off")
BAD_SHARD_POLICIES = ("error", "skip")


@dataclass
class DataConfig:
    """data set and input pipeline"""

    image_root: str = option(
        "datasets/coco/images", "folder the annotation files' image paths are relative to", path=True
    )
    train_file: str = option("datasets/coco/annotations/train.json", "training split file", path=True)
    val_file: str = option("datasets/coco/annotations/val.json", "validation split file", path=True)
    test_file: str = option("datasets/coco/annotations/test.json", "test split file", path=True)
    cider_df: str | None = option(
        "datasets/coco/annotations/train_cider_df.json.gz",
        "CIDEr-D document frequencies (none: from train_file)",
        path=True,
    )
    synthetic: bool = option(False, "generate the built-in demo data set into image_root unless one is there")
    max_words: int = option(30, "words kept per caption")
    max_tokens: int = option(30, "GPT-2 tokens per training caption (longer ones are cut, as in the reference)")
    augment: bool = option(True, "random crops, flips and RandomAugment in training")
    cache_features: bool = option(False, "encode each image once (frozen encoder, no augmentation)")
    feature_cache_dir: str | None = option(
        None, "keep cached features there for later runs (none: a private temporary folder)", path=True
    )
    feature_cache_dtype: str = option("float16", "storage of the cached features", choices=FEATURE_CACHE_DTYPES)
    num_workers: int = option(4, "image loading processes per training process")
    train_shards: str | None = option(
        None, "training from WebDataset shards (brace notation, several joined by ::) instead of train_file"
    )
    val_shards: str | None = option(None, "validation images from WebDataset shards instead of val_file")
    train_samples: int | None = option(None, "samples per epoch of train_shards (none: from their *_stats.json)")
    shuffle_buffer: int = option(1000, "samples each shard reader shuffles among (train_shards)")
    on_bad_shard: str = option("error", "a shard that cannot be read stops the run (error) or is skipped",
                               choices=BAD_SHARD_POLICIES)  # fmt: skip


@dataclass
class TrainConfig:
    """optimisation, precision, checkpoints and validation"""

    epochs: int = option(10, "passes over the training split")
    # The run ends after train.epochs or total_steps, whichever comes first
    total_steps: int | None = option(None, "learning-rate schedule length in steps (none: epochs x steps per epoch)")
    batch_size: int = option(30, "images per optimizer step, over all processes and micro-batches")
    accum_steps: int = option(1, "micro-batches per optimizer step (gradient accumulation; the same step)")
    grad_checkpointing: bool = option(False, "recompute GPT-2's and the transformer mapper's activations in backward")
    compile: bool = option(False, "torch.compile the XE training forward (one graph for all batch and caption sizes)")
    lr: float = option(2e-5, "peak learning rate (AdamW)")
    weight_decay: float = option(0.01, "AdamW weight decay")
    decay_norm_and_bias: bool = option(True, "also decay biases and LayerNorm parameters")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_eps: float = option(1e-6, "AdamW epsilon (transformers' default, used by the reference's XE stage)")
    warmup_ratio: float = option(0.01, "share of the steps with a linear warm-up")
    grad_clip: float = option(0.0, "gradient norm clipping (0: none)")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy")
    use_aux_loss: bool = option(True, "add the N-pair loss between prefix and caption embeddings")
    aux_weight: float = option(0.1, "weight of the N-pair loss")
    aux_text_tokens: int = option(20, "N-pair loss: mean of the first N caption tokens")
    precision: str = option("fp32", "autocast precision (auto: bf16 on CUDA, fp32 on CPU)", choices=PRECISIONS)
    seed: int = option(42, "random seed (each process adds its rank)")
    max_steps_per_epoch: int | None = option(None, "cap on steps per epoch (quick runs)")
    save_every_steps: int = option(1000, "also checkpoint every N steps within an epoch (0: at epoch ends only)")
    stop_after_steps: int | None = option(None, "stop with a checkpoint after N steps of this invocation")
    log_every: int = option(50, "steps between log lines")
    eval_batch_size: int = option(64, "images per validation / test batch")
    eval_split: str = option("val", "split evaluated each epoch to pick the best checkpoint", choices=EVAL_SPLITS)
    val_meteor: bool = option(True, "METEOR at each validation too (Java, ~4 s per 1,000 images)")
    # One caption for every image is how a prefix captioner collapses; below this share of distinct
    # captions (10 images per caption on average) each validation warns, naming the most repeated caption.
    collapse_warn: float = option(0.1, "warn when validation's distinct captions / images falls below this (0: never)")
    report_to: str = option("none", "live dashboards: none, tensorboard, wandb or a comma-separated list")


@dataclass
class ScstConfig:
    """self-critical sequence training"""

    num_samples: int = option(5, "sampled captions per image")
    baseline: str = option("greedy", "reward baseline: greedy caption (reference) or mean of the other samples",
                           choices=SCST_BASELINES)  # fmt: skip
    sample_max_len: int = option(20, "most tokens per sample (also the greedy baseline's)")
    sample_min_len: int = option(0, "fewest tokens per sample (the reference passes none)")
    temperature: float = option(1.0, "sampling temperature")
    length_norm: bool = option(True, "average log-probabilities over each sample's tokens")
    dropout: bool = option(True, "sample with dropout on, as the reference does")
    # Same tokens for the same draws in every mode (docs/gpu.md). CUDA-graph replay stays opt-in ("graphs")
    # until tests/test_cuda.py has passed on a GPU.
    fast_decode: str = option(
        "auto", "auto: the mode measured fastest on the device (off on the CPU, static on CUDA); static: "
        "sampling and greedy baseline on a static KV cache; graphs: the same, replayed as CUDA graphs on CUDA "
        "(not yet checked on a GPU); off: dynamic cache",
        choices=FAST_DECODE_MODES,
    )  # fmt: skip
    # The reference's coco-train-words.p counts <eos>, so the reward sees whether a caption ended
    reward_eos: bool = option(True, 'score captions and references as "words <eos>" (false: bare words)')


@dataclass
class Config(CaptionerConfig):
    """A training run: the captioner (encoder, model, decode) and how to train it."""

    scst: bool = option(False, "SCST stage (false: cross-entropy)")
    checkpoint: str | None = option(None, "weights to start from (required for SCST)", path=True)
    resume: bool = option(False, "continue the run in output_dir from its last checkpoint")
    output_dir: str = option("runs/opg", "folder of the run's checkpoints, logs and results", path=True)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    data: DataConfig = section(DataConfig)
    train: TrainConfig = section(TrainConfig)
    scst_opts: ScstConfig = section(ScstConfig)


# Spellings of the reference command lines.
ALIASES = {
    "use_sparce_mask": "model.use_sparse_mask",
    "lamda": "train.aux_weight",
    "bs": "train.batch_size",
    "out_dir": "output_dir",
}
SCHEMA = Schema(Config, ALIASES)


def build_config(files: Sequence[str | Path] = (), overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then each YAML file in order, then overrides (raw strings or typed values)."""
    cfg = SCHEMA.build(files, overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Reject combinations that would only fail later, deep inside a run (single values: see the schema)."""
    if cfg.train.batch_size < 1 or cfg.train.epochs < 0 or cfg.decode.beams < 1 or cfg.train.accum_steps < 1:
        raise ConfigError("train.batch_size, train.accum_steps and decode.beams must be >= 1, train.epochs >= 0")
    if cfg.data.cache_features and (cfg.data.augment or not cfg.encoder.frozen or cfg.encoder.drop_path > 0):
        raise ConfigError(
            "data.cache_features needs deterministic features: a frozen encoder, data.augment=false and "
            "encoder.drop_path=0"
        )
    shards = cfg.data.train_shards or cfg.data.val_shards
    if shards and (cfg.data.cache_features or (cfg.data.train_shards and cfg.model.output_vocab != "full")):
        raise ConfigError("data.train_shards and data.val_shards stream the images: no data.cache_features, and no "
                          "model.output_vocab=train with train_shards")  # fmt: skip
    if (cfg.data.train_samples is not None and cfg.data.train_samples < 1) or cfg.data.shuffle_buffer < 1:
        raise ConfigError("data.train_samples (when given) and data.shuffle_buffer must be >= 1")
    if cfg.train.total_steps is not None and cfg.train.total_steps < 1:
        raise ConfigError(f"train.total_steps must be >= 1 or empty, got {cfg.train.total_steps}")
    if not 0.0 <= cfg.train.collapse_warn <= 1.0:
        raise ConfigError(f"train.collapse_warn must be in [0, 1], got {cfg.train.collapse_warn}")
    if not 0.0 < cfg.model.threshold < 1.0:
        raise ConfigError(f"model.threshold must be in (0, 1), got {cfg.model.threshold}")
    if cfg.scst:
        check_scst_samples(cfg.scst_opts)


def check_scst_samples(opts: ScstConfig) -> None:
    """Enough samples per image for the baseline: one, or two for the mean of the other samples."""
    fewest = 2 if opts.baseline == "mean" else 1
    if opts.num_samples < fewest:
        raise ConfigError(
            f"scst_opts.num_samples must be >= {fewest} with scst_opts.baseline {opts.baseline}, got {opts.num_samples}"
        )


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a config saved with ``utils.config.to_dict`` (e.g. inside a checkpoint); unknown keys rejected."""
    return SCHEMA.from_dict(tree)


def add_config_options(parser: Any) -> None:
    """``--config FILE`` (repeatable) and one option per config key, in the project's dialect."""
    config = parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="YAML file applied before the options; repeat for several, in order",
    )
    config.shown_default = "configs/xe.yaml, or configs/scst.yaml with --scst"
    add_schema_options(parser, SCHEMA)


def parse_overrides(tokens: Sequence[str]) -> dict[str, Any]:
    """Command-line tokens (``--train.lr 1e-5``, ``--lr=1e-5``, ``--only_prefix``) -> ``{dotted key: value}``."""
    parser = ArgumentParser(prog="config", add_help=False)
    add_schema_options(parser, SCHEMA)
    return schema_overrides(parser.parse_args(list(tokens)), SCHEMA)
