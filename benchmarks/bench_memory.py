"""Memory of a training step at GPT-2 small, medium and large, computed on the CPU; then compiled against
eager XE step time on the CPU.

Memory: the paper's model (MLP mapper, sparse mask, full 50257-token vocabulary, fp32) with random weights and
GPT-2 of each size. For the paper's XE step (``--xe_batch`` 30 captions of 30 tokens, N-pair loss) and SCST
step (``--scst_images`` 7 images x 5 samples of up to 20 tokens) it counts the bytes autograd saves for
backward during the forward pass (``torch.autograd.graph.saved_tensors_hooks``: each storage once,
parameters excluded), which does not depend on the device, plus the inputs that checkpointed blocks keep
(``train.grad_checkpointing``). The encoder is frozen and runs without gradients, so its input is replaced
by random encoder features (50 x 1024 per image): it saves nothing. Activations grow linearly with the
batch and with the number of GPT-2 blocks (all alike): each step is measured at two small batch sizes
(``--measure``) with GPT-2 of the size's width but one and two blocks (``--layers``), and extrapolated along
both lines to the paper's batch and the size's depth (GPT-2 large would not run a full batch quickly on a
CPU); parameters are counted on the full model built on the meta device. SCST is measured as the recipe runs it (dropout
on: the sampling decode keeps its graph over 20 steps, which checkpointing cannot shrink) and with dropout
off (samples drawn without gradients, one teacher-forced pass with gradients). Random weights rarely emit the
stop token, so samples run to 20 tokens: the worst case. Fixed memory: parameters (the frozen Swin-B
encoder's too), gradients and AdamW's two moments of the trainable ones, all fp32. The table gives the
largest batch whose computed total stays within 90% of each GPU size (10% left for the CUDA context,
workspaces and fragmentation): computed, not measured on a GPU.

Speed: ``--compile_size`` (demo: 2-layer GPT-2, 128 wide) XE steps of ``--compile_batch`` captions,
eager and ``torch.compile`` (train.compile) taking turns after a warm-up that compiles, as a ratio.

    python benchmarks/bench_memory.py [--sizes small medium large] [--repeats 5] [--threads 2]

On a GPU (the GPU check), ``--device cuda`` instead measures XE steps of ``--compile_batch`` captions at GPT-2
``--device_size``: peak memory and time plain, with checkpointing, in 3 micro-batches, and compiled.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.harness import SIZES  # noqa: E402
from engine.config import CONFIG_DIR, TrainConfig, build_config  # noqa: E402
from engine.loop import Optimization, accumulate  # noqa: E402
from engine.optim import build_optimizer, linear_schedule  # noqa: E402
from engine.steps import XEStep, compile_forward  # noqa: E402
from models.build import build_captioner  # noqa: E402
from models.decoding import DecodeOptions, decode, dropout_off, teacher_forced_logprobs  # noqa: E402
from utils.distributed import resolve_device  # noqa: E402

GPT2_SIZES = {"small": (12, 768, 12), "medium": (24, 1024, 16), "large": (36, 1280, 20)}  # layers, width, heads
GPU_GB = (12, 16, 24, 40, 80)
CAPTION_TOKENS = 30
GIB = 2**30


class SavedBytes:
    """Bytes held for backward while a block runs: storages autograd saves (each once, parameters excluded)
    and the inputs that checkpointed GPT-2 blocks keep (counted by a hook on each block)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.blocks = list(model.gpt.transformer.h)
        self.checkpointed = any(getattr(m, "gradient_checkpointing", False) for m in self.blocks)
        self.storages: dict[int, int] = {}
        self.block_inputs = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def block_input(self, module: torch.nn.Module, args: tuple) -> None:
        if self.checkpointed and module.training and torch.is_grad_enabled():
            self.block_inputs += args[0].numel() * args[0].element_size()

    def measure(self, fn: Callable[[], object]) -> int:
        handles = [block.register_forward_pre_hook(self.block_input) for block in self.blocks]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
                result = fn()
        finally:
            for handle in handles:
                handle.remove()
        del result
        return sum(self.storages.values()) + self.block_inputs


def build_model(size: str, layers: int | None = None, device: str = "cpu") -> tuple[torch.nn.Module, TrainConfig]:
    """The paper's model with GPT-2 ``size`` (random weights; ``layers`` blocks instead of the size's own), in
    training mode."""
    full_layers, width, heads = GPT2_SIZES[size]
    gpt2 = {"n_layer": layers or full_layers, "n_embd": width, "n_head": heads}
    cfg = build_config([CONFIG_DIR / "xe.yaml"], {"encoder.checkpoint": None, "model.gpt2_config": gpt2})
    torch.manual_seed(0)
    with torch.device(device):
        return build_captioner(cfg).train(), cfg.train


def xe_bytes(model: torch.nn.Module, train: TrainConfig, batch: int) -> int:
    """Saved bytes of one XE forward (loss + N-pair) of ``batch`` captions of 30 tokens."""
    features = torch.randn(batch, 50, 1024)
    ids = torch.randint(0, 50000, (batch, CAPTION_TOKENS))
    step = XEStep(model, torch.device("cpu"), train)
    return SavedBytes(model).measure(lambda: step({"features": features, "input_ids": ids, "labels": ids.clone()}))


def scst_bytes(model: torch.nn.Module, images: int, teacher_forced: bool) -> int:
    """Saved bytes of one SCST forward: 5 samples per image, 20 tokens, with the decode's graph (dropout
    on, the recipe) or one teacher-forced pass after sampling without gradients (dropout off)."""
    options = DecodeOptions(method="sample", num_samples=5, max_len=20, min_len=20)
    uniforms = torch.rand(images * 5, 20, generator=torch.Generator().manual_seed(images))
    features = torch.randn(images, 50, 1024)

    def forward() -> torch.Tensor:
        prefix = model.encode(features=features)
        if not teacher_forced:
            return decode(model, prefix, options, True, uniforms=uniforms).token_logprobs
        with dropout_off(model):
            with torch.no_grad():
                samples = decode(model, prefix, options, uniforms=uniforms)
            return teacher_forced_logprobs(model, prefix, samples)

    return SavedBytes(model).measure(forward)


def fitted(measure: Callable[[int, int], int], batches: list[int], layers: list[int], full: int) -> tuple[float, float]:
    """(bytes per batch item, bytes at batch 0) at ``full`` GPT-2 blocks, from ``measure(layers, batch)`` at
    the 2 x 2 corners of ``layers`` and ``batches``: linear in the batch, and in the number of blocks (they are
    identical, so each adds the same bytes)."""
    lines = []
    for count in layers:
        low, high = measure(count, batches[0]), measure(count, batches[-1])
        slope = (high - low) / (batches[-1] - batches[0])
        lines.append((slope, low - slope * batches[0]))
    (slope_a, icpt_a), (slope_b, icpt_b) = lines
    share = (full - layers[0]) / (layers[-1] - layers[0])
    return slope_a + (slope_b - slope_a) * share, icpt_a + (icpt_b - icpt_a) * share


def fixed_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter bytes; training holds the trainable ones four times (weights,
    gradients, AdamW's two moments)."""
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return trainable, frozen


def largest_batch(fixed: float, slope: float, intercept: float, gb: int) -> int:
    return max(int((0.9 * gb * 1e9 - fixed - intercept) // slope), 0)


KINDS = {  # step -> (the paper's batch, saved bytes of one forward at a batch size)
    "XE (30 captions)": (30, lambda model, train, b: xe_bytes(model, train, b)),
    "SCST recipe (7 x 5, dropout on)": (7, lambda model, train, b: scst_bytes(model, b, teacher_forced=False)),
    "SCST teacher-forced (7 x 5, dropout off)": (7, lambda model, train, b: scst_bytes(model, b, teacher_forced=True)),
}


def memory_rows(size: str, batches: list[int], layers: list[int]) -> list[dict]:
    """Per step kind at GPT-2 ``size``: fixed bytes, bytes per batch item, the paper's batch's total and the
    largest batch per GPU size; activations measured with ``layers`` GPT-2 blocks and extrapolated."""
    full_model, _ = build_model(size, device="meta")
    trainable, frozen = fixed_bytes(full_model)
    fixed = 4 * trainable + frozen
    saved: dict[tuple, int] = {}
    for count in layers:
        model, train = build_model(size, count)
        for checkpointing in (False, True):
            if checkpointing:
                model.enable_grad_checkpointing()
            for kind, (_, measure) in KINDS.items():
                # Decoding pauses checkpointing (it needs GPT-2's KV cache): the recipe's SCST saves the same
                for batch in batches:
                    if checkpointing and "dropout on" in kind:
                        saved[kind, True, count, batch] = saved[kind, False, count, batch]
                    else:
                        saved[kind, checkpointing, count, batch] = measure(model, train, batch)
    rows = []
    for kind, (paper_batch, _) in KINDS.items():
        for checkpointing in (False, True):
            slope, intercept = fitted(lambda c, b, k=kind, on=checkpointing: saved[k, on, c, b], batches, layers,
                                      GPT2_SIZES[size][0])  # fmt: skip
            rows.append({
                "size": size, "kind": kind, "checkpointing": checkpointing, "fixed": fixed, "per_item": slope,
                "paper": fixed + intercept + paper_batch * slope,
                "fits": [largest_batch(fixed, slope, intercept, gb) for gb in GPU_GB],
            })  # fmt: skip
    return rows


def print_memory(rows: list[dict]) -> None:
    head = "| GPT-2 | step | checkpointing | weights, grads, AdamW (GB) | per item (MB) | paper's batch (GB) |"
    print(head + "".join(f" batch in {gb} GB |" for gb in GPU_GB))
    print("|---|---|---|---:|---:|---:|" + "---:|" * len(GPU_GB))
    for r in rows:
        fits = " | ".join(str(n) for n in r["fits"])
        print(f"| {r['size']} | {r['kind']} | {'on' if r['checkpointing'] else 'off'} | {r['fixed'] / 1e9:.2f} | "
              f"{r['per_item'] / 1e6:.1f} | {r['paper'] / 1e9:.2f} | {fits} |")  # fmt: skip


def compile_ratio(size: str, batch: int, repeats: int) -> tuple[float, float, float]:
    """Seconds per XE step (forward, backward, AdamW) eager and compiled, taking turns, and the compile time."""
    overrides = {"encoder.checkpoint": None, "encoder.vision_config": SIZES[size]["encoder.vision_config"],
                 "model.gpt2_config": SIZES[size]["model.gpt2_config"]}  # fmt: skip
    cfg = build_config([CONFIG_DIR / "xe.yaml"], overrides)
    steps, batches = {}, []
    generator = torch.Generator().manual_seed(0)
    for _ in range(repeats + 1):
        ids = torch.randint(0, 50000, (batch, CAPTION_TOKENS), generator=generator)
        batches.append({"features": torch.randn(batch, 17, 256, generator=generator), "input_ids": ids,
                        "labels": ids.clone()})  # fmt: skip
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        model = build_captioner(cfg).train()
        optimizer = build_optimizer(model, cfg.train)
        optimization = Optimization(list(p for p in model.parameters() if p.requires_grad), optimizer,
                                    linear_schedule(optimizer, 1000, 0.0), torch.amp.GradScaler("cpu", enabled=False),
                                    "fp32")  # fmt: skip
        compiled = compile_forward(model) if name == "compiled" else None
        steps[name] = (XEStep(model, torch.device("cpu"), cfg.train, compiled), optimization)
    seconds = {"eager": 0.0, "compiled": 0.0}
    compile_seconds = 0.0
    for round_, batch_ in enumerate(batches):
        for name, (step, optimization) in steps.items():
            start = time.perf_counter()
            optimization.update(step(batch_)["loss"], "bench")
            elapsed = time.perf_counter() - start
            if round_:
                seconds[name] += elapsed / repeats
            elif name == "compiled":
                compile_seconds = elapsed
    return seconds["eager"], seconds["compiled"], compile_seconds


def _device_step(model: torch.nn.Module, train: TrainConfig, device: torch.device, batch: int, accum: int,
                 compiled: torch.nn.Module | None = None) -> Callable[[], None]:  # fmt: skip
    """One XE optimizer step of ``batch`` captions in ``accum`` micro-batches, as the training loop takes it."""
    optimizer = build_optimizer(model, train)
    optimization = Optimization([p for p in model.parameters() if p.requires_grad], optimizer,
                                linear_schedule(optimizer, 1000, 0.0), torch.amp.GradScaler(device.type, enabled=False),
                                "fp32")  # fmt: skip
    step = XEStep(model, device, train, compiled)
    ids = torch.randint(0, 50000, (batch, CAPTION_TOKENS), device=device)
    features = torch.randn(batch, 50, 1024, device=device)
    micro = [{"features": f, "input_ids": i, "labels": i.clone()} for f, i in
             zip(features.chunk(accum), ids.chunk(accum), strict=True)]  # fmt: skip

    def run() -> None:
        accumulate(optimization, micro, step, device)
        optimization.step("bench")

    return run


def on_device(device: torch.device, size: str, batch: int, repeats: int) -> None:
    """Peak memory and time of XE steps at GPT-2 ``size`` on ``device`` (fp32): plain, checkpointed, in 3
    micro-batches, and compiled (its first step compiles: timed apart)."""
    from benchmarks.bench_steps import report, timed

    variants = {"plain": (False, 1, False), "checkpointing": (True, 1, False), "accum_steps 3": (False, 3, False),
                "compiled": (False, 1, True)}  # fmt: skip
    for name, (checkpointing, accum, compile_) in variants.items():
        model, train = build_model(size)
        model = model.to(device)
        if checkpointing:
            model.enable_grad_checkpointing()
        step = _device_step(model, train, device, batch, accum, compile_forward(model) if compile_ else None)
        started = time.perf_counter()
        step()
        first = time.perf_counter() - started
        seconds, peak = timed(step, device, repeats)
        report(f"XE {size}, batch {batch}, {name}", seconds, peak, batch, "captions/s")
        print(f"  first step {first:.1f} s", flush=True)
        del model, step
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", default=list(GPT2_SIZES), choices=list(GPT2_SIZES),
                        help="GPT-2 sizes of the memory table (none: the speed comparison only)")
    parser.add_argument("--measure", nargs=2, type=int, default=[1, 2], metavar=("LOW", "HIGH"),
                        help="batch sizes measured for the line (captions for XE, images for SCST)")
    parser.add_argument("--layers", nargs=2, type=int, default=[1, 2], metavar=("LOW", "HIGH"),
                        help="GPT-2 blocks measured for the line in depth")
    parser.add_argument("--compile_size", default="demo", choices=list(SIZES))
    parser.add_argument("--compile_batch", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5, help="timed compiled and eager steps each")
    parser.add_argument("--skip_compile", action="store_true", help="the memory table only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu",
                        help="cuda: measure peak memory and time of XE steps on the GPU instead (the GPU check)")
    parser.add_argument("--device_size", default="medium", choices=list(GPT2_SIZES))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type != "cpu":
        on_device(device, args.device_size, args.compile_batch, args.repeats)
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; fp32; computed from saved tensors")
    rows = []
    for size in args.sizes:
        rows += memory_rows(size, args.measure, args.layers)
    if rows:
        print_memory(rows)
    if not args.skip_compile:
        eager, compiled, compile_seconds = compile_ratio(args.compile_size, args.compile_batch, args.repeats)
        print(f"XE step, {args.compile_size} size, batch {args.compile_batch}, CPU: eager {eager * 1e3:.0f} ms, "
              f"compiled {compiled * 1e3:.0f} ms (compiled/eager {compiled / eager:.2f}x; first compiled step "
              f"{compile_seconds:.0f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
