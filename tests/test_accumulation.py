"""Gradient accumulation (``train.accum_steps``): the gradients of a step taken in micro-batches are those of
the whole batch at once (a float64 model; the losses reduce in float32, as in training), for XE with the
N-pair loss and for SCST. The whole runs, one and two processes, are compared weight for weight in
tests/test_training.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.fx.experimental._config
from helpers import TINY_GPT2, tiny_config
from test_scst import GOOD
from torch.nn.parallel import DistributedDataParallel

from data.text import IGNORE_INDEX, clean_caption
from engine.loop import Optimization, accumulate
from engine.steps import ScstStep, XEStep
from models.build import build_captioner

CPU = torch.device("cpu")
CAPTIONS = ["a red circle on the left", "a shape", "two green stars in the middle of the picture", "a blue square",
            "one small yellow triangle", "a circle", "three red circles at the top right", "stars"]  # fmt: skip


def _model(**overrides):
    """A tiny float64 captioner without dropout (so that every pass computes the same function)."""
    torch.manual_seed(0)
    no_dropout = {**TINY_GPT2, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    cfg = tiny_config(**{"model.gpt2_config": no_dropout, "train.aux_weight": 1.0, **overrides})
    return cfg, build_captioner(cfg).double().train()


def _optimization(model) -> Optimization:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Optimization(params, optimizer, schedule, torch.amp.GradScaler("cpu", enabled=False), "fp32")


def _gradients(model, step, batches: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """The step's summed loss and the parameter gradients after accumulating ``batches`` as the loop does."""
    model.zero_grad(set_to_none=True)
    outs = accumulate(_optimization(model), batches, step, CPU)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(sum(out["loss"] for out in outs)), grads


def _caption_batch(tokenizer, rows: slice, features: torch.Tensor, key: str = "features") -> dict:
    ids = [tokenizer.encode(clean_caption(c)) for c in CAPTIONS[rows]]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.eos_token_id)
    labels = torch.full((len(ids), width), IGNORE_INDEX)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)], labels[row, : len(seq)] = torch.tensor(seq), torch.tensor(seq)
    return {key: features[rows], "input_ids": input_ids, "labels": labels}


def _assert_same(whole: tuple[float, dict], parts: tuple[float, dict]) -> None:
    assert parts[0] == pytest.approx(whole[0], rel=1e-6)
    assert parts[1].keys() == whole[1].keys()
    for name, grad in whole[1].items():
        torch.testing.assert_close(parts[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
def test_accumulated_xe_gradients_are_the_whole_batchs(tokenizer, mapping_type):
    """8 captions of 2 to 10 tokens in micro-batches of 3, 3 and 2: the token mean over all 8 and the N-pair
    loss with all 8 images as negatives, as batch 8 at once; the N-pair text embedding reads 4 tokens, fewer
    than most captions have."""
    cfg, model = _model(**{"model.mapping_type": mapping_type, "train.aux_text_tokens": 4})
    features = torch.randn(8, 17, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    step = XEStep(model, CPU, cfg.train)
    whole = _gradients(model, step, [_caption_batch(tokenizer, slice(0, 8), features)])
    parts = [_caption_batch(tokenizer, rows, features) for rows in (slice(0, 3), slice(3, 6), slice(6, 8))]
    _assert_same(whole, _gradients(model, step, parts))
    assert any(name.startswith("mapper.") for name in whole[1]) and "gpt.transformer.wte.weight" in whole[1]


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trained"])
def test_accumulated_xe_from_images_encodes_each_image_once_per_pass_it_needs(tokenizer, frozen):
    """From images, micro-batches of 3, 3 and 2 give the whole batch's gradients. A frozen encoder sees each
    micro-batch once: its output, computed for the N-pair negatives, is the forward's. A trained one sees
    each twice (without gradients for the negatives, then with them) and gets its gradients."""
    cfg, model = _model(**{"encoder.frozen": frozen})
    images = torch.randn(8, 3, 128, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    seen = []
    model.encoder.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    step = XEStep(model, CPU, cfg.train)
    whole = _gradients(model, step, [_caption_batch(tokenizer, slice(0, 8), images, "images")])
    assert seen == [8]
    seen.clear()
    parts = [_caption_batch(tokenizer, rows, images, "images") for rows in (slice(0, 3), slice(3, 6), slice(6, 8))]
    _assert_same(whole, _gradients(model, step, parts))
    assert seen == ([3, 3, 2] if frozen else [3, 3, 2, 3, 3, 2])
    assert any(name.startswith("encoder.") for name in whole[1]) == (not frozen)


@pytest.mark.parametrize("key", ["features", "images"])
def test_xe_step_moves_what_it_reads_to_its_device(tokenizer, key):
    """A model on the ``meta`` device, which refuses to mix with CPU tensors, and CPU batches: one batch, and
    two micro-batches with the N-pair negatives, run and back-propagate only if the step moves every tensor
    it reads (images or features, caption ids, labels, token counts) to its device."""
    # Meta tensors have no values: let the cross-entropy's selection of real tokens assume all are real.
    assume_real = torch.fx.experimental._config.patch(meta_nonzero_assume_all_nonzero=True)
    cfg, model = _model()
    model.to("meta")
    shape = (4, 17, 256) if key == "features" else (4, 3, 128, 128)
    inputs = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    devices = set()  # of every tensor the model's forward and its N-pair embeddings read

    def record(*args, **kwargs) -> None:
        devices.update(value.device.type for value in [*args, *kwargs.values()] if isinstance(value, torch.Tensor))

    model.register_forward_pre_hook(lambda module, args, kwargs: record(*args, **kwargs), with_kwargs=True)
    aux_embeddings = model.aux_embeddings
    model.aux_embeddings = lambda *args: (record(*args), aux_embeddings(*args))[1]
    step = XEStep(model, torch.device("meta"), cfg.train)
    for rows in [[slice(0, 4)], [slice(0, 2), slice(2, 4)]]:
        batches = [_caption_batch(tokenizer, r, inputs, key) for r in rows]
        with assume_real:
            plans = step.plan(batches)
        assert {plan.xe_weight.device.type for plan in plans} == {"meta"}  # NCCL all-reduces device tensors
        for batch, plan in zip(batches, plans, strict=True):
            with assume_real:
                out = step(batch, plan)
            assert {name: value.device.type for name, value in out.items()} == dict.fromkeys(out, "meta")
            out["loss"].backward()
    assert devices == {"meta"}


def test_xe_step_passes_train_aux_text_tokens_to_the_n_pair_loss(tokenizer):
    """The step's N-pair loss embeds the captions' first ``train.aux_text_tokens`` tokens, as the model's own
    loss does when told so; 4 tokens give another loss than the captions' whole lengths."""
    cfg, model = _model(**{"train.aux_text_tokens": 4})
    features = torch.randn(8, 17, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    batch = _caption_batch(tokenizer, slice(0, 8), features)
    with torch.no_grad():
        aux = XEStep(model, CPU, cfg.train)(batch)["aux"]
        by_length = {n: model(None, batch["input_ids"], batch["labels"], 1.0, aux_text_tokens=n, features=features)
                     for n in (4, 20)}  # fmt: skip
    torch.testing.assert_close(aux, by_length[4]["aux"])
    assert abs(float(by_length[20]["aux"] - aux)) > 1e-6


@pytest.fixture
def one_process_group():
    """A default process group of one process (gloo, in memory), for a DDP wrapper in this process."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_xe_step_of_a_ddp_model_syncs_gradients_only_in_the_last_micro_batch(tokenizer, one_process_group):
    """With the captioner wrapped in DDP, the step reads the captioner itself (its encoder, for the N-pair
    negatives), runs the forward through the wrapper, holds back DDP's gradient all-reduce around the
    micro-batches that are not a step's last, and gives the whole batch's gradients."""
    cfg, model = _model()
    ddp = DistributedDataParallel(model)
    step = XEStep(ddp, CPU, cfg.train)
    with step.no_sync():
        assert not ddp.require_backward_grad_sync
    assert ddp.require_backward_grad_sync
    calls = []
    ddp.register_forward_pre_hook(lambda module, args: calls.append(args[1].shape[0]))
    features = torch.randn(8, 17, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    whole = _gradients(model, step, [_caption_batch(tokenizer, slice(0, 8), features)])
    parts = [_caption_batch(tokenizer, rows, features) for rows in (slice(0, 3), slice(3, 8))]
    _assert_same(whole, _gradients(model, step, parts))
    assert calls == [8, 3, 5]


class _LengthReward:
    """Reward = the number of characters of the caption (a stand-in for CIDEr-D with the same interface)."""

    def score_candidates(self, candidates: list[str], references: list) -> np.ndarray:
        return np.array([float(len(c)) for c in candidates])


def test_accumulated_scst_gradients_are_the_whole_batchs(tokenizer):
    """SCST, 4 images x 3 samples in micro-batches of 1 and 3 images: each image samples from its own seed,
    so the samples, rewards and greedy baselines are the whole batch's, and the gradient is the mean over
    all 12 samples."""
    cfg, model = _model(**{"scst_opts.num_samples": 3, "scst_opts.sample_max_len": 10, "scst_opts.dropout": False})
    refs = [[GOOD] * 5, ["two green stars"] * 5, ["a blue square"] * 5, ["a shape"] * 5]
    # An untrained model's samples share no n-gram with any reference: reward their length instead, so that
    # the advantages differ from zero.
    step = ScstStep(model, tokenizer, _LengthReward(), refs, cfg.scst_opts, CPU, seed=5)
    features = torch.randn(4, 17, 256, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    whole = _gradients(model, step, [{"features": features, "indices": [0, 1, 2, 3]}])
    parts = [{"features": features[:1], "indices": [0]}, {"features": features[1:], "indices": [1, 2, 3]}]
    assert step.plan(parts) == [0.25, 0.75]  # each micro-batch's share of the step's 12 captions
    _assert_same(whole, _gradients(model, step, parts))
    assert abs(whole[0]) > 1e-3
