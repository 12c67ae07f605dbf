"""The static-cache decode path (``decode(..., fast=FastDecode())``) against the eager path (Hugging Face's
dynamic cache, finished rows dropped): same tokens, log-probabilities and gradients, with the sparse mask,
an output vocabulary, and dropout off, on, or switched off in training mode as SCST does."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from helpers import tiny_config
from test_decoding import NUM_TOKENS, STOP_IDS, VISUAL_DIM, check_well_formed, make_model, make_prefix

import engine.steps
from engine.steps import ScstStep, fast_decode_mode
from metrics.cider import CiderD
from metrics.cider_df import DocumentFrequency
from models.build import build_captioner
from models.decoding import CachedPrefixLM, DecodeOptions, decode, dropout_off, teacher_forced_logprobs
from models.static_decode import FastDecode, StaticPrefixLM, StepGraphs

pytestmark = pytest.mark.usefixtures("single_thread")

GREEDY = DecodeOptions(max_len=14, min_len=1)
SAMPLE = DecodeOptions(method="sample", num_samples=3, max_len=14, min_len=1, temperature=0.8)
NO_REPEAT = DecodeOptions(max_len=14, min_len=3, no_repeat_ngram=2)


def fixed_dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """Dropout whose mask depends only on the last index (a feature, or an absolute key position), so
    that both paths drop the same units although they draw tensors of other shapes."""
    if not training or p == 0:
        return input
    keep = (torch.arange(input.shape[-1], device=input.device) % 4 != 1).to(input.dtype)
    return input * keep / (1 - p)


@contextlib.contextmanager
def dropout_mode(model, mode: str, monkeypatch):
    """``off``: eval mode; ``on``: GPT-2 in training mode with :func:`fixed_dropout` at every dropout
    site; ``disabled``: training mode inside :func:`dropout_off`, as SCST samples with
    ``scst_opts.dropout: false``.

    The attention-probability dropout goes through :func:`fixed_dropout` only in Hugging Face's eager
    attention (SDPA draws its own), so ``on`` runs the eager one, which applies the sparse mask too."""
    if mode == "off":
        yield
        return
    model.gpt.train()
    if mode == "on":
        monkeypatch.setattr(torch.nn.functional, "dropout", fixed_dropout)
        model.gpt.set_attn_implementation("eager")
        yield
    else:
        with dropout_off(model):
            yield
    model.eval()


@pytest.fixture
def static_slots(monkeypatch) -> list[int]:
    """The slot of every :meth:`StaticPrefixLM.step` call, in order: evidence that the static path ran
    (``decode`` falls back to the dynamic cache when the static one does not apply)."""
    slots: list[int] = []
    step = StaticPrefixLM.step

    def recorded(self, tokens: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        slots.append(int(slot))
        return step(self, tokens, slot)

    monkeypatch.setattr(StaticPrefixLM, "step", recorded)
    return slots


def check_static_steps(
    slots: list[int], prefix_len: int, lengths: torch.Tensor, check_every: int, max_len: int
) -> None:
    """The static decode stepped through slots ``P, P+1, ...`` until the longest caption (L tokens) was
    complete, seen at the first check after it: checks follow tokens check_every, 2 check_every, ..., so
    the decode stops after min(ceil(L / check_every) check_every, max_len) tokens, one step fewer."""
    tokens = min(math.ceil(int(lengths.max()) / check_every) * check_every, max_len)
    assert len(slots) == tokens - 1, (len(slots), int(lengths.max()))
    assert slots == list(range(prefix_len, prefix_len + len(slots)))


class LengthReward:
    """A reward object in :class:`CiderD`'s place that scores a caption by its number of characters: samples
    and the baseline get different rewards, so the SCST loss and its gradients are not zero."""

    def score_candidates(self, candidates: list[str], references: list) -> np.ndarray:
        assert len(candidates) == len(references)
        return np.array([float(len(c)) for c in candidates])


def restricted_vocabulary() -> torch.Tensor:
    vocab = torch.randperm(50000, generator=torch.Generator().manual_seed(2))[:20000]
    return torch.cat([vocab, torch.tensor(STOP_IDS)]).unique()


@pytest.mark.parametrize("dropout", ["off", "on", "disabled"])
@pytest.mark.parametrize("options", [GREEDY, SAMPLE, NO_REPEAT], ids=["greedy", "sample", "no_repeat"])
@pytest.mark.parametrize("sparse, restricted, check_every", [(True, False, 4), (False, True, 1)])
def test_static_cache_gives_the_eager_tokens_and_logprobs(
    options: DecodeOptions, dropout: str, sparse: bool, restricted: bool, check_every: int, monkeypatch, static_slots
) -> None:
    model = make_model(sparse=sparse, output_ids=restricted_vocabulary() if restricted else None)
    prefix = make_prefix(model, 6)
    if sparse:
        assert (~prefix.keep).any(), "the mask must really drop positions"
    uniforms = torch.rand(6 * options.num_samples, options.max_len, generator=torch.Generator().manual_seed(5))
    with dropout_mode(model, dropout, monkeypatch), torch.no_grad():
        eager = decode(model, prefix, options, with_logprobs=True, uniforms=uniforms)
        assert static_slots == []
        fast = decode(model, prefix, options, with_logprobs=True, uniforms=uniforms, fast=FastDecode(check_every))
        check_static_steps(static_slots, prefix.embeds.shape[1], eager.lengths, check_every, options.max_len)
        eval_logprobs = None
        if dropout == "on":
            with dropout_off(model):
                eval_logprobs = decode(model, prefix, options, with_logprobs=True, uniforms=uniforms).token_logprobs
    check_well_formed(fast, options)
    lengths = eager.lengths.tolist()
    assert len(set(lengths)) > 2 and min(lengths) < options.max_len, lengths  # rows finish at varied steps
    assert torch.equal(fast.tokens, eager.tokens)
    assert torch.equal(fast.lengths, eager.lengths) and torch.equal(fast.stopped, eager.stopped)
    torch.testing.assert_close(fast.token_logprobs, eager.token_logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.scores, eager.scores, atol=1e-5, rtol=1e-5)
    if eval_logprobs is not None:  # the stand-in dropout really changed the prefix pass and the steps
        assert not torch.allclose(eval_logprobs[:, :1], eager.token_logprobs[:, :1], atol=1e-3)
        assert not torch.allclose(eval_logprobs[:, 1:2], eager.token_logprobs[:, 1:2], atol=1e-3)


@pytest.mark.parametrize("variant", ["add_cross_attention", "reorder_and_upcast_attn"])
def test_gpt2_variants_the_static_step_does_not_compute_decode_on_the_dynamic_cache(variant: str, static_slots) -> None:
    model = make_model()
    prefix = make_prefix(model, 2)
    with torch.no_grad():
        plain = decode(model, prefix, GREEDY, fast=FastDecode())
        assert static_slots, "a plain GPT-2 decodes on the static cache"
        static_slots.clear()
        setattr(model.gpt.config, variant, True)  # only the configuration: the gate is what is tested
        fallback = decode(model, prefix, GREEDY, fast=FastDecode())
    assert static_slots == []
    assert torch.equal(fallback.tokens, plain.tokens)


@pytest.mark.parametrize("dropout", ["off", "on"])
def test_static_cache_gradients_equal_the_eager_ones(dropout: str, monkeypatch, static_slots) -> None:
    """SCST back-propagates through the sampled log-probabilities: the static cache (written out of
    place with gradients) must give every parameter the gradient of the eager path."""
    model = make_model(sparse=True)
    visual = torch.randn(4, NUM_TOKENS, VISUAL_DIM, generator=torch.Generator().manual_seed(3))
    uniforms = torch.rand(12, SAMPLE.max_len, generator=torch.Generator().manual_seed(6))
    grads = []
    with dropout_mode(model, dropout, monkeypatch):
        for fast in (None, FastDecode()):
            model.zero_grad()
            result = decode(model, model.prefix_from_visual(visual), SAMPLE, True, uniforms=uniforms, fast=fast)
            assert (len(static_slots) > 0) == (fast is not None)
            result.token_logprobs.sum().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    eager, fast = grads
    assert eager.keys() == fast.keys() and "mapper.net.0.weight" in eager and "sparse_mask.key.weight" in eager
    assert "gpt.transformer.h.1.attn.c_attn.weight" in eager
    for name in eager:
        torch.testing.assert_close(fast[name], eager[name], atol=1e-4, rtol=1e-4, msg=name)


def test_static_cache_samples_follow_the_generator_given(static_slots) -> None:
    """Without uniforms, the draws come from ``generator`` alone: the same generator seed gives the same
    samples whatever torch's global seed, another one other samples."""
    model = make_model()
    prefix = make_prefix(model, 3)
    runs = []
    for global_seed, seed in [(0, 9), (1, 9), (0, 10)]:
        torch.manual_seed(global_seed)
        with torch.no_grad():
            runs.append(decode(model, prefix, SAMPLE, fast=FastDecode(), generator=torch.Generator().manual_seed(seed)))
    assert static_slots
    assert torch.equal(runs[0].tokens, runs[1].tokens) and not torch.equal(runs[0].tokens, runs[2].tokens)


def test_static_cache_records_no_cuda_graph_on_the_cpu(monkeypatch, static_slots) -> None:
    """CUDA graphs are asked for, but the decode runs on the CPU: its steps run eagerly, nothing is recorded."""
    recorded = []
    monkeypatch.setattr(StepGraphs, "step_fn", lambda self, lm: recorded.append(lm) or lm.step)
    model = make_model()
    with torch.no_grad():
        decode(model, make_prefix(model, 2), GREEDY, fast=FastDecode(cuda_graphs=True))
    assert static_slots and recorded == []


def test_static_cache_samples_with_live_dropout_reproducibly(static_slots) -> None:
    """With real (random) dropout the static path's samples follow torch's seed, and the dropout acts in
    the static step itself (tokens 2 onwards), not only in the prefix pass that gives the first token."""
    model = make_model(sparse=True)
    prefix = make_prefix(model, 4)
    uniforms = torch.rand(12, SAMPLE.max_len, generator=torch.Generator().manual_seed(7))
    runs = []
    model.gpt.train()
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            runs.append(decode(model, prefix, SAMPLE, with_logprobs=True, uniforms=uniforms, fast=FastDecode()))
    assert static_slots
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].token_logprobs, runs[1].token_logprobs)
    assert not torch.equal(runs[0].token_logprobs[:, 0], runs[2].token_logprobs[:, 0])
    # One static step from one cache, under two seeds: different logits in training mode, equal in eval mode.
    with torch.no_grad():
        prefilled = CachedPrefixLM(model, prefix)
        prefilled.prefill()
        lm = StaticPrefixLM.from_prefilled(*prefilled.static_parts(), steps=3)
    tokens, slot = torch.tensor([5, 17, 300, 4000]), torch.tensor([prefix.embeds.shape[1]])

    def step_logits(seed: int) -> torch.Tensor:
        fresh = StaticPrefixLM(lm.transformer, [k.clone() for k in lm.keys], [v.clone() for v in lm.values],
                               lm.keep.clone(), lm.head, lm.embeddings)  # fmt: skip
        torch.manual_seed(seed)
        with torch.no_grad():
            return fresh.step(tokens, slot)

    assert torch.equal(step_logits(0), step_logits(0))
    assert not torch.allclose(step_logits(0), step_logits(1), atol=1e-3)
    model.eval()
    assert torch.equal(step_logits(0), step_logits(1))


def test_scst_step_is_the_same_with_and_without_the_static_cache(tokenizer, static_slots) -> None:
    """SCST without dropout (``scst_opts.dropout: false``): same samples, rewards, baseline, loss and
    gradients, with rewards that differ between the samples and the baseline."""
    refs = [["a red circle on the left"] * 5, ["two green stars"] * 5]
    batch = {"features": torch.randn(2, 17, 256, generator=torch.Generator().manual_seed(1)), "indices": [0, 1]}
    outputs = []
    for fast_decode in ("off", "static"):
        cfg = tiny_config(**{"scst_opts.dropout": False, "scst_opts.sample_max_len": 10,
                             "scst_opts.fast_decode": fast_decode})  # fmt: skip
        torch.manual_seed(0)
        model = build_captioner(cfg).train()
        step = ScstStep(model, tokenizer, LengthReward(), refs, cfg.scst_opts, torch.device("cpu"))
        assert (step.fast is None) == (fast_decode == "off")
        static_slots.clear()
        out = step(batch)
        assert (len(static_slots) > 0) == (fast_decode != "off")
        out["loss"].backward()
        out["grad"] = model.mapper.net[0].weight.grad.clone()
        outputs.append(out)
    eager, fast = outputs
    check_advantages(eager, eager["grad"])
    for key in ("reward", "baseline", "sample_len"):
        assert torch.equal(fast[key], eager[key]), key
    for key in ("loss", "entropy", "grad"):
        torch.testing.assert_close(fast[key], eager[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.parametrize("sparse, restricted", [(True, False), (False, True)])
@pytest.mark.parametrize("fast", [None, FastDecode()], ids=["dynamic", "static"])
def test_teacher_forced_scoring_equals_sampling_with_gradients(
    sparse: bool, restricted: bool, fast, monkeypatch, static_slots
):
    """SCST without dropout samples without gradients and scores the samples in one teacher-forced pass:
    the same tokens, log-probabilities and parameter gradients as sampling with gradients (today's path)."""
    model = make_model(sparse=sparse, output_ids=restricted_vocabulary() if restricted else None)
    visual = torch.randn(4, NUM_TOKENS, VISUAL_DIM, generator=torch.Generator().manual_seed(3))
    uniforms = torch.rand(12, SAMPLE.max_len, generator=torch.Generator().manual_seed(6))
    weights = torch.randn(12, SAMPLE.max_len, generator=torch.Generator().manual_seed(8))  # stands in for rewards
    runs = []
    with dropout_mode(model, "disabled", monkeypatch):
        for teacher_forced in (False, True):
            model.zero_grad()
            prefix = model.prefix_from_visual(visual)
            with torch.set_grad_enabled(not teacher_forced):
                result = decode(model, prefix, SAMPLE, True, uniforms=uniforms, fast=fast)
            assert (len(static_slots) > 0) == (fast is not None)
            logprobs = result.token_logprobs
            if teacher_forced:
                assert not logprobs.requires_grad
                logprobs = teacher_forced_logprobs(model, prefix, result, SAMPLE.temperature)
            (logprobs * weights[:, : logprobs.shape[1]]).sum().backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            runs.append((result, logprobs.detach(), grads))
    (today, today_logprobs, today_grads), (new, new_logprobs, new_grads) = runs
    assert len(set(today.lengths.tolist())) > 2, "rows must finish at varied steps"
    assert torch.equal(new.tokens, today.tokens) and torch.equal(new.lengths, today.lengths)
    torch.testing.assert_close(new_logprobs, today_logprobs, atol=1e-5, rtol=0)
    assert new_grads.keys() == today_grads.keys() and "gpt.transformer.h.1.mlp.c_fc.weight" in today_grads
    assert ("sparse_mask.key.weight" in today_grads) == sparse
    for name, grad in today_grads.items():
        torch.testing.assert_close(new_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("fast_decode", ["auto", "static"])
def test_the_step_decodes_samples_and_baseline_on_the_cache_fast_decode_names(tokenizer, monkeypatch, fast_decode):
    """``fast_decode: auto`` on the CPU takes the path measured fastest there (docs/gpu.md): the samples and the
    greedy baseline on the dynamic cache, the sampling decode keeping its gradients, no teacher-forced pass.
    ``static``: both decodes on the step's static cache, the samples drawn without gradients and scored in one
    teacher-forced pass."""
    refs = [["a red circle on the left"] * 5, ["two green stars"] * 5]
    cider = CiderD(DocumentFrequency.from_references(refs))
    batch = {"features": torch.randn(2, 17, 256, generator=torch.Generator().manual_seed(1)), "indices": [0, 1]}
    decodes, teacher = [], []
    real_decode = engine.steps.decode

    def spy(model, prefix, options, *args, fast=None, **kwargs):
        decodes.append((options.method, fast, torch.is_grad_enabled()))
        return real_decode(model, prefix, options, *args, fast=fast, **kwargs)

    monkeypatch.setattr("engine.steps.decode", spy)
    monkeypatch.setattr("models.captioning.decode", spy)  # the greedy baseline
    monkeypatch.setattr("engine.steps.teacher_forced_logprobs", _counting(teacher_forced_logprobs, teacher))
    cfg = tiny_config(**{"scst_opts.dropout": False, "scst_opts.sample_max_len": 10,
                         "scst_opts.fast_decode": fast_decode})  # fmt: skip
    model = build_captioner(cfg).train()
    step = ScstStep(model, tokenizer, cider, refs, cfg.scst_opts, torch.device("cpu"))
    out = step(batch)
    assert out["loss"].requires_grad
    if fast_decode == "auto":
        assert step.fast is None
        assert decodes == [("sample", None, True), ("greedy", None, False)] and teacher == []
        assert fast_decode_mode("auto", torch.device("cuda")) == "static"  # CUDA keeps the static cache
    else:
        assert isinstance(step.fast, FastDecode)
        assert decodes == [("sample", step.fast, False), ("greedy", step.fast, False)] and len(teacher) == 1


def test_scst_step_without_dropout_scores_its_samples_in_one_pass(tokenizer, monkeypatch, static_slots) -> None:
    """The whole SCST step, dropout off: teacher-forced scoring gives the loss and gradients of the step
    that keeps the decode's gradients (``teacher_forced = False``), on the static cache as on the dynamic."""
    refs = [["a red circle on the left"] * 5, ["two green stars"] * 5]
    batch = {"features": torch.randn(2, 17, 256, generator=torch.Generator().manual_seed(1)), "indices": [0, 1]}
    # The mean baseline: no greedy decode, whose static steps would hide how the samples were drawn.
    cfg = tiny_config(**{"scst_opts.dropout": False, "scst_opts.sample_max_len": 10, "scst_opts.temperature": 0.7,
                         "scst_opts.fast_decode": "static", "scst_opts.baseline": "mean"})  # fmt: skip
    torch.manual_seed(0)
    model = build_captioner(cfg).train()
    step = ScstStep(model, tokenizer, LengthReward(), refs, cfg.scst_opts, torch.device("cpu"))
    calls = []
    monkeypatch.setattr("engine.steps.teacher_forced_logprobs", _counting(teacher_forced_logprobs, calls))
    outputs, static_steps = [], []
    for teacher_forced in (False, True):
        step.teacher_forced = teacher_forced
        model.zero_grad()
        out = step(batch)
        out["loss"].backward()
        out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        outputs.append(out)
        static_steps.append(len(static_slots))
        static_slots.clear()
    assert len(calls) == 1, "the teacher-forced path must be the one taken"
    assert all(static_steps), "both paths must sample on the static cache"
    today, new = outputs
    # The mean baseline averages to the mean reward; the samples' rewards still differ from their baselines.
    assert today["loss"] != 0 and today["grads"]["mapper.net.0.weight"].abs().max() > 0
    for key in ("reward", "baseline", "sample_len"):
        assert torch.equal(new[key], today[key]), key
    torch.testing.assert_close(new["loss"], today["loss"], atol=1e-6, rtol=1e-5)
    assert new["grads"].keys() == today["grads"].keys() and "mapper.net.0.weight" in today["grads"]
    for name, grad in today["grads"].items():
        torch.testing.assert_close(new["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def check_advantages(out: dict[str, torch.Tensor], grad: torch.Tensor) -> None:
    """The step's rewards differ from its baseline, so its loss and the gradient ``grad`` are not zero."""
    assert out["reward"] != out["baseline"] and out["loss"] != 0
    assert grad.abs().max() > 0


def _counting(fn, calls: list):
    def counted(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return counted
