"""Train from shards and record the sample keys this process decoded (launched with torchrun).

Usage: shard_worker.py DATA SHARDS VAL_SHARDS OUT [KEY=VALUE ...]: DATA is the generated data set (its val.json
and test.json), SHARDS and VAL_SHARDS are data.train_shards and data.val_shards (empty: val.json), the
KEY=VALUE pairs further config overrides; each process appends to OUT/keys_rank{R}.txt (one decoded sample key
a line) and writes OUT/rank{R}.json (its counters)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import tiny_config  # noqa: E402

from data.shards import ShardStream  # noqa: E402
from engine.runner import Run  # noqa: E402


def main(data_dir: str, shards: str, val_shards: str, out_dir: str, *overrides: str) -> None:
    data, out = Path(data_dir), Path(out_dir)
    decode = ShardStream.decode

    def recording_decode(self: ShardStream, sample: dict) -> object:
        with open(out / f"keys_rank{self.plan.rank}.txt", "a") as handle:
            handle.write(sample["__key__"] + "\n")
        return decode(self, sample)

    ShardStream.decode = recording_decode
    values = {"data.train_shards": shards, "data.val_shards": val_shards or None, "train.val_meteor": False}
    values.update(item.split("=", 1) for item in overrides)
    run = Run(tiny_config(data, out, **values))
    try:
        result = run.train()
        (out / f"rank{run.dist.rank}.json").write_text(json.dumps(result.state.to_dict()))
    finally:
        run.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
