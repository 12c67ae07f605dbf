"""Saved models: the ``.pt`` checkpoints of training, and folders in the Hugging Face Hub's conventions.

A folder holds ``config.json`` (architecture, output vocabulary, decoding defaults, the training config),
``model.safetensors`` (weights), the GPT-2 tokenizer files and ``generation_config.json`` (decoding defaults
under Hugging Face ``generate`` names; they take precedence over ``config.json``'s when both are present).
Reading a folder parses JSON and safetensors only: no pickled object is ever loaded.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from data.transforms import CLIP_MEAN, CLIP_STD
from models.build import architecture, rebuild_captioner
from models.captioner import OPGCaptioner
from models.config import DecodeConfig, EncoderConfig, ModelConfig, SavedCaptionerConfig
from models.tokenizer import GPT2_END_OF_TEXT_ID, GPT2_PERIOD_ID
from utils.checkpoint import CheckpointError, load_state_strict, read_checkpoint
from utils.config import ConfigError, section_from_dict
from utils.io import DataFileError, read_json, write_bytes, write_json

logger = logging.getLogger(__name__)

MODEL_TYPE = "opg-captioner"
FOLDER_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
GENERATION_NAME = "generation_config.json"
_ALIASES_KEY = "opg_tied_weights"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# generation_config.json names of the DecodeConfig fields.
_HF_NAMES = {
    "beams": "num_beams",
    "max_len": "max_new_tokens",
    "min_len": "min_new_tokens",
    "length_penalty": "length_penalty",
    "no_repeat_ngram": "no_repeat_ngram_size",
}


def load_model(source: str | Path, device: str | torch.device = "cpu") -> tuple[OPGCaptioner, SavedCaptionerConfig]:
    """Rebuild a saved model, in eval mode on ``device``, from a training checkpoint (``.pt``), an exported
    folder, or a Hugging Face Hub repository id (``owner/name``, downloaded with ``huggingface_hub``)."""
    path = resolve_source(source)
    model, cfg = load_folder(path) if path.is_dir() else _load_checkpoint(path)
    return model.to(device).eval(), cfg


def resolve_source(source: str | Path) -> Path:
    """A local path as it is; a Hub repository id that is not a local path becomes its downloaded folder."""
    path = Path(source).expanduser()
    if path.exists() or not _REPO_ID.match(str(source)):
        return path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(f"{source} is not a local file or folder (pip install huggingface_hub to "
                              "download it as a Hub repository)") from None  # fmt: skip
    try:
        return Path(snapshot_download(str(source)))
    except Exception as err:  # the hub client raises many error types (offline, unknown repo, auth)
        raise CheckpointError(f"{source} is not a local file or folder, and downloading it from the Hugging "
                              f"Face Hub failed ({type(err).__name__}: {err})") from err  # fmt: skip


def saved_config(tree: dict[str, Any]) -> SavedCaptionerConfig:
    """The captioner's description in a saved training config (``engine.config.Config`` as a dict)."""
    kinds = {"encoder": EncoderConfig, "model": ModelConfig, "decode": DecodeConfig}
    sections = {name: section_from_dict(cls, tree.get(name, {}), name) for name, cls in kinds.items()}
    return SavedCaptionerConfig(**sections, precision=tree.get("train", {}).get("precision", "fp32"), training=tree)


def _load_checkpoint(path: Path) -> tuple[OPGCaptioner, SavedCaptionerConfig]:
    payload = read_checkpoint(path)
    try:
        cfg = saved_config(payload["config"])
    except ConfigError as err:
        raise CheckpointError(f"{path}: its config does not fit this version: {err}") from err
    model = rebuild_captioner(cfg, payload["architecture"])
    load_state_strict(model, payload["model"], str(path))
    return model, cfg


def save_folder(model: OPGCaptioner, cfg: SavedCaptionerConfig, tokenizer: Any, out: str | Path) -> None:
    """Write ``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / CONFIG_NAME, folder_config(model, cfg), indent=2)
    write_json(out / GENERATION_NAME, generation_config(cfg.decode), indent=2)
    state, aliases = _untied_state(model)
    metadata = {"format": "pt", _ALIASES_KEY: json.dumps(aliases)}
    write_bytes(out / WEIGHTS_NAME, save(state, metadata=metadata), what="weights")
    tokenizer.save_pretrained(str(out))


def folder_config(model: OPGCaptioner, cfg: SavedCaptionerConfig) -> dict[str, Any]:
    """The ``config.json`` of an exported folder."""
    arch = architecture(model)
    ids = arch.pop("output_ids")
    return {
        "architectures": ["OPGCaptioner"],
        "model_type": MODEL_TYPE,
        "opg_format_version": FOLDER_VERSION,
        "architecture": {
            **arch,
            "mapping_type": cfg.model.mapping_type,
            "prefix_length": model.prefix_length,
            "sparse_mask": model.sparse_mask is not None,
            "sparse_mask_applied": model.masks_prefix,
        },
        "output_vocabulary": {"size": model.gpt.config.vocab_size if ids is None else len(ids), "gpt2_ids": ids},
        "decoding": asdict(cfg.decode),
        "image_processor": {
            "size": model.encoder.image_res,
            "resample": "bicubic",
            "keep_aspect_ratio": False,
            "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD),
        },  # fmt: skip
        "training_config": cfg.training,
    }


def generation_config(decode: DecodeConfig) -> dict[str, Any]:
    """Decoding defaults under Hugging Face ``GenerationConfig`` names ('.' and end-of-text stop)."""
    values = {_HF_NAMES[key]: value for key, value in asdict(decode).items()}
    return {
        **values,
        "do_sample": False,
        "early_stopping": False,
        "eos_token_id": [GPT2_PERIOD_ID, GPT2_END_OF_TEXT_ID],
        "pad_token_id": GPT2_END_OF_TEXT_ID,
        "bos_token_id": GPT2_END_OF_TEXT_ID,
    }


def load_folder(folder: Path) -> tuple[OPGCaptioner, SavedCaptionerConfig]:
    """Rebuild the model of an exported folder (its tokenizer is the folder itself)."""
    config = _read_json(folder / CONFIG_NAME)
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"{folder / CONFIG_NAME}: model_type is {config.get('model_type')!r}, not {MODEL_TYPE!r}")
    try:
        cfg = saved_config(config["training_config"])
        arch = {**config["architecture"], "output_ids": config["output_vocabulary"]["gpt2_ids"]}
        cfg.decode = _decoding_defaults(folder, config)
    except (KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"{folder / CONFIG_NAME} is incomplete or invalid: {err!r}") from err
    cfg.model.tokenizer = str(folder)
    model = rebuild_captioner(cfg, arch)
    load_state_strict(model, _read_weights(folder / WEIGHTS_NAME), str(folder / WEIGHTS_NAME))
    return model, cfg


def _decoding_defaults(folder: Path, config: dict[str, Any]) -> DecodeConfig:
    decode = DecodeConfig(**config["decoding"])
    if (folder / GENERATION_NAME).is_file():
        generation = _read_json(folder / GENERATION_NAME)
        for ours, theirs in _HF_NAMES.items():
            if theirs in generation:
                setattr(decode, ours, type(getattr(decode, ours))(generation[theirs]))
    return decode


def _untied_state(model: OPGCaptioner) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with each shared tensor once (safetensors refuses shared memory; GPT-2 ties its
    output layer to its input embeddings) and ``{dropped name: kept name}``."""
    state: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            state[name] = tensor.detach().cpu().contiguous()
    return state, aliases


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        state = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            aliases = json.loads((handle.metadata() or {}).get(_ALIASES_KEY, "{}"))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"weights file {path} cannot be read ({type(err).__name__}: {err})") from err
    for name, source in aliases.items():
        state[name] = state[source]
    return state


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except DataFileError as err:
        raise CheckpointError(str(err)) from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data
