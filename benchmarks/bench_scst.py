"""Benchmark the SCST step: the dynamic KV cache against the static one, and sampling with gradients against
sampling without them plus one teacher-forced pass (``scst_opts.fast_decode``, ``ScstStep.teacher_forced``).

The model is ``configs/scst.yaml`` with random weights at the paper's size (``--size paper``: Swin-B 224,
GPT-2 small's shape, 50257 tokens, sparse mask) or the demo's (``--size demo``, for a CPU); images are
random tensors and every image has the same 5 references, so the figures are the model's cost alone.
For each batch of ``--batches`` images x 5 samples it times three variants:

- ``off``: Hugging Face's dynamic cache, the sampling decode keeps the gradients (``fast_decode: off``, and
  ``auto`` on the CPU);
- ``static``: the static cache (``fast_decode: static``, or ``graphs`` with ``--graphs``), same gradients;
- ``teacher-forced``: the static cache, samples drawn without gradients and scored in one teacher-forced pass
  (what ``ScstStep`` does on the static cache with dropout off, ``auto`` on CUDA; with ``--dropout true`` it
  is ``static`` again);

each for the whole training step (sampling, CIDEr-D, the greedy baseline, backward, AdamW; the mean of
``--repeats`` steps after a warm-up, which records any CUDA graphs), the sampling alone (log-probabilities
included) and the greedy baseline decode alone (eval mode); the variants take turns, so that a change of
machine load hits them alike. It counts the captions each variant gives
identically to ``off``: greedy captions, and samples with the same uniforms and dropout off. Last, it
projects the SCST stage (``--schedule_steps`` steps of ``--schedule_batch`` images) from the step times.

    python benchmarks/bench_scst.py [--device cuda] [--precision bf16] [--graphs] [--batches 7 16 40]
    python benchmarks/bench_scst.py --device cpu --size demo --batches 7 --repeats 2 --threads 1   # a CPU run
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

# variant -> (scst_opts.fast_decode, ScstStep.teacher_forced); "static" becomes "graphs" with --graphs
VARIANTS = {"off": ("off", False), "static": ("static", False), "teacher-forced": ("static", True)}


def interleaved_seconds(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Mean seconds per call of each function over ``repeats`` rounds after one warm-up call each; every
    round calls each function once, so a change of machine load during the run hits them alike."""
    totals = dict.fromkeys(fns, 0.0)
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            totals[name] += (time.perf_counter() - start) if round_ else 0.0
    return {name: total / repeats for name, total in totals.items()}


def time_batch(steps: dict[str, ScstStep], model, batch: dict, precision: str, device, repeats: int) -> dict:
    """Per variant: step, sampling and greedy seconds, and the captions identical to ``off``'s."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    calls: dict[str, dict[str, Callable[[], object]]] = {"step": {}, "sample": {}, "greedy": {}}
    tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for variant, scst in steps.items():

        def train_step(scst: ScstStep = scst) -> None:
            with autocast(precision, device):
                loss = scst(batch)["loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def sample(scst: ScstStep = scst) -> object:
            with autocast(precision, device):
                return scst._sample(batch)[0]

        def greedy(scst: ScstStep = scst) -> object:
            with autocast(precision, device), eval_mode(model), torch.no_grad():
                return decode(model, model.encode(batch["images"]), scst.greedy_options, fast=scst.fast)

        calls["step"][variant], calls["sample"][variant], calls["greedy"][variant] = train_step, sample, greedy
        tokens[variant] = greedy().tokens, _samples_without_dropout(sample, model).tokens
    timed = {what: interleaved_seconds(fns, device, repeats) for what, fns in calls.items()}
    figures = {variant: {what: timed[what][variant] for what in calls} for variant in steps}
    same = {v: [_same_rows(tokens["off"][i], tokens[v][i]) for i in range(2)] for v in steps}
    return {"figures": figures, "same": same}


def _samples_without_dropout(sample: Callable[[], object], model) -> object:
    with dropout_off(model), torch.no_grad():
        return sample()


def _same_rows(a: torch.Tensor, b: torch.Tensor) -> str:
    width = max(a.shape[1], b.shape[1])
    a, b = (torch.nn.functional.pad(x, (0, width - x.shape[1]), value=-1) for x in (a, b))
    return f"{int((a == b).all(dim=1).sum())}/{a.shape[0]}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--size", default="paper", choices=sorted(SIZES))
    parser.add_argument("--batches", type=int, nargs="+", default=[7, 16, 40])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dropout", default="false", choices=("true", "false"), help="scst_opts.dropout")
    parser.add_argument("--graphs", action="store_true", help="static variants replay CUDA graphs on CUDA")
    parser.add_argument("--schedule_steps", type=int, default=56642, help="SCST steps of the projection")
    parser.add_argument("--schedule_batch", type=int, default=7, help="images per step of the projection")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    return parser.parse_args(argv)


def build_steps(args: argparse.Namespace, cfg, model, device: torch.device, images: int) -> dict[str, ScstStep]:
    """One SCST step object per variant, sharing the model, tokenizer and CIDEr-D."""
    tokenizer, references = load_tokenizer("gpt2"), [list(REFERENCES)] * images
    cider = CiderD(DocumentFrequency.from_references(references))
    steps = {}
    for variant, (fast_decode, teacher_forced) in VARIANTS.items():
        mode = "graphs" if args.graphs and fast_decode == "static" else fast_decode
        opts = dataclasses.replace(cfg.scst_opts, fast_decode=mode)
        steps[variant] = ScstStep(model, tokenizer, cider, references, opts, device)
        steps[variant].teacher_forced = teacher_forced
    return steps


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    overrides = {"encoder.checkpoint": None, "scst_opts.dropout": args.dropout == "true", **SIZES[args.size]}
    cfg = build_config([CONFIG_DIR / "scst.yaml"], overrides)
    torch.manual_seed(0)
    model = build_captioner(cfg).to(device).train()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{device} ({name}), {precision}, torch {torch.__version__}, model {args.size}, "
          f"{cfg.scst_opts.num_samples} samples, max {cfg.scst_opts.sample_max_len} tokens, "
          f"dropout {cfg.scst_opts.dropout}, baseline {cfg.scst_opts.baseline}, CUDA graphs {args.graphs}")  # fmt: skip
    batches = sorted(set(args.batches) | {args.schedule_batch})
    steps = build_steps(args, cfg, model, device, max(batches))
    print(f"{'images x samples':<17}{'variant':<15}{'step':>10}{'vs off':>8}{'sample':>10}{'greedy':>10}"
          f"{'same greedy':>12}{'same samples':>13}")  # fmt: skip
    step_seconds = {}
    for images in batches:
        res = model.encoder.image_res
        batch = {"images": torch.randn(images, 3, res, res, device=device), "indices": list(range(images))}
        result = time_batch(steps, model, batch, precision, device, args.repeats)
        step_seconds[images] = {v: f["step"] for v, f in result["figures"].items()}
        for variant, f in result["figures"].items():
            same_greedy, same_samples = result["same"][variant]
            print(f"{f'{images} x {cfg.scst_opts.num_samples}':<17}{variant:<15}{f['step'] * 1e3:>8.1f}ms"
                  f"{step_seconds[images]['off'] / f['step']:>7.2f}x{f['sample'] * 1e3:>8.1f}ms"
                  f"{f['greedy'] * 1e3:>8.1f}ms{same_greedy:>12}{same_samples:>13}", flush=True)  # fmt: skip
    hours = {v: seconds * args.schedule_steps / 3600 for v, seconds in step_seconds[args.schedule_batch].items()}
    print(f"SCST stage, {args.schedule_steps:,} steps of {args.schedule_batch} images: "
          + ", ".join(f"{h:.2f} h {v}" for v, h in hours.items()))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
