"""Benchmark one training step of each stage, and test-time decoding, at the paper's model size.

The model has the paper's architecture with random weights: X-VLM's Swin-B encoder at 224 px (frozen),
the MLP mapper with the learned sparse mask, and GPT-2 small (12 layers, 768 wide) over its full
50257-token vocabulary. Images are random tensors, so the figures are the model's cost alone (no data
loading, no feature cache):

- XE: teacher-forced loss (+ N-pair loss) of ``--xe_batch`` captions of ``--caption_len`` tokens,
  backward and an AdamW step;
- SCST: ``--scst_batches`` images x 5 samples, CIDEr-D rewards against 5 references, the greedy
  (paper) or mean-of-others baseline, backward and an AdamW step;
- decoding: 2-beam search of ``--decode_images`` images (max 20, min 5 tokens).

Each figure is the mean of ``--repeats`` timed runs after one warm-up; on CUDA the peak memory is
reported too.

    python benchmarks/bench_steps.py [--device cuda] [--precision auto] [--repeats 5]
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

from engine.config import build_config  # noqa: E402
from engine.steps import ScstStep  # noqa: E402
from metrics.cider import CiderD  # noqa: E402
from metrics.cider_df import DocumentFrequency  # noqa: E402
from models.build import build_captioner  # noqa: E402
from models.decoding import DecodeOptions, decode  # noqa: E402
from models.tokenizer import load_tokenizer  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402
from utils.precision import autocast, resolve_precision  # noqa: E402

REFERENCES = (
    "a man riding a wave on top of a surfboard",
    "a surfer rides a large wave in the ocean",
    "a person on a surfboard riding a wave",
    "a man surfing on a big blue wave",
    "surfer in a black wetsuit riding a wave",
)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Mean seconds per call after one warm-up, and peak CUDA memory in GiB (None on the CPU)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def report(name: str, seconds: float, peak: float | None, items: int, unit: str) -> None:
    memory = f"{peak:6.2f} GiB" if peak is not None else "     n/a"
    print(f"{name:<34} {seconds * 1000:9.1f} ms {items / seconds:9.1f} {unit:<9} peak {memory}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--xe_batch", type=int, default=40)
    parser.add_argument("--caption_len", type=int, default=20)
    parser.add_argument("--scst_batches", type=int, nargs="+", default=[7, 40])
    parser.add_argument("--decode_images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    cfg = build_config(overrides={
        "encoder.vision_config": "xvlm_swin_b_224", "encoder.checkpoint": None,
        "model.gpt2_config": {"n_layer": 12, "n_embd": 768, "n_head": 12},
    })  # fmt: skip
    torch.manual_seed(0)
    model = build_captioner(cfg).to(device).train()
    tokenizer = load_tokenizer("gpt2")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    res = model.encoder.image_res
    print(f"{device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), {precision}, "
          f"torch {torch.__version__}")  # fmt: skip

    def train_step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            with autocast(precision, device):
                loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    images = torch.randn(args.xe_batch, 3, res, res, device=device)
    ids = torch.randint(0, len(tokenizer) - 1, (args.xe_batch, args.caption_len), device=device)
    xe = train_step(lambda: model(images, ids, ids.clone(), aux_weight=cfg.train.aux_weight)["loss"])
    seconds, peak = timed(xe, device, args.repeats)
    report(f"XE step, batch {args.xe_batch}", seconds, peak, args.xe_batch, "images/s")

    references = [list(REFERENCES)] * max(args.scst_batches)
    cider = CiderD(DocumentFrequency.from_references(references))
    for baseline in ("greedy", "mean"):
        opts = dataclasses.replace(cfg.scst_opts, baseline=baseline)
        scst = ScstStep(model, tokenizer, cider, references, opts, device)
        for batch in args.scst_batches:
            inputs = {"images": torch.randn(batch, 3, res, res, device=device), "indices": list(range(batch))}
            seconds, peak = timed(train_step(lambda s=scst, b=inputs: s(b)["loss"]), device, args.repeats)
            report(f"SCST step, {batch} x {opts.num_samples}, {baseline}", seconds, peak, batch, "images/s")

    model.eval()
    options = DecodeOptions.from_config(cfg.decode)
    images = torch.randn(args.decode_images, 3, res, res, device=device)

    @torch.no_grad()
    def beam_decode() -> None:
        with autocast(precision, device):
            decode(model, model.encode(images), options)

    seconds, peak = timed(beam_decode, device, args.repeats)
    report(f"{options.beams}-beam decode, {args.decode_images} images", seconds, peak, args.decode_images, "images/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
