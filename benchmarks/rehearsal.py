"""Full-size rehearsal of the COCO recipe: XE then SCST through ``train_scst.py`` on a COCO-shaped set.

1. makes a COCO-like set (``benchmarks/coco_like.py``: real-size JPEGs of COCO's usual sizes, five captions
   per image, one training entry per caption);
2. runs ``configs/xe.yaml`` then ``configs/scst.yaml`` (from the XE run's ``best.pt``) through
   ``train_scst.py`` (each in its own process, ``benchmarks/measured_run.py``) with random weights at the
   paper's sizes: Swin-B 224, GPT-2 small's shape, the full 50257-token vocabulary, the sparse mask,
   augmentation and DataLoader workers, for a bounded number of steps, each followed by its validation,
   checkpoints and final test;
3. times the same model's steps on random tensors in this process (the model alone, no data loading) and
   one data-loader worker alone (this process, one thread, the training transform and collation);
4. prints end-to-end images/s against the model-only rate, the per-worker loader rate, peak host and
   device memory, validation and checkpoint times, and the projected wall time of the whole COCO recipe on
   this machine: COCO's sizes (566,747 training captions of 113,287 images, 5,000 validation and test
   images) with the epochs, batches and decoding of the two configs. Projections scale the measured time
   per image linearly to the configs' batches; run with those batches (the CUDA defaults) to avoid that.

    python benchmarks/rehearsal.py [--device auto] [--xe_steps N] [--scst_steps N] [--xe_batch B] ...

Defaults: on a CPU a bounded run of about 10 minutes on 2 cores (XE batch 8, SCST batch 2); on CUDA the
configs' batches (XE 40, SCST 7) with 16 workers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.coco_like import make_coco_like  # noqa: E402
from benchmarks.harness import SIZES, read_metrics  # noqa: E402
from benchmarks.model_steps import loader_rate, model_step_rates  # noqa: E402
from engine.config import CONFIG_DIR, Config, build_config  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402

COCO = {"train_captions": 566_747, "train_images": 113_287, "val_images": 5_000, "test_images": 5_000}
HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train_images", type=int)
    parser.add_argument("--eval_images", type=int)
    parser.add_argument("--xe_steps", type=int)
    parser.add_argument("--scst_steps", type=int)
    parser.add_argument("--xe_batch", type=int)
    parser.add_argument("--scst_batch", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--work", type=Path, default=Path("runs/rehearsal"))
    args = parser.parse_args(argv)
    cuda = resolve_device(args.device).type == "cuda"
    defaults = ({"train_images": 2000, "eval_images": 250, "xe_steps": 150, "scst_steps": 60, "xe_batch": 40,
                 "scst_batch": 7, "workers": 16} if cuda else
                {"train_images": 120, "eval_images": 8, "xe_steps": 6, "scst_steps": 3, "xe_batch": 8,
                 "scst_batch": 2, "workers": 2})  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def stage_args(args: argparse.Namespace, annotations: Path, data: Path, scst: bool) -> list[str]:
    gpt2 = SIZES["paper"]["model.gpt2_config"]
    out = args.work / ("scst" if scst else "xe")
    values = {
        "config": str(CONFIG_DIR / ("scst.yaml" if scst else "xe.yaml")), "device": args.device,
        "encoder.checkpoint": "none", "model.gpt2_config": json.dumps(gpt2), "data.image_root": str(data),
        "data.train_file": str(annotations / "train.json"), "data.val_file": str(annotations / "val.json"),
        "data.test_file": str(annotations / "test.json"), "data.cider_df": "none",
        "data.num_workers": str(args.workers), "train.epochs": "1", "train.log_every": "1",
        "train.batch_size": str(args.scst_batch if scst else args.xe_batch),
        "train.max_steps_per_epoch": str(args.scst_steps if scst else args.xe_steps),
        "train.save_every_steps": "0", "output_dir": str(out),
    }  # fmt: skip
    if scst:
        values["checkpoint"] = str(args.work / "xe" / "best.pt")
    return [token for key, value in values.items() for token in (f"--{key}", value)]


def run_stage(args: argparse.Namespace, annotations: Path, data: Path, scst: bool) -> dict[str, Any]:
    name = "scst" if scst else "xe"
    out = args.work / f"{name}_cost.json"
    command = [sys.executable, str(HERE / "measured_run.py"), str(out), *stage_args(args, annotations, data, scst)]
    print(f"running {name.upper()} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} stage failed:\n{done.stderr[-3000:]}")
    cost = json.loads(out.read_text())
    records = [r for r in read_metrics(args.work / name) if r["event"] == "train"]
    batch = args.scst_batch if scst else args.xe_batch
    # steady state: from the first step's end to the last one's (worker start-up and warm-up excluded)
    cost["e2e_img_s"] = (len(records) - 1) * batch / (records[-1]["time"] - records[0]["time"])
    cost["steps"] = len(records)
    return cost


def project(args: argparse.Namespace, xe: dict, scst: dict, eval_images: int) -> list[tuple[str, float]]:
    """Seconds of each part of the COCO recipe at the measured rates (per image, scaled linearly)."""
    xe_cfg: Config = build_config([CONFIG_DIR / "xe.yaml"])
    scst_cfg: Config = build_config([CONFIG_DIR / "scst.yaml"])
    xe_steps = COCO["train_captions"] // xe_cfg.train.batch_size * xe_cfg.train.epochs
    scst_steps = COCO["train_images"] // scst_cfg.train.batch_size * scst_cfg.train.epochs
    per_val = {k: (sum(c["timers"]["validation"]) / len(c["timers"]["validation"])) / eval_images
               for k, c in (("xe", xe), ("scst", scst))}  # fmt: skip
    ckpt = sum(xe["timers"]["checkpoint"]) / len(xe["timers"]["checkpoint"])
    saves = xe_steps // max(xe_cfg.train.save_every_steps, 1) + scst_steps // max(scst_cfg.train.save_every_steps, 1)
    saves += 2 * (xe_cfg.train.epochs + scst_cfg.train.epochs)  # last.pt and (at most) best.pt per epoch
    return [
        (f"XE training: {xe_steps:,} steps of {xe_cfg.train.batch_size}", xe_steps * xe_cfg.train.batch_size
         / xe["e2e_img_s"]),
        (f"XE validation: {xe_cfg.train.epochs} x {COCO['val_images']:,} images, greedy",
         xe_cfg.train.epochs * COCO["val_images"] * per_val["xe"]),
        (f"SCST training: {scst_steps:,} steps of {scst_cfg.train.batch_size} x {scst_cfg.scst_opts.num_samples}",
         scst_steps * scst_cfg.train.batch_size / scst["e2e_img_s"]),
        (f"SCST validation: {scst_cfg.train.epochs + 1} x {COCO['val_images']:,} images, "
         f"{scst_cfg.decode.beams} beams", (scst_cfg.train.epochs + 1) * COCO["val_images"] * per_val["scst"]),
        (f"test, both stages: 2 x {COCO['test_images']:,} images", 2 * COCO["test_images"] * per_val["scst"]),
        (f"checkpoints: about {saves} writes", saves * ckpt),
    ]  # fmt: skip


def report(args: argparse.Namespace, xe: dict, scst: dict, model: dict, loader: float) -> None:
    print(f"\n{xe['device']}, torch {torch.__version__}, {torch.get_num_threads()} threads, {args.workers} workers")
    for name, cost, batch in (("XE", xe, args.xe_batch), ("SCST", scst, args.scst_batch)):
        rate = model[name.lower()]
        print(
            f"{name}: {cost['steps']} steps of {batch}: end to end {cost['e2e_img_s']:.3g} images/s, model alone "
            f"{rate:.3g} images/s (the input pipeline and the loop cost {1 - cost['e2e_img_s'] / rate:+.0%})"
        )
        device = f"{cost['peak_device_gib']:.2f} GiB" if cost["peak_device_gib"] is not None else "n/a"
        timers = {k: ", ".join(f"{s:.1f}" for s in v) for k, v in cost["timers"].items()}
        print(
            f"  peak host {cost['peak_host_mib']:.0f} MiB (main process), device {device}; "
            f"seconds: validation {timers['validation']} ({args.eval_images} images), checkpoints "
            f"{timers['checkpoint']}, test {timers['test']}, whole run {cost['wall_s']:.0f}"
        )
    print(f"data loader: {loader:.1f} images/s per worker (training transform, collation)")
    print("projected COCO recipe on this machine:")
    parts = project(args, xe, scst, args.eval_images)
    for name, seconds in parts:
        print(f"  {name:<58} {seconds / 3600:9.1f} h")
    print(f"  {'total':<58} {sum(s for _, s in parts) / 3600:9.1f} h")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    data = args.work / "data"
    annotations = make_coco_like(data, args.train_images, args.eval_images, args.eval_images)
    xe = run_stage(args, annotations, data, scst=False)
    scst = run_stage(args, annotations, data, scst=True)
    print("timing the model alone and one loader worker ...", flush=True)
    model = model_step_rates(resolve_device(args.device), args.xe_batch, args.scst_batch)
    loader = loader_rate(annotations / "train.json", data, args.xe_batch)
    report(args, xe, scst, model, loader)
    print(f"rehearsal took {(time.perf_counter() - started) / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
