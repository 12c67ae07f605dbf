"""Activation checkpointing (``train.grad_checkpointing``): GPT-2's blocks (transformers' own) and the
transformer mapper's layers keep less for backward, with the same losses and gradients, dropout on; decoding
in training mode (SCST's samples) keeps its KV cache."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config
from test_accumulation import CAPTIONS, _caption_batch
from test_scst import GOOD

from engine.runner import Run
from engine.steps import ScstStep, XEStep
from metrics.cider import CiderD
from metrics.cider_df import DocumentFrequency
from models.build import build_captioner

CPU = torch.device("cpu")


def _models(**overrides):
    """Two copies of one tiny captioner in training mode (GPT-2 dropout 0.1), the second checkpointed."""
    cfg = tiny_config(**{"model.mapping_type": "transformer", "train.aux_weight": 1.0, **overrides})
    models = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_captioner(cfg).train()
        if checkpointed:
            model.enable_grad_checkpointing()
        models.append(model)
    return cfg, models


def _saved_bytes(fn) -> tuple[object, int]:
    """``fn()`` and the bytes of the tensors autograd saved for backward while it ran."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        return fn(), total


def _run(model, step_fn, batch, seed: int) -> tuple[dict, dict, int]:
    """One step's outputs, parameter gradients and saved bytes; ``seed`` fixes the dropout masks."""
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    out, saved = _saved_bytes(lambda: step_fn(batch))
    out["loss"].backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads, saved


def _assert_same(plain: tuple, checkpointed: tuple) -> None:
    for key, value in plain[0].items():
        torch.testing.assert_close(checkpointed[0][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert checkpointed[1].keys() == plain[1].keys()
    for name, grad in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_checkpointed_xe_step_has_the_same_loss_and_gradients_and_saves_less(tokenizer):
    cfg, (plain_model, checkpointed_model) = _models()
    features = torch.randn(len(CAPTIONS), 17, 256, generator=torch.Generator().manual_seed(1))
    batch = _caption_batch(tokenizer, slice(0, len(CAPTIONS)), features)
    plain = _run(plain_model, XEStep(plain_model, CPU, cfg.train), batch, seed=3)
    checkpointed = _run(checkpointed_model, XEStep(checkpointed_model, CPU, cfg.train), batch, seed=3)
    _assert_same(plain, checkpointed)
    assert any(name.startswith("mapper.transformer.layers.5.") for name in plain[1])
    # Another dropout draw gives another loss: the equality above is not that of a model without dropout.
    assert not torch.equal(_run(plain_model, XEStep(plain_model, CPU, cfg.train), batch, seed=4)[0]["xe"],
                           plain[0]["xe"])  # fmt: skip
    # The vocabulary projection's logits, not checkpointed, dominate a tiny model's step: count what the
    # checkpointed parts (mapper and GPT-2 blocks) save. Their inputs, kept by the checkpoints, are not counted.
    saved = [_saved_bytes(lambda m=m: m.token_hidden(m.encode(**batch_features(batch)), batch["input_ids"]))[1]
             for m in (plain_model, checkpointed_model)]  # fmt: skip
    assert saved[1] < 0.2 * saved[0], saved
    assert checkpointed[2] < plain[2] - 0.8 * saved[0], (checkpointed[2], plain[2])


def batch_features(batch: dict) -> dict:
    return {"features": batch["features"]}


@pytest.mark.parametrize("fast_decode, dropout", [("off", True), ("static", False)])
def test_checkpointed_scst_step_has_the_same_loss_and_gradients(tokenizer, fast_decode: str, dropout: bool):
    """Sampling with gradients in training mode (dynamic cache, dropout on) and sampling without them then
    one teacher-forced pass (static cache, dropout off): the same samples, loss and gradients."""
    cfg, models = _models(**{"scst_opts.num_samples": 3, "scst_opts.sample_max_len": 10,
                             "scst_opts.fast_decode": fast_decode, "scst_opts.dropout": dropout})  # fmt: skip
    refs = [[GOOD] * 5, ["two green stars"] * 5]
    cider = CiderD(DocumentFrequency.from_references(refs))
    batch = {"features": torch.randn(2, 17, 256, generator=torch.Generator().manual_seed(2)), "indices": [0, 1]}
    plain, checkpointed = (
        _run(model, ScstStep(model, tokenizer, cider, refs, cfg.scst_opts, CPU), batch, seed=5) for model in models
    )
    _assert_same(plain, checkpointed)
    assert plain[0]["sample_len"] > 1.0  # the decode kept its cache: captions of several tokens


def test_a_run_with_grad_checkpointing_checkpoints_gpt2_and_the_mapper(tiny_dataset, tmp_path):
    cfg = tiny_config(tiny_dataset, tmp_path, **{"model.mapping_type": "transformer", "train.grad_checkpointing": True})
    run = Run(cfg)
    try:
        # transformers' switch: the flag of each module it checkpoints
        assert any(getattr(module, "gradient_checkpointing", False) for module in run.model.gpt.modules())
        assert run.model.mapper.checkpoint_context is not None
    finally:
        run.close()
