"""Tests for models.decoding on tiny random models: training positions and masks, batching, Hugging Face
``generate`` equivalence, lengths, sampling statistics and n-gram blocking."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from models.captioner import OPGCaptioner, Prefix
from models.captioning import caption_batches
from models.config import DecodeConfig
from models.decoding import DecodeOptions, DecodeResult, captions_from_tokens, decode, teacher_forced_logprobs
from models.gpt2 import ATTENTION_IMPLEMENTATIONS, build_gpt2
from models.mapper import MLPMapper
from models.sparse_mask import SparsePrefixMask
from models.static_decode import FastDecode

STOP_IDS = (13, 50256)
VISUAL_DIM, NUM_TOKENS, WIDTH = 32, 6, 64


pytestmark = pytest.mark.usefixtures("single_thread")


class PatchEncoder(nn.Module):
    """Stand-in image encoder: B x 3 x 8 x 8 -> B x 6 x 32 visual tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 8 * 8, NUM_TOKENS * VISUAL_DIM)
        self.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images.flatten(1)).view(-1, NUM_TOKENS, VISUAL_DIM)


def make_model(
    seed: int = 0,
    sparse: bool = False,
    stop_bias: float | None = 8.0,
    vocab_size: int | None = None,
    n_positions: int = 64,
    output_ids: torch.Tensor | None = None,
) -> OPGCaptioner:
    """Tiny captioner in eval mode. With ``stop_bias`` the output layer is untied, sharper and biased
    towards the stop tokens so that greedy captions end at varied lengths; without it the random model
    barely ever stops and repeats itself."""
    torch.manual_seed(seed)
    config = {"n_layer": 2, "n_embd": WIDTH, "n_head": 2, "n_positions": n_positions}
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    gpt = build_gpt2("gpt2", config)
    if stop_bias is not None:
        with torch.no_grad():
            gpt.transformer.wte.weight.normal_(0.0, 1.0)
            head = nn.Linear(WIDTH, gpt.config.vocab_size)
            head.weight.normal_(0.0, 0.35)
            head.bias.zero_()
            head.bias[list(STOP_IDS)] = stop_bias
        gpt.lm_head = head
    mask = SparsePrefixMask(NUM_TOKENS, WIDTH, threshold=0.5, mode="ste") if sparse else None
    encoder, mapper = PatchEncoder(), MLPMapper(VISUAL_DIM, WIDTH, NUM_TOKENS)
    return OPGCaptioner(encoder, mapper, gpt, mask, output_ids=output_ids).eval()


@torch.no_grad()
def make_prefix(model: OPGCaptioner, images: int, seed: int = 1) -> Prefix:
    visual = torch.randn(images, NUM_TOKENS, VISUAL_DIM, generator=torch.Generator().manual_seed(seed))
    return model.prefix_from_visual(visual)


def subset(prefix: Prefix, rows: list[int]) -> Prefix:
    return Prefix(prefix.embeds[rows], prefix.keep[rows])


def check_well_formed(result: DecodeResult, options: DecodeOptions) -> None:
    """Stop, pad, min/max length and log-probability invariants of every row."""
    assert (result.tokens.dtype, result.lengths.dtype, result.stopped.dtype) == (torch.long, torch.long, torch.bool)
    stop = torch.tensor(options.stop_ids)
    assert int(result.lengths.max()) == result.tokens.shape[1]
    for row, length, stopped in zip(result.tokens, result.lengths.tolist(), result.stopped.tolist(), strict=True):
        assert 1 <= length <= options.max_len
        caption = row[:length]
        body = caption[:-1] if stopped else caption
        assert not torch.isin(body, stop).any()
        assert (row[length:] == options.pad_id).all()
        if stopped:
            assert int(caption[-1]) in options.stop_ids
            assert length - 1 >= options.min_len
        else:
            assert length == options.max_len
    if result.token_logprobs is not None:
        positions = torch.arange(result.tokens.shape[1])[None]
        after = positions >= result.lengths[:, None]
        assert (result.token_logprobs[after] == 0).all()
        assert (result.token_logprobs[~after] <= 0).all()


ALL_METHODS = [
    DecodeOptions(max_len=12),
    DecodeOptions(method="beam", beams=3, max_len=12, min_len=2),
    DecodeOptions(method="sample", num_samples=3, max_len=12, min_len=1, temperature=0.8),
]


@pytest.mark.parametrize("sparse, restricted", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("options", ALL_METHODS, ids=["greedy", "beam", "sample"])
def test_logprobs_equal_teacher_forced_training_forward(sparse: bool, restricted: bool, options: DecodeOptions) -> None:
    """Also with an output vocabulary (``restricted``): only its tokens are produced, and the teacher-forced
    logits are -inf outside it."""
    vocab = None
    if restricted:
        vocab = torch.randperm(50000, generator=torch.Generator().manual_seed(2))[:20000]
        vocab = torch.cat([vocab, torch.tensor(STOP_IDS)]).unique()
    model = make_model(sparse=sparse, output_ids=vocab)
    prefix = make_prefix(model, 5)
    if sparse:
        assert (~prefix.keep).any() and prefix.keep.any(dim=1).all(), "the mask must really drop positions"
    result = decode(model, prefix, options, with_logprobs=True, generator=torch.Generator().manual_seed(0))
    check_well_formed(result, options)
    if restricted:
        assert torch.isin(result.tokens, vocab).all()
    assert result.lengths.float().mean() > 2
    with torch.no_grad():
        logits = model.token_logits(prefix.repeat_interleave(options.num_samples), result.tokens)
    logprobs = torch.log_softmax(logits / options.temperature, dim=-1)
    expected = logprobs.gather(2, result.tokens.unsqueeze(2)).squeeze(2)
    expected = expected * (torch.arange(result.tokens.shape[1])[None] < result.lengths[:, None])
    torch.testing.assert_close(result.token_logprobs, expected, atol=1e-4, rtol=1e-4)
    scores = expected.sum(1) / result.lengths.float() ** options.length_penalty
    torch.testing.assert_close(result.scores, scores, atol=1e-4, rtol=1e-4)


def test_sparse_mask_changes_the_decoding() -> None:
    """Dropped prefix positions are really hidden from the caption tokens."""
    model = make_model(sparse=True)
    prefix = make_prefix(model, 4)
    masked = decode(model, prefix, DecodeOptions(max_len=8, min_len=8), with_logprobs=True)
    open_prefix = Prefix(prefix.embeds, torch.ones_like(prefix.keep))
    unmasked = decode(model, open_prefix, DecodeOptions(max_len=8, min_len=8), with_logprobs=True)
    assert not torch.allclose(masked.token_logprobs[:, 0], unmasked.token_logprobs[:, 0])


BATCH_OPTIONS = [
    DecodeOptions(max_len=10),
    DecodeOptions(max_len=10, min_len=3, no_repeat_ngram=2),
    DecodeOptions(method="beam", beams=3, max_len=10),
    DecodeOptions(method="beam", beams=4, max_len=10, min_len=2, length_penalty=0.5, no_repeat_ngram=2),
]


@pytest.mark.parametrize("options", BATCH_OPTIONS, ids=["greedy", "greedy-bans", "beam3", "beam4-bans"])
def test_batched_results_equal_per_image_and_ignore_batch_composition(options: DecodeOptions) -> None:
    model = make_model(sparse=True)
    prefix = make_prefix(model, 5)
    batched = decode(model, prefix, options, with_logprobs=True)
    assert len(set(batched.lengths.tolist())) > 1, "rows should finish at different steps"
    for i in range(5):
        alone = decode(model, subset(prefix, [i]), options, with_logprobs=True)
        n = int(alone.lengths[0])
        assert batched.lengths[i] == n
        assert torch.equal(batched.tokens[i, :n], alone.tokens[0, :n])
        torch.testing.assert_close(batched.token_logprobs[i, :n], alone.token_logprobs[0, :n])
    order = [3, 0, 4, 1, 2]
    shuffled = decode(model, subset(prefix, order), options)
    trimmed = batched.tokens[order][:, : shuffled.tokens.shape[1]]
    assert torch.equal(shuffled.tokens, trimmed)
    pair = decode(model, subset(prefix, [2, 2]), options)
    assert torch.equal(pair.tokens[0], pair.tokens[1])


@pytest.mark.parametrize("extra", [{}, {"min_len": 3}, {"length_penalty": 2.0}, {"no_repeat_ngram": 1}], ids=str)
def test_beam_size_one_equals_greedy(extra: dict) -> None:
    model = make_model(sparse=True)
    prefix = make_prefix(model, 6)
    greedy = decode(model, prefix, DecodeOptions(max_len=12, **extra), with_logprobs=True)
    beam = decode(model, prefix, DecodeOptions(method="beam", beams=1, max_len=12, **extra), with_logprobs=True)
    assert torch.equal(greedy.tokens, beam.tokens) and torch.equal(greedy.lengths, beam.lengths)
    torch.testing.assert_close(greedy.token_logprobs, beam.token_logprobs)
    torch.testing.assert_close(greedy.scores, beam.scores)


def hf_generate(model: OPGCaptioner, prefix: Prefix, options: DecodeOptions) -> torch.Tensor:
    """The same search with ``GPT2LMHeadModel.generate``: with ``inputs_embeds`` only new tokens come back,
    so ``max_new_tokens`` / ``min_new_tokens`` count exactly what ``max_len`` / ``min_len`` count."""
    with torch.no_grad():
        return model.gpt.generate(
            inputs_embeds=prefix.embeds,
            attention_mask=torch.ones(prefix.keep.shape, dtype=torch.long),
            do_sample=False,
            num_beams=options.beams,
            num_return_sequences=options.num_return,
            max_new_tokens=options.max_len,
            min_new_tokens=options.min_len,
            length_penalty=options.length_penalty,
            no_repeat_ngram_size=options.no_repeat_ngram,
            early_stopping=False,
            eos_token_id=list(options.stop_ids),
            pad_token_id=options.pad_id,
        )


HF_CASES = [
    DecodeOptions(max_len=12),
    DecodeOptions(max_len=12, min_len=4, no_repeat_ngram=2),
    DecodeOptions(method="beam", beams=2, max_len=12),
    DecodeOptions(method="beam", beams=3, max_len=12, min_len=3),
    DecodeOptions(method="beam", beams=5, max_len=10, length_penalty=0.0),
    DecodeOptions(method="beam", beams=4, max_len=12, length_penalty=2.0, no_repeat_ngram=2),
    DecodeOptions(method="beam", beams=10, max_len=8, min_len=1),
]


@pytest.mark.filterwarnings("ignore:Passing `no_repeat_ngram_size` with `inputs_embeds`")
@pytest.mark.parametrize("options", HF_CASES, ids=lambda o: f"{o.method}{o.beams}-{o.min_len}-{o.length_penalty}")
def test_equals_hugging_face_generate_without_sparse_mask(options: DecodeOptions) -> None:
    model = make_model(stop_bias=7.5)
    prefix = make_prefix(model, 8, seed=3)
    ours = decode(model, prefix, options)
    expected = hf_generate(model, prefix, options)
    if options.length_penalty <= 1.0:  # a larger penalty favours captions that run to max_len
        assert len(set(ours.lengths.tolist())) > 1
    assert torch.equal(ours.tokens, expected)


@pytest.mark.parametrize("beams, returned", [(3, 3), (5, 2)])
def test_n_best_equals_hugging_face_num_return_sequences(beams: int, returned: int) -> None:
    model = make_model(stop_bias=7.5)
    prefix = make_prefix(model, 6, seed=4)
    options = DecodeOptions(method="beam", beams=beams, num_return=returned, max_len=10)
    ours = decode(model, prefix, options)
    assert torch.equal(ours.tokens, hf_generate(model, prefix, options))
    assert (ours.scores.view(6, returned).diff(dim=1) <= 0).all()  # best first
    best = decode(model, prefix, replace(options, num_return=1))
    assert torch.equal(ours.tokens.view(6, returned, -1)[:, 0, : best.tokens.shape[1]], best.tokens)
    torch.testing.assert_close(ours.scores.view(6, returned)[:, 0], best.scores)


@pytest.mark.parametrize("options", ALL_METHODS, ids=["greedy", "beam", "sample"])
def test_min_len_equal_to_max_len_decodes_exactly_max_len_tokens(options: DecodeOptions) -> None:
    model = make_model(stop_bias=20.0)  # would stop at once if it were allowed to
    forced = replace(options, min_len=7, max_len=7)
    result = decode(model, make_prefix(model, 3), forced, generator=torch.Generator().manual_seed(0))
    assert result.tokens.shape == (3 * forced.num_samples, 7)
    assert (result.lengths == 7).all() and not result.stopped.any()
    assert not torch.isin(result.tokens, torch.tensor(STOP_IDS)).any()


@pytest.mark.parametrize("options", ALL_METHODS, ids=["greedy", "beam", "sample"])
def test_custom_stop_ids_and_pad(options: DecodeOptions) -> None:
    """Only '.' stops: end-of-text, made even more likely, becomes an ordinary token inside captions."""
    model = make_model(stop_bias=8.0)
    with torch.no_grad():
        model.gpt.lm_head.bias[50256] += 0.5
    custom = replace(options, stop_ids=(13,), pad_id=0, min_len=0)
    result = decode(model, make_prefix(model, 8), custom, True, torch.Generator().manual_seed(0))
    check_well_formed(result, custom)
    assert result.stopped.any()
    bodies = [row[: n - 1] for row, n in zip(result.tokens, result.lengths.tolist(), strict=True)]
    assert any((body == 50256).any() for body in bodies)


def test_sampling_is_reproducible_with_a_generator() -> None:
    model = make_model(sparse=True, stop_bias=6.0)
    prefix = make_prefix(model, 3)
    options = DecodeOptions(method="sample", num_samples=4, max_len=10, top_k=50, top_p=0.9)
    first = decode(model, prefix, options, generator=torch.Generator().manual_seed(7))
    again = decode(model, prefix, options, generator=torch.Generator().manual_seed(7))
    other = decode(model, prefix, options, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first.tokens, again.tokens)
    assert not torch.equal(first.tokens, other.tokens)
    check_well_formed(first, options)


def test_samples_are_image_major() -> None:
    """A nearly cold temperature samples the greedy caption: n copies per image, images in input order."""
    model = make_model()
    prefix = make_prefix(model, 3)
    greedy = decode(model, prefix, DecodeOptions(max_len=10))
    cold = DecodeOptions(method="sample", num_samples=4, max_len=10, temperature=1e-4)
    samples = decode(model, prefix, cold, generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples.tokens, greedy.tokens.repeat_interleave(4, dim=0))


def expected_first_token_distribution(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Reference truncation written independently of the decoder: keep the k most likely tokens, then
    the smallest most-likely set whose mass reaches top_p, and renormalise."""
    probs = torch.softmax(logits.double(), dim=0)
    order = probs.argsort(descending=True).tolist()
    kept = order[:top_k] if top_k else order
    mass = probs[kept] / probs[kept].sum()
    chosen, total = [], 0.0
    for token, p in zip(kept, mass.tolist(), strict=True):
        chosen.append(token)
        total += p
        if total >= top_p:
            break
    result = torch.zeros_like(probs)
    result[chosen] = probs[chosen]
    return result / result.sum()


@pytest.mark.parametrize(
    "temperature, top_k, top_p", [(1.0, 0, 1.0), (2.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.6), (0.7, 5, 0.8)]
)
def test_sample_frequencies_match_the_softmax(temperature: float, top_k: int, top_p: float) -> None:
    model = make_model(stop_bias=None, vocab_size=8)
    with torch.no_grad():
        model.gpt.lm_head.weight.mul_(8.0)  # a clearly non-uniform distribution over the 8 tokens
    prefix = make_prefix(model, 1)
    draws = 40_000
    options = DecodeOptions(
        method="sample", num_samples=draws, max_len=1, stop_ids=(), pad_id=0,
        temperature=temperature, top_k=top_k, top_p=top_p,
    )  # fmt: skip
    result = decode(model, prefix, options, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(result.tokens[:, 0], minlength=8).double()
    with torch.no_grad():
        logits = model.token_logits(prefix, torch.zeros(1, 1, dtype=torch.long))[0, 0]
    expected = expected_first_token_distribution(logits / temperature, top_k, top_p)
    assert expected.max() < 0.9 and (expected > 0.01).sum() >= 2
    assert (counts[expected == 0] == 0).all()
    support = expected > 0
    chi2 = ((counts[support] - draws * expected[support]) ** 2 / (draws * expected[support])).sum()
    assert chi2 < 30.0  # 7 degrees of freedom at most: p < 1e-4 for a correct sampler


def test_top_p_stops_at_the_token_whose_mass_reaches_it_exactly() -> None:
    """Two equally likely tokens (an output layer of zeros: probabilities of exactly 1/2): the first alone
    reaches top_p 0.5, so the second is never drawn; at 0.51 both are."""
    model = make_model(stop_bias=None, vocab_size=2)
    model.gpt.lm_head = nn.Linear(WIDTH, 2, bias=False)
    nn.init.zeros_(model.gpt.lm_head.weight)
    prefix = make_prefix(model, 1)
    drawn = {}
    for top_p in (0.5, 0.51):
        options = DecodeOptions(method="sample", num_samples=400, max_len=1, stop_ids=(), pad_id=0, top_p=top_p)
        result = decode(model, prefix, options, generator=torch.Generator().manual_seed(0))
        drawn[top_p] = torch.bincount(result.tokens[:, 0], minlength=2).tolist()
    assert sorted(drawn[0.5]) == [0, 400], drawn
    assert min(drawn[0.51]) > 150, drawn


@pytest.mark.parametrize("options", ALL_METHODS, ids=["greedy", "beam", "sample"])
def test_scores_are_summed_logprobs_over_length_to_the_penalty(options: DecodeOptions) -> None:
    model = make_model()
    result = decode(model, make_prefix(model, 4), replace(options, length_penalty=0.5), with_logprobs=True)
    assert len(set(result.lengths.tolist())) > 1
    expected = result.token_logprobs.sum(dim=1) / result.lengths.float() ** 0.5
    torch.testing.assert_close(result.scores, expected.detach())


def test_sampling_edge_draws_top_k_one_and_float64_uniforms() -> None:
    """A draw of exactly 1 (the top of the cumulative distribution, where a draw just below 1 may round to)
    takes the last token that has probability: token 7 of 8 without truncation, the highest-numbered of the
    3 kept by top-k 3, never a truncated one. top_k 1 is greedy decoding. Uniform draws given in float64
    pick what the same draws in float32 pick."""
    model = make_model(seed=5, stop_bias=None, vocab_size=8)
    prefix = make_prefix(model, 1)
    one = DecodeOptions(method="sample", max_len=1, stop_ids=(), pad_id=0)
    with torch.no_grad():
        logits = model.token_logits(prefix, torch.zeros(1, 1, dtype=torch.long))[0, 0]
    top3 = logits.topk(3).indices
    assert 7 not in top3.tolist()
    ones = torch.ones(1, 1)
    assert decode(model, prefix, one, uniforms=ones).tokens.tolist() == [[7]]
    assert decode(model, prefix, replace(one, top_k=3), uniforms=ones).tokens.tolist() == [[int(top3.max())]]

    model = make_model()
    prefix = make_prefix(model, 4)
    options = DecodeOptions(method="sample", max_len=10, min_len=1)
    uniforms = torch.rand(4, 10, generator=torch.Generator().manual_seed(6))
    greedy = decode(model, prefix, replace(options, method="greedy"))
    assert torch.equal(decode(model, prefix, replace(options, top_k=1), uniforms=uniforms).tokens, greedy.tokens)
    sampled = decode(model, prefix, options, uniforms=uniforms)
    assert not torch.equal(sampled.tokens, greedy.tokens)
    assert torch.equal(decode(model, prefix, options, uniforms=uniforms.double()).tokens, sampled.tokens)


def repeated_ngrams(tokens: list[int], n: int) -> int:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) - len(set(grams))


@pytest.mark.filterwarnings("ignore:Passing `no_repeat_ngram_size` with `inputs_embeds`")
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("options", ALL_METHODS, ids=["greedy", "beam", "sample"])
def test_no_repeat_ngram_blocking(n: int, options: DecodeOptions) -> None:
    model = make_model(stop_bias=None)  # degenerates into repeating one token
    prefix = make_prefix(model, 4)
    # A cold temperature makes sampling as repetitive as the greedy search.
    base = replace(options, max_len=12, min_len=12, temperature=0.01)
    plain = decode(model, prefix, base, generator=torch.Generator().manual_seed(0))
    assert sum(repeated_ngrams(row, n) for row in plain.tokens.tolist()) > 0
    blocked_options = replace(base, no_repeat_ngram=n)
    blocked = decode(model, prefix, blocked_options, generator=torch.Generator().manual_seed(0))
    assert all(repeated_ngrams(row, n) == 0 for row in blocked.tokens.tolist())
    if options.method != "sample":  # and exactly the n-grams Hugging Face bans, no more
        assert torch.equal(blocked.tokens, hf_generate(model, prefix, blocked_options))


def test_sampled_logprobs_carry_gradients_only_when_asked() -> None:
    model = make_model(sparse=True)
    visual = torch.randn(2, NUM_TOKENS, VISUAL_DIM)
    options = DecodeOptions(method="sample", num_samples=3, max_len=8)
    result = decode(model, model.prefix_from_visual(visual), options, with_logprobs=True)
    assert result.token_logprobs.requires_grad
    result.token_logprobs.sum().backward()
    assert model.mapper.net[0].weight.grad.abs().sum() > 0
    assert model.sparse_mask.key.weight.grad.abs().sum() > 0
    plain = decode(model, model.prefix_from_visual(visual), options)
    assert plain.token_logprobs is None and not plain.scores.requires_grad
    beams = decode(model, model.prefix_from_visual(visual), DecodeOptions(method="beam", beams=3), with_logprobs=True)
    assert beams.token_logprobs is not None and not beams.token_logprobs.requires_grad  # choosing is not differentiable


def test_a_prefix_in_another_dtype_is_decoded_in_gpt2s() -> None:
    model = make_model()
    prefix = make_prefix(model, 3)
    double = decode(model, Prefix(prefix.embeds.double(), prefix.keep), DecodeOptions(max_len=10), with_logprobs=True)
    single = decode(model, prefix, DecodeOptions(max_len=10), with_logprobs=True)
    assert torch.equal(double.tokens, single.tokens) and double.token_logprobs.dtype == torch.float32


def test_options_from_config_and_validation() -> None:
    options = DecodeOptions.from_config(DecodeConfig(beams=3, max_len=15, min_len=4, length_penalty=0.5))
    assert (options.method, options.beams, options.max_len, options.min_len) == ("beam", 3, 15, 4)
    assert options.length_penalty == 0.5 and options.stop_ids == STOP_IDS
    greedy = DecodeOptions.from_config(DecodeConfig(beams=1), max_len=9)
    assert (greedy.method, greedy.max_len) == ("greedy", 9)
    assert DecodeOptions.from_config(DecodeConfig(beams=2)).method == "beam"
    assert DecodeOptions(stop_ids=[13, np.int64(50256)]).stop_ids == (13, 50256)  # a tuple of ints
    bad = [
        {"method": "nucleus"}, {"beams": 2}, {"method": "greedy", "num_samples": 2}, {"min_len": 5, "max_len": 4},
        {"method": "sample", "temperature": 0.0}, {"method": "sample", "top_p": 0.0}, {"max_len": 0},
        {"method": "beam", "beams": 2, "num_return": 3}, {"num_return": 0}, {"method": "sample", "top_p": 1.5},
    ]  # fmt: skip
    for fields in bad:
        with pytest.raises(ValueError, match="^invalid decoding options: "):
            DecodeOptions(**fields)
    ranges = "need temperature > 0, top_k >= 0, 0 < top_p <= 1 and no_repeat_ngram >= 0"
    with pytest.raises(ValueError, match=f"^invalid decoding options: {re.escape(ranges)}$"):
        DecodeOptions(top_k=-1)
    with pytest.raises(ValueError, match=f"^invalid decoding options: .+; {re.escape(ranges)}$"):
        DecodeOptions(max_len=0, top_p=2.0)


def test_captions_longer_than_gpt2_positions_are_refused() -> None:
    model = make_model()
    limit = model.gpt.config.n_positions - NUM_TOKENS + 1
    assert decode(model, make_prefix(model, 1), DecodeOptions(max_len=limit, min_len=limit)).lengths[0] == limit
    message = f"prefix ({NUM_TOKENS}) + max_len ({limit + 1}) - 1 = 65 positions exceed GPT-2's n_positions (64)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        decode(model, make_prefix(model, 1), DecodeOptions(max_len=limit + 1))


class CharTokenizer:
    """Decodes id i as chr(i) (13 is the stop '.')."""

    def batch_decode(self, rows: list[list[int]]) -> list[str]:
        return ["".join("." if i == 13 else chr(i) for i in row) for row in rows]


def test_captions_from_tokens_drops_only_the_stop_token() -> None:
    pad = 50256
    tokens = torch.tensor([[32, 97, 98, 13, pad], [32, 99, 100, 101, 102], [13, pad, pad, pad, pad]])
    result = DecodeResult(
        tokens=tokens,
        lengths=torch.tensor([4, 5, 1]),
        stopped=torch.tensor([True, False, True]),
        token_logprobs=None,
        scores=torch.zeros(3),
    )
    assert captions_from_tokens(CharTokenizer(), result) == ["ab", "cdef", ""]


def test_caption_batches_in_eval_mode_from_images_or_features() -> None:
    model = make_model(sparse=True).train()
    images = torch.randn(3, 3, 8, 8)
    options = DecodeOptions(method="beam", beams=3, num_return=2, max_len=9)
    with torch.no_grad():
        features = model.encoder(images)
        expected = decode(model.eval(), model.encode(images), options)
    model.train()
    texts = captions_from_tokens(CharTokenizer(), expected)
    batches = [{"images": images, "indices": [4, 5, 6]}, {"indices": [], "skipped": 2}, {"features": features}]
    out = list(caption_batches(model, batches, CharTokenizer(), options))
    assert model.training and [id(batch) for batch, _ in out] == [id(batch) for batch in batches]  # all, in order
    from_images, nothing, from_features = (captions for _, captions in out)
    assert nothing == [] and from_features == from_images
    assert [[c.text for c in captions] for captions in from_images] == [texts[i : i + 2] for i in (0, 2, 4)]
    scores = expected.scores.tolist()
    assert [[c.score for c in captions] for captions in from_images] == [scores[i : i + 2] for i in (0, 2, 4)]
    assert all(a.score >= b.score for a, b in from_images)  # best first


def test_finished_rows_do_not_change_when_others_run_on() -> None:
    """Every prefix of a batch decoded with a larger max_len keeps the shorter run's finished captions."""
    model = make_model(sparse=True)
    prefix = make_prefix(model, 6)
    for options in (DecodeOptions(max_len=4), DecodeOptions(max_len=12)):
        result = decode(model, prefix, options)
        short = decode(model, prefix, DecodeOptions(max_len=3))
        done = short.stopped
        assert done.any()
        width = short.tokens.shape[1]
        assert torch.equal(result.tokens[done, :width], short.tokens[done])
        assert torch.equal(result.lengths[done], short.lengths[done])


def test_beam_search_finds_a_better_sequence_than_greedy() -> None:
    model = make_model(sparse=True)
    prefix = make_prefix(model, 8)
    greedy = decode(model, prefix, DecodeOptions(max_len=10))
    beam = decode(model, prefix, DecodeOptions(method="beam", beams=5, max_len=10))
    assert all(math.isfinite(s) for s in beam.scores.tolist())
    assert beam.scores.mean() > greedy.scores.mean()
    assert (beam.scores > greedy.scores + 1e-3).any()


@pytest.mark.parametrize("implementation", ATTENTION_IMPLEMENTATIONS)
@torch.no_grad()
def test_sparse_mask_acts_under_every_accepted_attention_implementation(implementation: str) -> None:
    """Under each accepted implementation the mask equals removing the dropped prefix positions from the
    input (kept positions at their training position ids), and decoding matches the default SDPA's."""
    model = make_model(sparse=True)
    prefix = make_prefix(model, 4)
    assert (~prefix.keep).any() and prefix.keep.any(dim=1).all(), "the mask must drop some positions"
    ids = torch.randint(0, 1000, (4, 7), generator=torch.Generator().manual_seed(4))
    sdpa_greedy = decode(model, prefix, DecodeOptions(max_len=10), with_logprobs=True)
    model.gpt.set_attn_implementation(implementation)
    hidden = model.token_hidden(prefix, ids)
    unmasked = model.token_hidden(Prefix(prefix.embeds, torch.ones_like(prefix.keep)), ids)
    assert not torch.allclose(hidden, unmasked, atol=1e-3)
    for row in range(4):
        kept = prefix.keep[row].nonzero().squeeze(1)
        captions = torch.arange(NUM_TOKENS, NUM_TOKENS + ids.shape[1] - 1)
        embeds = torch.cat([prefix.embeds[row, kept], model.gpt.transformer.wte(ids[row, :-1])]).unsqueeze(0)
        alone = model.gpt.transformer(inputs_embeds=embeds, position_ids=torch.cat([kept, captions])[None])
        first = 0 if prefix.keep[row, -1] else 1  # a dropped last prefix position has no counterpart
        expected = alone.last_hidden_state[0, kept.numel() - 1 + first :]
        torch.testing.assert_close(hidden[row, first:], expected, atol=1e-5, rtol=1e-5)
    greedy = decode(model, prefix, DecodeOptions(max_len=10), with_logprobs=True)
    assert torch.equal(greedy.tokens, sdpa_greedy.tokens)
    torch.testing.assert_close(greedy.token_logprobs, sdpa_greedy.token_logprobs, atol=1e-5, rtol=1e-5)


def test_an_attention_implementation_without_4d_masks_is_refused() -> None:
    """Flash attention cannot apply the sparse mask: the model says so instead of training without it."""
    model = make_model(sparse=True)
    model.gpt.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'flash_attention_2' is not supported"):
        model.token_hidden(make_prefix(model, 2), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="only \\('sdpa', 'eager'\\) apply"):
        decode(model, make_prefix(model, 2), DecodeOptions(max_len=3))


@pytest.mark.parametrize("sparse", [False, True])
def test_teacher_forced_logprobs_equal_the_samples_own(sparse: bool) -> None:
    """Five images, two samples each, captions shorter than ten tokens: the scoring pass pairs each caption
    with its own image (rows = captions // images, not a count of tokens) and applies the temperature."""
    model = make_model(sparse=sparse)
    prefix = make_prefix(model, 5)
    options = DecodeOptions(method="sample", num_samples=2, max_len=9, min_len=1, temperature=0.7)
    with torch.no_grad():
        result = decode(model, prefix, options, with_logprobs=True, generator=torch.Generator().manual_seed(4))
        scored = teacher_forced_logprobs(model, prefix, result, options.temperature)
        untempered = teacher_forced_logprobs(model, prefix, result)
        greedy = decode(model, prefix, DecodeOptions(max_len=9, min_len=1), with_logprobs=True)
        greedy_scored = teacher_forced_logprobs(model, prefix, greedy)  # one caption per image, temperature 1
    assert result.tokens.shape == (10, int(result.lengths.max())) and result.tokens.shape[1] // 5 != 2
    torch.testing.assert_close(scored, result.token_logprobs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(untempered, result.token_logprobs, atol=1e-3)
    torch.testing.assert_close(greedy_scored, greedy.token_logprobs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fast", [None, FastDecode(check_every=2)], ids=["dynamic", "static"])
@pytest.mark.parametrize("options", ALL_METHODS, ids=["greedy", "beam", "sample"])
def test_decoding_creates_its_tensors_where_the_prefix_is(options: DecodeOptions, fast: FastDecode | None) -> None:
    """Every tensor that decoding and scoring create is placed on the prefix's device: under a default
    device of ``meta``, a tensor created without a device lands there, and any operation that mixes it
    with the CPU tensors raises."""
    model = make_model(sparse=True, output_ids=torch.cat([torch.arange(400), torch.tensor(STOP_IDS)]))
    prefix = make_prefix(model, 3)

    def run() -> tuple[DecodeResult, torch.Tensor]:
        generator = torch.Generator().manual_seed(3)
        result = decode(model, prefix, options, with_logprobs=True, fast=fast, generator=generator)
        return result, teacher_forced_logprobs(model, prefix, result, options.temperature)

    expected, expected_scored = run()
    with torch.device("meta"):
        result, scored = run()
    assert result.tokens.device.type == "cpu" and torch.equal(result.tokens, expected.tokens)
    torch.testing.assert_close(result.token_logprobs, expected.token_logprobs)
    torch.testing.assert_close(scored, expected_scored)
