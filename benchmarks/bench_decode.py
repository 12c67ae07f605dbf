"""Benchmark caption decoding: models.decoding (batched, KV cache) against the reference code's search.

The reference decodes one image at a time and, at every step, runs GPT-2 (with its vocabulary projection
over every position) over the whole ``[prefix ; tokens so far]`` of all its beams, without a cache; it
keeps the beams with the best length-averaged log-probability and stops at '.'. It is re-implemented
here as ``reference_beam_search`` and runs in the same process on the same prefixes.

Both decode exactly ``--max_len`` tokens per caption (stop tokens are banned before ``max_len``, i.e.
min_len = max_len), so they do the same work and, up to floating-point ties, return the same captions
(reported as "same"). Models have random weights: GPT-2 of the demo size (2 layers, 256 wide, 4 heads,
prefix 17 x 256 as from the swin_demo encoder) and of GPT-2 small's size (12 layers, 768 wide, 12 heads,
prefix 50 x 768); both use the 50257-token vocabulary. The prefix is computed once, outside the timing.

"overhead" is (decode time - prefix pass) / (max_len - 1) divided by the time of one bare cached forward
step of the same rows (the same model calls without any search logic); 1.0 means the search is free.
The reference is slow, so it decodes only ``--ref_images`` images (its time per caption does not depend
on the batch size) and its rate is extrapolated per caption.

    python benchmarks/bench_decode.py [--models demo small] [--batch_sizes 1 8 32] [--beams 1 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from models.captioner import OPGCaptioner, Prefix  # noqa: E402
from models.decoding import CachedPrefixLM, DecodeOptions, decode  # noqa: E402
from models.gpt2 import build_gpt2  # noqa: E402
from models.mapper import MLPMapper  # noqa: E402

STOP_ID = 13


@dataclass(frozen=True)
class ModelSpec:
    name: str
    gpt2: dict
    prefix_length: int
    visual_dim: int
    ref_images: int


SPECS = {
    "demo": ModelSpec("demo", {"n_layer": 2, "n_embd": 256, "n_head": 4}, 17, 256, 8),
    "small": ModelSpec("small", {"n_layer": 12, "n_embd": 768, "n_head": 12}, 50, 1024, 2),
}


def build_model(spec: ModelSpec) -> OPGCaptioner:
    gpt = build_gpt2("gpt2", spec.gpt2)
    mapper = MLPMapper(spec.visual_dim, gpt.config.n_embd, spec.prefix_length)
    return OPGCaptioner(nn.Identity(), mapper, gpt, None).eval()


@torch.no_grad()
def reference_beam_search(
    model: OPGCaptioner, embeds: torch.Tensor, beams: int, max_len: int, min_len: int = 0
) -> list[int]:
    """The reference search for one image (prefix ``embeds`` P x D): no cache, no batching. ``min_len``
    (not in the reference) bans '.' for the first steps so that timings compare equal work."""
    gpt = model.gpt
    sequence = embeds.unsqueeze(0)
    tokens = torch.zeros(1, 0, dtype=torch.long)
    scores = torch.zeros(1)
    lengths = torch.zeros(1)
    stopped = torch.zeros(1, dtype=torch.bool)
    for step in range(max_len):
        logprobs = gpt(inputs_embeds=sequence).logits[:, -1].softmax(-1).log()
        if step < min_len:
            logprobs[:, STOP_ID] = -float("inf")
        vocab = logprobs.shape[1]
        # A stopped beam may only continue with token 0 at no cost, so its score stays as it was.
        logprobs[stopped] = -float("inf")
        logprobs[stopped, 0] = 0.0
        lengths = lengths + (~stopped).float()
        average = (scores[:, None] + logprobs) / lengths[:, None]
        best, flat = average.view(-1).topk(beams)
        source, token = flat // vocab, flat % vocab
        lengths, stopped = lengths[source], stopped[source]
        scores = best * lengths
        tokens = torch.cat([tokens[source], token[:, None]], dim=1)
        stopped = stopped | (token == STOP_ID)
        sequence = torch.cat([sequence[source], gpt.transformer.wte(token)[:, None]], dim=1)
        if stopped.all():
            break
    return tokens[(scores / lengths).argmax()].tolist()


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Best wall time over ``repeats`` runs (the least disturbed by other processes), and the result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


@torch.no_grad()
def bare_model_time(model: OPGCaptioner, prefix: Prefix, rows_per_image: int, steps: int, repeats: int):
    """Best (prefix pass time, time of ``steps`` cached forward steps) for the same rows as decoding."""

    def run() -> tuple[float, float]:
        lm = CachedPrefixLM(model, prefix)
        start = time.perf_counter()
        logits = lm.prefill(rows_per_image)
        prefill = time.perf_counter() - start
        tokens = logits.argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            lm.step(tokens)
        return prefill, time.perf_counter() - start

    runs = [run() for _ in range(repeats)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def bench_model(spec: ModelSpec, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(spec)
    largest = max(args.batch_sizes)
    with torch.no_grad():
        prefix = model.prefix_from_visual(torch.randn(largest, spec.prefix_length, spec.visual_dim))
    rows = []
    for beams in args.beams:
        method = "beam" if beams > 1 else "greedy"
        options = DecodeOptions(method=method, beams=beams, max_len=args.max_len, min_len=args.max_len)
        ref_images = args.ref_images or spec.ref_images
        start = time.perf_counter()
        ref_tokens = [
            reference_beam_search(model, prefix.embeds[i], beams, args.max_len, args.max_len) for i in range(ref_images)
        ]
        ref_rate = ref_images / (time.perf_counter() - start)
        for batch in args.batch_sizes:
            part = Prefix(prefix.embeds[:batch], prefix.keep[:batch])
            seconds, result = timed(lambda p=part, o=options: decode(model, p, o), args.repeats)
            prefill, steps = bare_model_time(model, part, beams, args.max_len - 1, args.repeats)
            overhead = (seconds - prefill) / steps
            checked = min(batch, ref_images)
            same = sum(result.tokens[i].tolist() == ref_tokens[i] for i in range(checked))
            rows.append({
                "model": spec.name, "method": f"{method}" + (f" {beams}" if beams > 1 else ""), "batch": batch,
                "ours": batch / seconds, "ref": ref_rate, "speedup": batch / seconds / ref_rate,
                "overhead": overhead, "step_ms": 1000 * steps / (args.max_len - 1), "same": f"{same}/{checked}",
            })  # fmt: skip
            print(format_row(rows[-1]), flush=True)
    return rows


HEADER = (
    f"{'model':<6} {'method':<7} {'batch':>5} {'ours cap/s':>10} {'ref cap/s':>9} {'speedup':>8} "
    f"{'overhead':>8} {'step ms':>8} {'same':>5}"
)


def format_row(r: dict) -> str:
    return (
        f"{r['model']:<6} {r['method']:<7} {r['batch']:>5} {r['ours']:>10.2f} {r['ref']:>9.3f} "
        f"{r['speedup']:>7.1f}x {r['overhead']:>8.2f} {r['step_ms']:>8.1f} {r['same']:>5}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(SPECS), default=["demo", "small"])
    parser.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--beams", nargs="+", type=int, default=[1, 3])
    parser.add_argument("--max_len", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of our decoder (best is kept)")
    parser.add_argument("--ref_images", type=int, help="images for the reference (default: demo 8, small 2)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; {args.max_len} tokens per caption (min_len = max_len)"
    )
    print(HEADER)
    start = time.perf_counter()
    for name in args.models:
        bench_model(SPECS[name], args)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
