"""Run a few training steps and save this process's weights (launched directly or with torchrun).

Usage: ddp_worker.py DATA OUT ACCUM xe | ddp_worker.py DATA OUT ACCUM xe_cached
     | ddp_worker.py DATA OUT ACCUM scst XE_CHECKPOINT
with ACCUM the micro-batches per optimizer step (train.accum_steps).

``xe_cached`` trains from the feature cache (in OUT/features), which every process reads from one store built
with the randomly initialised encoder: the processes must have built the same encoder to agree on it."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import TINY_GPT2, tiny_config  # noqa: E402

from engine.runner import Run  # noqa: E402
from utils.distributed import DistInfo  # noqa: E402


def main(data_dir: str, out_dir: str, accum: str, stage: str, checkpoint: str | None = None) -> None:
    no_dropout = {**TINY_GPT2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    overrides = {"model.gpt2_config": no_dropout, "train.stop_after_steps": 3, "train.aux_weight": 1.0,
                 "train.accum_steps": int(accum)}  # fmt: skip
    if stage == "xe_cached":
        overrides.update({"data.cache_features": True, "data.feature_cache_dir": str(Path(out_dir) / "features")})
    if stage == "scst":
        overrides.update({"scst": True, "checkpoint": checkpoint, "train.stop_after_steps": 2, "train.lr": 1e-2})
    cfg = tiny_config(Path(data_dir), Path(out_dir), **overrides)
    run = Run(cfg)
    try:
        run.train()
        info: DistInfo = run.dist
        torch.save(run.model.state_dict(), Path(out_dir) / f"rank{info.rank}.pt")
    finally:
        run.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
