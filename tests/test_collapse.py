"""The collapse watch: a model that writes one caption for every image is named at validation."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from helpers import save_model, tiny_config

from engine.runner import Run, warn_if_collapsed
from metrics.coco_eval import EvalReport
from metrics.diversity import caption_diversity
from models.build import build_captioner


def one_caption_model(cfg, tokenizer, word: str):
    """A tiny captioner whose every position predicts ``word``: GPT-2's last LayerNorm outputs its bias alone
    (weight 0), a large multiple of the word's (tied) output embedding, whatever the image and the prefix."""
    torch.manual_seed(0)
    model = build_captioner(cfg)
    (token,) = tokenizer.encode(word)
    ln_f = model.gpt.transformer.ln_f
    with torch.no_grad():
        ln_f.weight.zero_()
        ln_f.bias.copy_(1000 * model.gpt.lm_head.weight[token])
    return model


def test_validation_names_the_one_caption_of_a_collapsed_model(tiny_dataset, tmp_path, tokenizer, single_thread):
    # SCST scores its starting checkpoint before its first step; 0 epochs stop right after that validation
    cfg = tiny_config(tiny_dataset, tmp_path / "run", **{"train.epochs": 0, "train.collapse_warn": 0.3})
    start = save_model(tmp_path / "one.pt", one_caption_model(cfg, tokenizer, " red"), cfg)
    cfg.scst, cfg.checkpoint = True, str(start)
    run = Run(cfg)
    try:
        run.train()
    finally:
        run.close()
    caption = " ".join(["red"] * cfg.decode.max_len)  # no stop token: max_len tokens
    predictions = json.loads((tmp_path / "run" / "test_predictions.json").read_text())
    assert {p["caption"] for p in predictions} == {caption}  # the test split: one caption for all 8 images
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    (val,) = [r for r in records if r["event"] == "val"]
    assert (val["distinct_captions"], val["vocabulary"], val["distinct-1"]) == (1 / 8, 1, 1 / (8 * cfg.decode.max_len))
    warnings = [line for line in (tmp_path / "run" / "train.log").read_text().splitlines() if "collapsing" in line]
    assert len(warnings) == 1
    assert warnings[0].endswith(
        "WARNING engine.runner: captions collapsing at validating the starting checkpoint (val): 1 distinct "
        f"captions for 8 images (12.5%, below train.collapse_warn 0.3); the most repeated, 8 times: '{caption}'"
    )


@pytest.mark.parametrize(("threshold", "warned"), [(0.3, True), (0.25, False), (0.0, False)])
def test_the_warning_comes_only_below_the_threshold(caplog, threshold, warned):
    report = EvalReport(metrics={}, diversity=caption_diversity(["a red square"] * 7 + ["a dog"]))  # 2 of 8
    with caplog.at_level(logging.WARNING, logger="engine.runner"):
        warn_if_collapsed(report, threshold, "val")
    assert ["collapsing" in record.message for record in caplog.records] == ([True] if warned else [])
