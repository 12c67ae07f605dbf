"""Mixed precision as asked, on the CPU as on CUDA: bf16 autocast, fp16 autocast with a gradient scaler,
proven by XE and SCST steps of a tiny model (finite, the loss falls, the reward rises). On CUDA the same
steps also replay the decode as CUDA graphs (``scripts/gpu_check.sh`` runs them there)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_config
from test_scst import GOOD, caption_batch

from engine.loop import Optimization
from engine.optim import linear_schedule
from engine.runner import Run
from engine.steps import ScstStep, XEStep
from metrics.cider import CiderD
from metrics.cider_df import DocumentFrequency
from models.api import resolve_run_precision
from models.build import build_captioner
from models.config import SavedCaptionerConfig
from models.decoding import DecodeOptions, captions_from_tokens, decode
from utils.checkpoint import read_checkpoint
from utils.precision import resolve_precision

CPU = torch.device("cpu")
DEVICES = [
    pytest.param(CPU, id="cpu"),
    pytest.param(
        torch.device("cuda"), id="cuda",
        marks=pytest.mark.optional_tool(None if torch.cuda.is_available() else "needs a CUDA device; none is present"),
    ),
]  # fmt: skip
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def test_precision_runs_as_asked_on_the_cpu_or_is_refused():
    assert resolve_precision("auto", CPU) == "fp32"
    assert [resolve_precision(p, CPU) for p in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    assert resolve_precision("fp32", torch.device("meta")) == "fp32"
    with pytest.raises(ValueError, match=r"^precision bf16: torch has no autocast on meta; use fp32 there$"):
        resolve_precision("bf16", torch.device("meta"))
    # A loaded run's own precision was chosen for its GPU: "auto" gives fp32 on the CPU, explicit runs as asked.
    run_cfg = SavedCaptionerConfig(precision="bf16")
    assert resolve_run_precision("auto", run_cfg, CPU) == "fp32"
    assert resolve_run_precision("fp16", run_cfg, CPU) == "fp16"


def _optimization(model, precision: str, device: torch.device, lr: float) -> Optimization:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    # No warm-up, no decay over these few steps: a constant learning rate.
    schedule = linear_schedule(optimizer, 10**9, 0.0)
    return Optimization(params, optimizer, schedule, torch.amp.GradScaler(device.type, enabled=precision == "fp16"),
                        precision)  # fmt: skip


def _train(step, model, batches: list[dict], precision: str, device: torch.device, lr: float) -> list[float]:
    """One optimizer step per batch through the training loop's update (the scaler for fp16); each loss
    checked finite; GPT-2's first layer checked to compute in ``precision``."""
    optimization, losses, dtypes = _optimization(model, precision, device, lr), [], []
    hook = model.gpt.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    for number, batch in enumerate(batches):
        with torch.autocast(device.type, dtype=HALF[precision]):
            loss = step(batch)["loss"]
        assert torch.isfinite(loss), losses
        optimization.update(loss, f"step {number + 1}")
        losses.append(float(loss.detach()))
    hook.remove()
    assert set(dtypes) == {HALF[precision]}, dtypes
    if precision == "fp16":
        assert optimization.scaler.is_enabled() and optimization.scaler.get_scale() > 1.0
    return losses


def _expected_reward(model, visual, tokenizer, cider, refs) -> float:
    options = DecodeOptions(method="sample", num_samples=64, max_len=10)
    uniforms = torch.rand(2 * 64, 10, generator=torch.Generator().manual_seed(0)).to(visual.device)
    with torch.no_grad():
        result = decode(model, model.encode(features=visual), options, uniforms=uniforms)
    captions = captions_from_tokens(tokenizer, result)
    return float(cider.score_candidates(captions, [r for r in refs for _ in range(64)]).mean())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_xe_then_scst_steps_stay_finite_and_learn(precision: str, device: torch.device, tokenizer, single_thread):
    """XE steps (two wordings per image, as tests/test_scst.py) stay finite and lower the loss; then 20 SCST
    steps (static cache, CUDA graphs on CUDA, dropout off) stay finite and raise the expected reward."""
    torch.manual_seed(0)
    scst = {"num_samples": 4, "baseline": "mean", "sample_max_len": 10, "dropout": False, "fast_decode": "graphs"}
    cfg = tiny_config(device=device.type, **{f"scst_opts.{key}": value for key, value in scst.items()})
    model = build_captioner(cfg).to(device).train()
    visual = torch.randn(2, 17, 256).to(device)
    batch = caption_batch(tokenizer)
    pairs = [{"features": visual[[image, image]], **batch} for image in (0, 1) * 40]
    losses = _train(XEStep(model, device, cfg.train), model, pairs, precision, device, 3e-3)
    assert sum(losses[-10:]) < sum(losses[:10]) / 2, losses

    refs = [[GOOD] * 5, [GOOD] * 5]
    cider = CiderD(DocumentFrequency.from_references([*refs, ["a blue square on the right"] * 5]))
    before = _expected_reward(model, visual, tokenizer, cider, refs)
    assert 0.5 < before < 9.0, before  # a real mixture of rewarded and unrewarded samples
    step = ScstStep(model, tokenizer, cider, refs, cfg.scst_opts, device)
    _train(step, model, [{"features": visual, "indices": [0, 1]}] * 20, precision, device, 3e-4)
    after = _expected_reward(model, visual, tokenizer, cider, refs)
    assert after > before + 0.5, (before, after)


def test_a_cpu_run_trains_in_the_precision_its_config_names(tiny_dataset, tmp_path):
    """train.precision fp16 on the CPU: the training steps compute in fp16, the run's log and checkpoint say
    fp16 and its scaler is active."""
    cfg = tiny_config(tiny_dataset, tmp_path, **{"train.precision": "fp16", "train.stop_after_steps": 2})
    run = Run(cfg)
    dtypes = []
    run.model.gpt.transformer.h[0].mlp.c_fc.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    try:
        assert run.precision == "fp16"
        result = run.train()
    finally:
        run.close()
    assert result.stopped and result.state.global_step == 2
    assert dtypes == [torch.float16] * 2
    train = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in train if r["event"] == "train"]
    assert len(losses) == 2 and all(0 < loss < 20 for loss in losses)
    payload = read_checkpoint(tmp_path / "last.pt")
    assert payload["config"]["train"]["precision"] == "fp16"
    assert payload["train_state"]["scaler"]["scale"] > 1.0  # an enabled scaler; a disabled one saves {}
    assert "fp16" in (tmp_path / "train.log").read_text().split("XE training:")[1].splitlines()[0]
