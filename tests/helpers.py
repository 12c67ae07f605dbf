"""Tiny models and configs shared by the tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from engine.config import Config, build_config
from models.build import architecture
from utils.checkpoint import save_checkpoint
from utils.config import to_dict

TINY_GPT2 = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64}
# The test material (real photos, the X-VLM vector, the paper's predictions): $OPG_SHARED_DIR or ../shared.
SHARED = Path(os.environ.get("OPG_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))


def tiny_config(data_dir: Path | None = None, output_dir: Path | None = None, **overrides: Any) -> Config:
    """A CPU-sized config: demo encoder, 2-layer GPT-2, optionally pointed at a generated data set."""
    values: dict[str, Any] = {
        "encoder.vision_config": "swin_demo",
        "encoder.drop_path": 0.0,
        "model.gpt2_config": dict(TINY_GPT2),
        "train.batch_size": 8,
        "train.epochs": 1,
        "train.lr": 1e-3,
        "train.eval_batch_size": 8,
        "train.log_every": 1,
        "train.save_every_steps": 0,
        "data.num_workers": 0,
        "data.augment": False,
        "data.cider_df": None,
        "decode.beams": 2,
        "decode.max_len": 8,
        "decode.min_len": 1,
        "device": "cpu",
    }
    if data_dir is not None:
        values.update({
            "data.image_root": str(data_dir),
            "data.train_file": str(data_dir / "train.json"),
            "data.val_file": str(data_dir / "val.json"),
            "data.test_file": str(data_dir / "test.json"),
        })  # fmt: skip
    if output_dir is not None:
        values["output_dir"] = str(output_dir)
    values.update(overrides)
    return build_config([], values)


def save_model(path: Path, model: Any, cfg: Config) -> Path:
    """``model`` saved at ``path`` as training saves its checkpoints (config and architecture included)."""
    save_checkpoint(path, model, to_dict(cfg), architecture(model))
    return path
