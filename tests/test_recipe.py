"""The reference recipe: the shipped configs hold the paper code's values, and the optimizer and schedule
behave as the reference's (transformers' schedule as the oracle)."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_GPT2, tiny_config
from transformers import get_linear_schedule_with_warmup

from engine.config import CONFIG_DIR, build_config
from engine.optim import build_optimizer, linear_schedule
from models.build import build_captioner


def test_xe_config_is_the_reference_recipe():
    cfg = build_config([CONFIG_DIR / "xe.yaml"])
    # train_scst.py / train_xs.py / Captioning.yaml of the reference code
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.weight_decay, cfg.train.epochs) == (30, 2e-5, 0.01, 10)
    assert (cfg.train.warmup_ratio, cfg.train.grad_clip, cfg.train.precision) == (0.01, 0.0, "fp32")
    assert (cfg.train.adam_beta2, cfg.train.adam_eps, cfg.train.decay_norm_and_bias) == (0.999, 1e-6, True)
    assert (cfg.train.aux_weight, cfg.train.aux_text_tokens, cfg.train.label_smoothing) == (0.1, 20, 0.0)
    assert (cfg.data.max_words, cfg.data.max_tokens, cfg.data.augment) == (30, 30, True)
    assert (cfg.model.use_sparse_mask, cfg.model.sparse_mask_mode, cfg.model.threshold) == (True, "hard", 0.1)
    assert (cfg.encoder.frozen, cfg.encoder.drop_path, cfg.model.prefix_length) == (True, 0.1, None)
    assert (cfg.decode.beams, cfg.decode.max_len, cfg.decode.min_len) == (1, 30, 0)  # --beam_size 1, 30 tokens


def test_scst_config_is_the_reference_recipe():
    cfg = build_config([CONFIG_DIR / "scst.yaml"])
    # Captioning_scst.yaml and optim.py of the reference code
    assert cfg.scst and (cfg.train.lr, cfg.train.batch_size, cfg.train.total_steps) == (5e-6, 7, 56642)
    assert cfg.train.epochs == 5  # --epoch_scst; at 16,184 steps per epoch of COCO the schedule ends first
    assert (cfg.train.warmup_ratio, cfg.train.adam_beta2, cfg.train.adam_eps) == (0.1, 0.98, 1e-8)
    assert (cfg.train.weight_decay, cfg.train.decay_norm_and_bias, cfg.train.use_aux_loss) == (0.01, False, False)
    opts = cfg.scst_opts
    assert (opts.num_samples, opts.baseline, opts.sample_max_len, opts.sample_min_len) == (5, "greedy", 20, 0)
    assert (opts.reward_eos, opts.dropout, opts.temperature) == (True, True, 1.0)
    assert (cfg.decode.beams, cfg.decode.max_len, cfg.decode.min_len) == (2, 30, 0)


@pytest.mark.parametrize(("total", "ratio", "warmup"), [(1000, 0.01, 10.0), (56642, 0.1, 5664)])
def test_schedule_is_transformers_linear_schedule(total, ratio, warmup):
    ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ours_schedule = linear_schedule(ours, total, ratio)
    theirs_schedule = get_linear_schedule_with_warmup(theirs, warmup, total)
    for step in range(total + 2):
        # The XE stage passes the float 0.01 * total as the warm-up, the SCST stage int(0.1 * total).
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], abs=2e-4), step
        ours.step()
        theirs.step()
        ours_schedule.step()
        theirs_schedule.step()
    assert ours.param_groups[0]["lr"] == 0.0


def test_scst_optimizer_exempts_biases_and_layernorms_from_weight_decay():
    cfg = tiny_config(**{"model.gpt2_config": dict(TINY_GPT2), "model.use_sparse_mask": True})
    model = build_captioner(cfg)
    scst = build_config([CONFIG_DIR / "scst.yaml"]).train
    groups = build_optimizer(model, scst).param_groups
    decay = {id(p) for g in groups if g["weight_decay"] == 0.01 for p in g["params"]}
    exempt = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-8 and g["lr"] == 5e-6 for g in groups)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert id(param) not in decay | exempt, name
        elif name.endswith(".bias") or ".ln_" in name or "norm" in name:
            assert id(param) in exempt, name
        else:
            assert id(param) in decay, name
    assert any("ln_f.weight" in n for n, p in model.named_parameters() if id(p) in exempt)
    xe_groups = build_optimizer(model, cfg.train).param_groups
    assert len(xe_groups) == 1 and xe_groups[0]["weight_decay"] == 0.01 and xe_groups[0]["eps"] == 1e-6
