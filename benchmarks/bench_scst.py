"""Benchmark the SCST step with the eager decoder against the static KV cache (``scst_opts.fast_decode``).

The model is ``configs/scst.yaml`` with random weights at the paper's size (``--size paper``: Swin-B 224,
GPT-2 small's shape, 50257 tokens, sparse mask) or the demo's (``--size demo``, for a CPU); images are
random tensors and every image has the same 5 references, so the figures are the model's cost alone.
For each batch of ``--batches`` images x 5 samples it times, for ``off`` (Hugging Face's dynamic cache)
and ``auto`` (static cache, CUDA graphs for the greedy baseline on CUDA):

- the whole training step (sampling with dropout as configured, CIDEr-D, the greedy baseline, backward,
  AdamW), the mean of ``--repeats`` steps after a warm-up (the warm-up records the CUDA graphs);
- the sampling decode alone (with gradients) and the greedy baseline decode alone (eval mode).

It also counts how many captions both decoders give identically: greedy captions, and samples with the
same uniforms and dropout off (with dropout on they draw different dropout masks). Last, it projects
the SCST stage (``--schedule_steps`` steps of ``--schedule_batch`` images) from the step time at that
batch.

    python benchmarks/bench_scst.py [--device cuda] [--precision auto] [--batches 7 16 40]
    python benchmarks/bench_scst.py --device cpu --size demo --batches 2 7 --repeats 3   # a CPU run
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import SIZES  # noqa: E402
from benchmarks.model_steps import REFERENCES  # noqa: E402
from engine.config import CONFIG_DIR, build_config  # noqa: E402
from engine.steps import ScstStep  # noqa: E402
from metrics.cider import CiderD  # noqa: E402
from metrics.cider_df import DocumentFrequency  # noqa: E402
from models.build import build_captioner  # noqa: E402
from models.decoding import decode, dropout_off, eval_mode  # noqa: E402
from models.tokenizer import load_tokenizer  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402
from utils.precision import autocast, resolve_precision  # noqa: E402

MODES = ("off", "auto")


def mean_seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Mean seconds per call over ``repeats`` calls after one warm-up call."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def time_batch(steps: dict[str, ScstStep], model, batch: dict, precision: str, device, repeats: int) -> dict:
    """Per mode: step, sampling and greedy seconds; and the identical-caption counts of the two modes."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    images = batch["images"]
    figures: dict[str, dict[str, float]] = {}
    tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for mode, scst in steps.items():

        def train_step(scst: ScstStep = scst) -> None:
            with autocast(precision, device):
                loss = scst(batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def sample(scst: ScstStep = scst) -> object:
            with autocast(precision, device):
                prefix = model.encode(images)
                uniforms = scst._uniforms(batch["indices"])
                return decode(model, prefix, scst.sample_options, True, uniforms=uniforms, fast=scst.fast)

        def greedy(scst: ScstStep = scst) -> object:
            with autocast(precision, device), eval_mode(model), torch.no_grad():
                return decode(model, model.encode(images), scst.greedy_options, fast=scst.fast)

        figures[mode] = {name: mean_seconds(fn, device, repeats) for name, fn in
                         (("step", train_step), ("sample", sample), ("greedy", greedy))}  # fmt: skip
        tokens[mode] = greedy().tokens, _samples_without_dropout(sample, model).tokens
    same = [_same_rows(tokens["off"][i], tokens["auto"][i]) for i in range(2)]
    return {"figures": figures, "same_greedy": same[0], "same_samples": same[1]}


def _samples_without_dropout(sample: Callable[[], object], model) -> object:
    with dropout_off(model), torch.no_grad():
        return sample()


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> str:
    width = max(a.shape[1], b.shape[1])
    a, b = (torch.nn.functional.pad(x, (0, width - x.shape[1]), value=-1) for x in (a, b))
    return f"{int((a == b).all(dim=1).sum())}/{a.shape[0]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--size", default="paper", choices=sorted(SIZES))
    parser.add_argument("--batches", type=int, nargs="+", default=[7, 16, 40])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--schedule_steps", type=int, default=56642, help="SCST steps of the projection")
    parser.add_argument("--schedule_batch", type=int, default=7, help="images per step of the projection")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    cfg = build_config([CONFIG_DIR / "scst.yaml"], {"encoder.checkpoint": None, **SIZES[args.size]})
    torch.manual_seed(0)
    model = build_captioner(cfg).to(device).train()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{device} ({name}), {precision}, torch {torch.__version__}, model {args.size}, "
          f"{cfg.scst_opts.num_samples} samples, max {cfg.scst_opts.sample_max_len} tokens, "
          f"dropout {cfg.scst_opts.dropout}, baseline {cfg.scst_opts.baseline}")  # fmt: skip
    tokenizer, batches = load_tokenizer("gpt2"), sorted(set(args.batches) | {args.schedule_batch})
    references = [list(REFERENCES)] * max(batches)
    cider = CiderD(DocumentFrequency.from_references(references))
    steps = {mode: ScstStep(model, tokenizer, cider, references, dataclasses.replace(cfg.scst_opts, fast_decode=mode),
                            device) for mode in MODES}  # fmt: skip
    print(f"{'images x samples':<17}{'step off':>10}{'step auto':>10}{'speedup':>8}{'sample off/auto':>17}"
          f"{'greedy off/auto':>17}{'same greedy':>12}{'same samples':>13}")  # fmt: skip
    step_seconds = {}
    for images in batches:
        res = model.encoder.image_res
        batch = {"images": torch.randn(images, 3, res, res, device=device), "indices": list(range(images))}
        result = time_batch(steps, model, batch, precision, device, args.repeats)
        off, auto = result["figures"]["off"], result["figures"]["auto"]
        step_seconds[images] = (off["step"], auto["step"])
        print(f"{f'{images} x {cfg.scst_opts.num_samples}':<17}{off['step'] * 1e3:>8.1f}ms{auto['step'] * 1e3:>8.1f}ms"
              f"{off['step'] / auto['step']:>7.2f}x{off['sample'] * 1e3:>9.1f}/{auto['sample'] * 1e3:<7.1f}"
              f"{off['greedy'] * 1e3:>9.1f}/{auto['greedy'] * 1e3:<7.1f}{result['same_greedy']:>12}"
              f"{result['same_samples']:>13}", flush=True)  # fmt: skip
    off, auto = (seconds * args.schedule_steps / 3600 for seconds in step_seconds[args.schedule_batch])
    print(f"SCST stage, {args.schedule_steps:,} steps of {args.schedule_batch} images: {off:.1f} h eager, "
          f"{auto:.1f} h static cache")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
