"""What a captioner is: its architecture (encoder, mapper, GPT-2, mask) and its decoding defaults.

Plain dataclasses with no training settings; ``models.build`` builds from them, and the training schema
(``engine/config.py``) extends :class:`CaptionerConfig` with data, optimisation and SCST sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from utils.config import option, section

MAPPING_TYPES = ("mlp", "transformer")
# hard: the reference's fixed threshold (its parameters never learn); ste: straight-through, learns
SPARSE_MASK_MODES = ("hard", "ste")
OUTPUT_VOCABS = ("full", "train")


@dataclass
class EncoderConfig:
    """image encoder (X-VLM Swin)"""

    vision_config: str = option("xvlm_swin_b_224", "preset name or X-VLM Swin JSON file")
    checkpoint: str | None = option(
        None, "X-VLM checkpoint; none builds random weights (tests, demo)", short=False, path=True
    )
    image_res: int | None = option(None, "input resolution (none: the vision config's)")
    frozen: bool = option(True, "keep the encoder's weights fixed")
    # The reference builds Swin with 0.1 and its model.train() turns it on in the frozen encoder too;
    # 0 gives deterministic features (feature caching)
    drop_path: float = option(0.1, "stochastic depth of the Swin blocks in training mode")


@dataclass
class ModelConfig:
    """mapping network, GPT-2 and sparse mask"""

    mapping_type: str = option("mlp", "mapping network from visual tokens to prefix", choices=MAPPING_TYPES)
    prefix_length: int | None = option(None, "prefix positions (none: one per visual token, 50)")
    mapper_layers: int = option(6, "transformer mapper: layers")
    mapper_heads: int = option(8, "transformer mapper: attention heads")
    gpt2: str = option("gpt2", "hub name or local folder of pretrained GPT-2 weights")
    gpt2_config: dict[str, Any] | None = option(None, "GPT2Config fields: build random weights instead of loading")
    tokenizer: str = option("gpt2", "hub name or local folder of the GPT-2 tokenizer")
    only_prefix: bool = option(False, "freeze GPT-2, train the mapper (and mask) only")
    use_sparse_mask: bool = option(True, "learned sparse mask over prefix positions")
    sparse_mask_mode: str = option("hard", "hard: fixed threshold (reference); ste: learns", choices=SPARSE_MASK_MODES)
    threshold: float = option(0.1, "sparse mask: keep a position when its score exceeds this")
    # The reference's SCST stage samples, validates and tests without the mask its XE stage trained with
    apply_sparse_mask: bool = option(
        True, "let the sparse mask hide prefix positions; false keeps its weights but reads every position"
    )
    # train makes the output layer cheaper; checkpoints trained with it keep it
    output_vocab: str = option(
        "full", "softmax over all GPT-2 tokens (full) or the training captions' tokens only (train)",
        choices=OUTPUT_VOCABS,
    )  # fmt: skip


@dataclass
class DecodeConfig:
    """test-time decoding (and SCST's validation; XE always validates greedily)"""

    beams: int = option(1, "beam width (1: greedy)")
    max_len: int = option(30, "most tokens per caption, stop token included")
    min_len: int = option(0, "fewest tokens before the stop token")
    length_penalty: float = option(1.0, "beam scores divided by length ** this")
    no_repeat_ngram: int = option(0, "forbid repeating n-grams of this size (0: off)")


@dataclass
class CaptionerConfig:
    """A captioner's architecture and decoding defaults: all that building and decoding need."""

    encoder: EncoderConfig = section(EncoderConfig)
    model: ModelConfig = section(ModelConfig)
    decode: DecodeConfig = section(DecodeConfig)


@dataclass
class SavedCaptionerConfig(CaptionerConfig):
    """A saved model's description (``models.pretrained.load_model``): the captioner's sections, the
    precision its run evaluated in, and the whole training config as saved (for model cards)."""

    precision: str = option("fp32", "the run's train.precision (auto, fp32, bf16, fp16)")
    training: dict[str, Any] = option({}, "the training config as saved with the model")
