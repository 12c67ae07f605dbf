"""``train.compile``: the XE training forward compiles as one graph (no graph break), one graph serves every
batch size and caption length, and compiled steps give eager's losses. The last test compiles with
inductor on the CPU (a C++ compiler is needed): the slowest test of the suite, one compilation of a tiny
model's forward and backward, about 2 to 3 minutes on 2 cores."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import TINY_GPT2, tiny_config
from test_accumulation import _caption_batch

from engine import runner
from engine.loop import Optimization
from engine.runner import Run
from engine.steps import XEStep, compile_forward, compiled_call
from models.build import build_captioner

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model():
    """The recipe's XE parts at a tiny size, without dropout: MLP mapper, sparse mask, N-pair loss, and an
    output vocabulary (its index lookup must not split the graph)."""
    torch.manual_seed(0)
    no_dropout = {**TINY_GPT2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    cfg = tiny_config(**{"model.gpt2_config": no_dropout, "train.aux_weight": 1.0})
    model = build_captioner(cfg, output_ids=torch.arange(0, 40000, 3)).train()
    assert model.masks_prefix and cfg.train.use_aux_loss
    return cfg, model


def _batches(tokenizer, sizes: list[int]) -> list[dict]:
    """Batches of ``sizes`` captions (different caption lengths too) with random encoder features."""
    features = torch.randn(8, 17, 256, generator=torch.Generator().manual_seed(1))
    batches, start = [], 0
    for size in sizes:
        batch = _caption_batch(tokenizer, slice(start % 8, start % 8 + size), features)
        batch["input_ids"] = batch["input_ids"] - batch["input_ids"] % 3  # in the output vocabulary
        batch["labels"] = torch.where(batch["labels"] == -100, -100, batch["input_ids"])
        batches.append(batch)
        start += size
    return batches


def test_the_xe_forward_is_one_graph(tokenizer):
    _, model = _model()
    [batch] = _batches(tokenizer, [4])
    with compiled_call():
        explanation = torch._dynamo.explain(model)(None, batch["input_ids"], batch["labels"], aux_weight=1.0,
                                                   features=batch["features"])  # fmt: skip
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_one_graph_serves_every_batch_size_and_caption_length(tokenizer):
    """Batches of 4, 4, 3 and 2 captions, each padded to its own longest, through the XE step: dynamo traces
    once (its eager backend here: whether it recompiles is dynamo's decision, whatever backend compiles the
    graph), so the step runs the compiled forward and captures the real tokens' selection in the graph."""
    cfg, model = _model()
    graphs = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)
        return graph.forward

    compiled = XEStep(model, CPU, cfg.train, compile_forward(model, backend=counting_backend))
    eager = XEStep(model, CPU, cfg.train)
    batches = _batches(tokenizer, [4, 4, 3, 2])
    assert len({tuple(b["input_ids"].shape) for b in batches}) == 4
    for batch in batches:
        torch.testing.assert_close(compiled(batch)["loss"], eager(batch)["loss"])
    assert len(graphs) == 1


def test_a_run_with_train_compile_trains_through_the_compiled_forward(tiny_dataset, tmp_path, monkeypatch):
    """An XE step of a run with ``train.compile`` (dynamo's eager backend here, as above) runs its forward
    through the one compiled graph."""
    graphs, calls = [], []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(graph)

        def forward(*args):
            calls.append(len(graphs))
            return graph.forward(*args)

        return forward

    monkeypatch.setattr(runner, "compile_forward", lambda module: compile_forward(module, backend=counting_backend))
    run = Run(tiny_config(tiny_dataset, tmp_path, **{"train.compile": True, "train.stop_after_steps": 1}))
    try:
        assert run.train().stopped
    finally:
        run.close()
    assert (len(graphs), calls) == (1, [1])


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler")
def test_compiled_xe_steps_give_the_eager_losses(tokenizer):
    """Three XE steps (AdamW, batches of 4, 4 and 3) compiled with inductor against eager, from the same
    weights: the same losses within float tolerance, and the same weights after them."""
    cfg, eager_model = _model()
    _, compiled_model = _model()
    losses = {}
    runs = [("eager", eager_model, None), ("compiled", compiled_model, compile_forward(compiled_model))]
    for name, model, compiled in runs:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        optimization = Optimization(params, optimizer, schedule, torch.amp.GradScaler("cpu", enabled=False), "fp32")
        step = XEStep(model, CPU, cfg.train, compiled)
        losses[name] = []
        for number, batch in enumerate(_batches(tokenizer, [4, 4, 3])):
            loss = step(batch)["loss"]
            optimization.update(loss, f"step {number + 1}")
            losses[name].append(float(loss.detach()))
    torch.testing.assert_close(losses["compiled"], losses["eager"], rtol=1e-4, atol=1e-5)
    assert losses["eager"][2] != losses["eager"][0]
    compiled_weights = compiled_model.state_dict()
    for name, eager in eager_model.state_dict().items():
        torch.testing.assert_close(compiled_weights[name], eager, rtol=1e-3, atol=1e-5, msg=name)
