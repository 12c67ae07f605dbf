"""SCST on a tiny model: the reward rises on an easy batch and only trainable weights move."""

import contextlib
import logging

import numpy as np
import pytest
import torch
from helpers import tiny_config

from data.text import IGNORE_INDEX, clean_caption
from engine.steps import ScstStep
from metrics.cider import CiderD
from metrics.cider_df import DocumentFrequency
from models.build import build_captioner
from models.decoding import DecodeOptions, captions_from_tokens, decode, eval_mode
from models.losses import scst_loss

GOOD, BAD = "a red circle on the left", "a shape"


def caption_batch(tokenizer) -> dict:
    """The two wordings GOOD (which the rewards favour) and BAD as one padded batch: input_ids and labels."""
    ids = [tokenizer.encode(clean_caption(c)) for c in (GOOD, BAD)]
    width = max(map(len, ids))
    input_ids = torch.full((2, width), tokenizer.eos_token_id)
    labels = torch.full((2, width), IGNORE_INDEX)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)], labels[row, : len(seq)] = torch.tensor(seq), torch.tensor(seq)
    return {"input_ids": input_ids, "labels": labels}


def _expected_reward(model, visual, tokenizer, cider, refs, seed=0) -> float:
    options = DecodeOptions(method="sample", num_samples=64, max_len=10)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        result = decode(model, model.encode(features=visual), options, generator=generator)
    captions = captions_from_tokens(tokenizer, result)
    return float(cider.score_candidates(captions, [r for r in refs for _ in range(64)]).mean())


def test_scst_raises_the_reward_and_moves_only_trainable_weights(tokenizer):
    torch.manual_seed(0)
    cfg = tiny_config(**{"scst_opts.num_samples": 4, "scst_opts.baseline": "mean", "scst_opts.sample_max_len": 10})
    model = build_captioner(cfg)
    visual = torch.randn(2, 17, 256)
    # Cross-entropy on two wordings per image, so that the samples mix a rewarded and an unrewarded one.
    input_ids, labels = caption_batch(tokenizer).values()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(40):
        for image in range(2):
            loss = model(None, input_ids, labels, features=visual[[image, image]])["loss"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    refs = [[GOOD] * 5, [GOOD] * 5]
    df = DocumentFrequency.from_references([*refs, ["a blue square on the right"] * 5, ["two green stars"] * 5])
    cider = CiderD(df)
    before = _expected_reward(model, visual, tokenizer, cider, refs)
    assert 0.5 < before < 9.0, before  # a real mixture of good and bad samples

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    step = ScstStep(model, tokenizer, cider, refs, cfg.scst_opts, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    batch = {"features": visual, "indices": [0, 1]}
    # 16 steps at lr 3e-4: 8 at 1e-3 overshot or stayed within the noise for some draws of the dropout masks.
    for _ in range(16):
        out = step(batch)
        assert {"loss", "reward", "baseline", "sample_len", "entropy"} <= out.keys()
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()

    after = _expected_reward(model, visual, tokenizer, cider, refs)
    assert after > before + 0.5, (before, after)
    for name, value in frozen.items():
        assert torch.equal(value, dict(model.named_parameters())[name]), f"frozen {name} changed"
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert any(n.startswith("mapper.") for n in moved) and any(n.startswith("gpt.") for n in moved)


class _RecordingCider(CiderD):
    """CiderD that remembers the candidates of each call."""

    def __init__(self, df: DocumentFrequency) -> None:
        super().__init__(df)
        self.calls: list[list[str]] = []

    def score_candidates(self, candidates, references):
        self.calls.append(list(candidates))
        return super().score_candidates(candidates, references)


def bias_stop_tokens(model, bias: float) -> None:
    """An output bias that makes the stop tokens likelier than the random model makes them."""
    model.gpt.lm_head.bias = torch.nn.Parameter(torch.zeros(model.gpt.config.vocab_size))
    model.gpt.lm_head.bias.data[list(DecodeOptions().stop_ids)] = bias


def test_greedy_baseline_is_the_test_time_caption_and_both_decodes_keep_sample_min_len(tokenizer):
    torch.manual_seed(0)
    cfg = tiny_config(**{"scst_opts.num_samples": 2, "scst_opts.baseline": "greedy", "scst_opts.sample_max_len": 10,
                         "scst_opts.sample_min_len": 3})  # fmt: skip
    model = build_captioner(cfg).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5  # train-mode decoding would give other captions at every call
    # The stop tokens far likelier than any other, so that the captions end where sample_min_len allows
    bias_stop_tokens(model, 50.0)
    visual = torch.randn(3, 17, 256)
    refs = [[GOOD] * 5] * 3
    cider = _RecordingCider(DocumentFrequency.from_references(refs))
    step = ScstStep(model, tokenizer, cider, refs, cfg.scst_opts, torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        options = DecodeOptions(method="greedy", max_len=10, min_len=3)
        result = decode(model, model.encode(features=visual), options)
    assert result.lengths.tolist() == [4, 4, 4]  # three tokens and a stop
    expected = captions_from_tokens(tokenizer, result)
    model.train()
    for _ in range(3):
        step({"features": visual, "indices": [0, 1, 2]})
        samples, greedy = cider.calls[-2:]
        assert greedy == expected and all(samples)  # no sample stops before sample_min_len either
        assert model.training


def test_samples_and_greedy_baseline_are_cut_at_sample_max_len(tokenizer):
    """A model that never stops: every sample and every greedy caption has ``sample_max_len`` tokens, and the
    greedy ones are the test-time decode's at that length."""
    torch.manual_seed(0)
    cfg = tiny_config(**{"scst_opts.num_samples": 2, "scst_opts.sample_max_len": 3, "scst_opts.dropout": False})
    model = build_captioner(cfg).eval()
    bias_stop_tokens(model, -50.0)
    visual = torch.randn(2, 17, 256)
    refs = [[GOOD] * 5] * 2
    cider = _RecordingCider(DocumentFrequency.from_references(refs))
    out = ScstStep(model, tokenizer, cider, refs, cfg.scst_opts, torch.device("cpu"))(
        {"features": visual, "indices": [0, 1]}
    )
    with torch.no_grad():
        result = decode(model, model.encode(features=visual), DecodeOptions(method="greedy", max_len=3))
    assert result.lengths.tolist() == [3, 3] and not result.stopped.any()
    assert cider.calls[1] == captions_from_tokens(tokenizer, result)
    assert out["sample_len"] == 3.0


def test_sampling_without_dropout_samples_the_test_time_model(tokenizer):
    cfg = tiny_config(**{"scst_opts.num_samples": 3, "scst_opts.baseline": "mean", "scst_opts.sample_max_len": 10})
    model = build_captioner(cfg).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    visual = torch.randn(2, 17, 256)
    refs = [[GOOD] * 5] * 2
    batch = {"features": visual, "indices": [0, 1]}

    def sampled(dropout: bool, mode) -> list[str]:
        cfg.scst_opts.dropout = dropout
        cider = _RecordingCider(DocumentFrequency.from_references(refs))
        step = ScstStep(model, tokenizer, cider, refs, cfg.scst_opts, torch.device("cpu"))
        torch.manual_seed(1)
        with mode(model):
            out = step(batch)
        assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
        return cider.calls[0]

    test_time = sampled(dropout=True, mode=eval_mode)
    assert sampled(dropout=False, mode=contextlib.nullcontext) == test_time
    assert model.training and all(m.p == 0.5 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert sampled(dropout=True, mode=contextlib.nullcontext) != test_time  # dropout 0.5 changes the samples


def test_an_images_samples_do_not_depend_on_the_rest_of_the_batch(tokenizer):
    """Samples are drawn from seeds of the run's seed, the epoch and the image's index, so splitting a batch
    over processes samples the same, and no two images or epochs share their draws."""
    torch.manual_seed(0)
    cfg = tiny_config(**{"scst": True, "scst_opts.dropout": False, "scst_opts.baseline": "mean"})
    model = build_captioner(cfg).eval()
    refs = [["a b"]] * 10
    cider = _RecordingCider(DocumentFrequency.from_references(refs))
    features = torch.randn(3, model.encoder.num_tokens, model.encoder.width)
    for seed in (3, 4):
        step = ScstStep(model, tokenizer, cider, refs, cfg.scst_opts, torch.device("cpu"), seed=seed)
        step.set_epoch(2)
        step({"features": features, "indices": [7, 4, 1]})
        step({"features": features[1:2], "indices": [4]})
    step({"features": features[1:2], "indices": [7]})  # the same image under another index
    step.set_epoch(3)
    step({"features": features[1:2], "indices": [4]})
    both, alone, _, other_seed, other_index, later = cider.calls  # the samples, image-major
    n = cfg.scst_opts.num_samples
    assert len(both) == 3 * n and both[n : 2 * n] == alone
    assert other_seed != alone and other_seed not in (other_index, later)  # each differs in one of the three


@pytest.mark.parametrize("seed", [0, 2**62 + 1])
def test_each_image_index_draws_its_own_samples_under_any_seed(tokenizer, seed: int):
    """Eight copies of one image under indices 0 to 7 sample eight different sets of captions, also with a
    run seed near the top of the 64-bit range (an image's seed is taken modulo 2**63)."""
    torch.manual_seed(0)
    cfg = tiny_config(**{"scst_opts.dropout": False, "scst_opts.baseline": "mean", "scst_opts.sample_max_len": 4})
    model = build_captioner(cfg).eval()
    cider = _RecordingCider(DocumentFrequency.from_references([["a b"]]))
    step = ScstStep(model, tokenizer, cider, [["a b"]] * 8, cfg.scst_opts, torch.device("cpu"), seed=seed)
    features = torch.randn(1, model.encoder.num_tokens, model.encoder.width).expand(8, -1, -1)
    step({"features": features, "indices": list(range(8))})
    [samples] = cider.calls
    n = cfg.scst_opts.num_samples
    assert len({tuple(samples[i : i + n]) for i in range(0, 8 * n, n)}) == 8


class _LengthReward:
    """A reward object that scores a caption by its number of characters and records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], list]] = []

    def score_candidates(self, candidates, references):
        self.calls.append((list(candidates), list(references)))
        return np.array([float(len(c)) for c in candidates])


@pytest.mark.parametrize(
    "baseline, length_norm, temperature, refs_in_batch", [("mean", True, 0.7, False), ("greedy", False, 1.0, True)]
)
def test_the_step_weights_each_sample_by_its_reward_minus_its_images_baseline(
    tokenizer, monkeypatch, baseline: str, length_norm: bool, temperature: float, refs_in_batch: bool
):
    """What the step hands to scst_loss, worked out from the rewards it asked for: each sample's reward, its
    baseline (the mean of its own image's other samples, or its own image's greedy caption's reward), the
    mask of its tokens, their log-probabilities at the sampling temperature; and the logged reward,
    baseline, length and entropy. The references are the data set's, or (streamed from shards) the batch's."""
    n = 3
    cfg = tiny_config(**{"scst_opts.num_samples": n, "scst_opts.baseline": baseline, "scst_opts.dropout": False,
                         "scst_opts.sample_max_len": 10, "scst_opts.length_norm": length_norm,
                         "scst_opts.temperature": temperature})  # fmt: skip
    torch.manual_seed(0)
    model = build_captioner(cfg).train()
    # Stop tokens made likely enough that samples end at varied lengths, before sample_max_len.
    bias_stop_tokens(model, 8.0)
    refs = [["a red circle"], ["two stars"], ["a blue square"]]
    reward = _LengthReward()
    step = ScstStep(model, tokenizer, reward, [] if refs_in_batch else refs, cfg.scst_opts, torch.device("cpu"))
    seen = {}

    def recorded(logprobs, mask, rewards, baselines, norm):
        seen.update(logprobs=logprobs.detach(), mask=mask, rewards=rewards, baselines=baselines, norm=norm)
        return scst_loss(logprobs, mask, rewards, baselines, norm)

    def recorded_decode(*args, **kwargs):
        seen["samples"] = decode(*args, **kwargs)
        return seen["samples"]

    monkeypatch.setattr("engine.steps.scst_loss", recorded)
    monkeypatch.setattr("engine.steps.decode", recorded_decode)
    features = torch.randn(2, 17, 256, generator=torch.Generator().manual_seed(2))
    batch = {"features": features, "indices": [2, 0]} | ({"references": [refs[2], refs[0]]} if refs_in_batch else {})
    out = step(batch)
    samples, sample_refs = reward.calls[0]
    assert len(samples) == 2 * n and sample_refs == [refs[2]] * n + [refs[0]] * n  # image-major
    lengths = [float(len(c)) for c in samples]
    if baseline == "mean":
        groups = [lengths[:n], lengths[n:]]
        expected = [(sum(g) - r) / (n - 1) for g in groups for r in g]
    else:
        greedy, greedy_refs = reward.calls[1]
        assert len(reward.calls) == 2 and greedy_refs == [refs[2], refs[0]]
        expected = [float(len(greedy[i])) for i in (0, 1) for _ in range(n)]
    assert seen["rewards"].tolist() == lengths and seen["baselines"].tolist() == pytest.approx(expected)
    assert len(set(lengths)) > 1 and seen["norm"] is length_norm
    mask = seen["mask"]
    assert torch.equal(mask, seen["logprobs"] != 0)  # a caption's tokens, then padding at log-probability 0
    assert torch.equal(mask, mask.cummin(dim=1).values)  # each row: its tokens first
    tokens = seen["samples"].tokens
    assert len(set(seen["samples"].lengths.tolist())) > 2 and (seen["samples"].lengths < 10).any()
    with torch.no_grad(), eval_mode(model):  # the sampled tokens' log-softmax of teacher-forced logits / temperature
        logits = model.token_logits(model.encode(features=features).repeat_interleave(n), tokens)
        expected_logprobs = torch.log_softmax(logits / temperature, -1).gather(2, tokens[..., None])[..., 0] * mask
    torch.testing.assert_close(seen["logprobs"], expected_logprobs, rtol=1e-4, atol=1e-5)
    assert out["reward"].item() == pytest.approx(sum(lengths) / (2 * n))
    assert out["baseline"].item() == pytest.approx(sum(expected) / (2 * n))
    assert out["sample_len"].item() == pytest.approx(mask.sum().item() / (2 * n))
    assert out["entropy"].item() == pytest.approx(-seen["logprobs"][mask].mean().item(), rel=1e-6)
    assert torch.equal(out["loss"], scst_loss(seen["logprobs"], mask, seen["rewards"], seen["baselines"], length_norm))


@pytest.mark.parametrize("baseline, samples, refused", [("mean", 1, True), ("mean", 2, False), ("greedy", 1, False)])
def test_the_mean_of_others_baseline_needs_two_samples(tokenizer, baseline: str, samples: int, refused: bool):
    cfg = tiny_config(**{"scst_opts.baseline": baseline, "scst_opts.num_samples": samples})
    model = build_captioner(cfg)
    cider = CiderD(DocumentFrequency.from_references([[GOOD]]))

    def build() -> ScstStep:
        return ScstStep(model, tokenizer, cider, [[GOOD]], cfg.scst_opts, torch.device("cpu"))

    if refused:
        with pytest.raises(
            ValueError, match=r"^scst_opts.num_samples must be >= 2 with scst_opts.baseline mean, got 1$"
        ):
            build()
    else:
        assert build().sample_options.num_samples == samples


@pytest.mark.parametrize(
    "fast_decode, static, graphs", [("off", False, False), ("static", True, False), ("graphs", True, True)]
)
def test_the_step_decodes_and_logs_as_scst_opts_fast_decode_says(tokenizer, caplog, fast_decode, static, graphs):
    cfg = tiny_config(**{"scst_opts.fast_decode": fast_decode})
    cider = CiderD(DocumentFrequency.from_references([[GOOD]]))
    with caplog.at_level(logging.INFO, logger="engine.steps"):
        step = ScstStep(build_captioner(cfg), tokenizer, cider, [[GOOD]], cfg.scst_opts, torch.device("cpu"))
    assert (step.fast is not None, step.fast is not None and step.fast.cuda_graphs) == (static, graphs)
    assert step.teacher_forced is static  # with dropout off: samples drawn without gradients, then scored
    assert caplog.messages == [f"SCST decoding: fast_decode {fast_decode} ({fast_decode}) on cpu"]
