"""The GPU path on a CUDA device: CUDA-graph decoding against the eager path, SCST learning with its samples
replayed from a CUDA graph, prediction and the feature cache against the CPU's, and the sparse mask under
every accepted attention implementation. Every test is skipped where CUDA is absent (``scripts/gpu_check.sh``
runs them on a GPU machine); the training steps in every precision are in tests/test_precision.py, which runs
them on the CPU and, where present, on CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SHARED, save_model, tiny_config
from test_decoding import NUM_TOKENS, VISUAL_DIM, make_model
from test_scst import GOOD, caption_batch

from data.datasets import ImageReader
from data.transforms import build_transform
from engine.features import FeatureStore, create_store, encode_into_store
from engine.steps import ScstStep, XEStep
from metrics.cider import CiderD
from metrics.cider_df import DocumentFrequency
from models.build import build_captioner
from models.captioner import Prefix
from models.decoding import DecodeOptions, captions_from_tokens, decode, dropout_off, teacher_forced_logprobs
from models.encoder import build_encoder
from models.gpt2 import ATTENTION_IMPLEMENTATIONS
from models.static_decode import FastDecode
from utils.precision import autocast, grad_scaler

pytestmark = pytest.mark.optional_tool(None if torch.cuda.is_available() else "needs a CUDA device; none is present")

CUDA = torch.device("cuda")
GREEDY = DecodeOptions(max_len=14, min_len=1)
SAMPLE = DecodeOptions(method="sample", num_samples=3, max_len=14, min_len=1, temperature=0.8)
REAL_IMAGES = SHARED / "real_images"


def cuda_prefix(model, images: int, seed: int = 1) -> Prefix:
    visual = torch.randn(images, NUM_TOKENS, VISUAL_DIM, generator=torch.Generator().manual_seed(seed))
    return model.prefix_from_visual(visual.to(CUDA))


@pytest.fixture
def graph_calls(monkeypatch) -> dict[str, int]:
    """Counts CUDA-graph recordings and replays (``torch.cuda.CUDAGraph``), so that a test of graph decoding
    fails when the steps ran eagerly."""
    calls = {"recorded": 0, "replayed": 0}
    capture_begin, replay = torch.cuda.CUDAGraph.capture_begin, torch.cuda.CUDAGraph.replay

    def counted_capture_begin(self, *args, **kwargs):
        calls["recorded"] += 1
        return capture_begin(self, *args, **kwargs)

    def counted_replay(self):
        calls["replayed"] += 1
        return replay(self)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin", counted_capture_begin)
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counted_replay)
    return calls


def graph_decode(model, prefix: Prefix, options: DecodeOptions, fast: FastDecode, caplog, graph_calls, **kwargs):
    """Decode twice with CUDA graphs: the first records the step once, the second only replays it (one
    replay per step, at least one per token of the longest caption but its last); fail if recording fell
    back."""
    decode(model, prefix, options, with_logprobs=True, fast=fast, **kwargs)
    assert graph_calls["recorded"] == 1 and graph_calls["replayed"] >= 1, graph_calls
    replayed = graph_calls["replayed"]
    result = decode(model, prefix, options, with_logprobs=True, fast=fast, **kwargs)
    assert "CUDA graph recording failed" not in caplog.text, caplog.text
    assert graph_calls["recorded"] == 1, graph_calls
    assert graph_calls["replayed"] - replayed >= int(result.lengths.max()) - 1 > 0, (graph_calls, result.lengths)
    return result


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_cuda_graph_greedy_equals_the_eager_path(precision: str, tolerance: float, caplog, graph_calls) -> None:
    model = make_model(sparse=True).to(CUDA)
    prefix = cuda_prefix(model, 6)
    with torch.no_grad(), autocast(precision, CUDA):
        eager = decode(model, prefix, GREEDY, with_logprobs=True)
        assert graph_calls == {"recorded": 0, "replayed": 0}
        replayed = graph_decode(model, prefix, GREEDY, FastDecode(cuda_graphs=True), caplog, graph_calls)
    assert len(set(eager.lengths.tolist())) > 1, "rows must finish at varied steps"
    assert torch.equal(replayed.tokens, eager.tokens) and torch.equal(replayed.lengths, eager.lengths)
    torch.testing.assert_close(replayed.token_logprobs, eager.token_logprobs, atol=tolerance, rtol=tolerance)


def test_replayed_graph_sees_the_optimizer_steps(caplog, graph_calls) -> None:
    """Graphs read the weights where they live: after three in-place AdamW steps, replay = eager."""
    model = make_model(sparse=True).to(CUDA)
    visual = torch.randn(4, NUM_TOKENS, VISUAL_DIM, generator=torch.Generator().manual_seed(2)).to(CUDA)
    fast = FastDecode(cuda_graphs=True)
    with torch.no_grad():
        before = graph_decode(model, model.prefix_from_visual(visual), GREEDY, fast, caplog, graph_calls)
    ids = torch.randint(0, 1000, (4, 8), generator=torch.Generator().manual_seed(3)).to(CUDA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    for _ in range(3):
        model(None, ids, ids.clone(), features=visual)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        prefix = model.prefix_from_visual(visual)
        eager = decode(model, prefix, GREEDY, with_logprobs=True)
        replays = graph_calls["replayed"]
        replayed = decode(model, prefix, GREEDY, with_logprobs=True, fast=fast)
    assert graph_calls["recorded"] == 1 and graph_calls["replayed"] > replays, graph_calls
    assert not torch.equal(eager.token_logprobs[:, 0], before.token_logprobs[:, 0]), "the steps changed nothing"
    assert torch.equal(replayed.tokens, eager.tokens)
    torch.testing.assert_close(replayed.token_logprobs, eager.token_logprobs, atol=1e-5, rtol=1e-5)


def test_sampling_on_the_static_cache_equals_the_eager_path(caplog, graph_calls) -> None:
    """Dropout off, the same per-image uniform draws: graph-replayed samples are the eager samples, and
    their teacher-forced log-probabilities and gradients are those of sampling with gradients."""
    model = make_model(sparse=True).to(CUDA).train()
    draws = [
        torch.rand(SAMPLE.num_samples, SAMPLE.max_len, generator=torch.Generator().manual_seed(i)) for i in range(4)
    ]
    uniforms = torch.cat(draws).to(CUDA)
    with dropout_off(model):
        prefix = cuda_prefix(model, 4)
        eager = decode(model, prefix, SAMPLE, with_logprobs=True, uniforms=uniforms)
        eager.token_logprobs.sum().backward()
        eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        with torch.no_grad():
            fast = FastDecode(cuda_graphs=True)
            replayed = graph_decode(model, prefix, SAMPLE, fast, caplog, graph_calls, uniforms=uniforms)
        teacher_forced_logprobs(model, cuda_prefix(model, 4), replayed, SAMPLE.temperature).sum().backward()
    assert torch.equal(replayed.tokens, eager.tokens) and torch.equal(replayed.lengths, eager.lengths)
    torch.testing.assert_close(replayed.token_logprobs, eager.token_logprobs.detach(), atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4, msg=name)


def _train(step, model, batches: list[dict], precision: str, lr: float) -> list[float]:
    """One optimizer step per batch (with the scaler for fp16); the losses, each checked finite."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    scaler, losses = grad_scaler(precision, CUDA), []
    for batch in batches:
        with autocast(precision, CUDA):
            loss = step(batch)["loss"]
        assert torch.isfinite(loss), losses
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


def _expected_reward(model, visual, tokenizer, cider, refs) -> float:
    """Mean reward of 64 samples per image, drawn with dropout off as SCST samples here (fixed draws)."""
    options = DecodeOptions(method="sample", num_samples=64, max_len=10)
    uniforms = torch.rand(2 * 64, 10, generator=torch.Generator().manual_seed(0)).to(CUDA)
    with torch.no_grad(), dropout_off(model):
        result = decode(model, model.encode(features=visual), options, uniforms=uniforms)
    captions = captions_from_tokens(tokenizer, result)
    return float(cider.score_candidates(captions, [r for r in refs for _ in range(64)]).mean())


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_xe_then_scst_steps_stay_finite_and_learn(precision: str, tokenizer, graph_calls) -> None:
    """XE steps (two wordings per image, as tests/test_scst.py) stay finite and lower the loss; then 20 SCST
    steps (static cache, CUDA graphs, dropout off) stay finite and raise the expected reward, i.e. lower
    the SCST objective."""
    torch.manual_seed(0)
    cfg = tiny_config(**{"scst_opts.num_samples": 4, "scst_opts.baseline": "mean", "scst_opts.sample_max_len": 10,
                         "scst_opts.dropout": False, "scst_opts.fast_decode": "graphs", "device": "cuda"})  # fmt: skip
    model = build_captioner(cfg).to(CUDA).train()
    visual = torch.randn(2, 17, 256).to(CUDA)
    batch = caption_batch(tokenizer)
    pairs = [{"features": visual[[image, image]], **batch} for image in (0, 1) * 40]
    losses = _train(XEStep(model, CUDA, cfg.train), model, pairs, precision, 3e-3)
    assert sum(losses[-10:]) < sum(losses[:10]), losses

    refs = [[GOOD] * 5, [GOOD] * 5]
    cider = CiderD(DocumentFrequency.from_references([*refs, ["a blue square on the right"] * 5]))
    before = _expected_reward(model, visual, tokenizer, cider, refs)
    assert 0.5 < before < 9.0, before  # a real mixture of rewarded and unrewarded samples
    scst = ScstStep(model, tokenizer, cider, refs, cfg.scst_opts, CUDA)
    _train(scst, model, [{"features": visual, "indices": [0, 1]}] * 20, precision, 3e-4)
    # The samples came from one recorded step, replayed at least once in each of the 20 steps.
    assert graph_calls["recorded"] == 1 and graph_calls["replayed"] >= 20, graph_calls
    after = _expected_reward(model, visual, tokenizer, cider, refs)
    assert after > before + 0.5, (before, after)


def test_predict_on_cuda_gives_the_cpu_captions(tmp_path: Path) -> None:
    import predict  # here, so that the other tests run where its evaluation imports are missing

    photos = sorted(str(p) for p in REAL_IMAGES.glob("*.jpg"))
    assert len(photos) >= 6, f"real photos missing at {REAL_IMAGES} (set OPG_SHARED_DIR)"
    torch.manual_seed(0)
    cfg = tiny_config()
    checkpoint = save_model(tmp_path / "best.pt", build_captioner(cfg), cfg)
    captions = []
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.json"
        args = ["--checkpoint", str(checkpoint), "--images", *photos, "--output", str(out), "--device", device]
        assert predict.main([*args, "--precision", "fp32", "--num_workers", "0", "--no_progress"]) == 0
        captions.append(json.loads(out.read_text()))
    assert len(captions[0]) == len(photos) and captions[1] == captions[0]


def test_feature_cache_built_on_cuda_equals_the_cpus(tmp_path: Path) -> None:
    photos = sorted(p.name for p in REAL_IMAGES.glob("*.jpg"))
    assert len(photos) >= 6, f"real photos missing at {REAL_IMAGES} (set OPG_SHARED_DIR)"
    torch.manual_seed(0)
    encoder = build_encoder("swin_demo").eval()
    reader = ImageReader(REAL_IMAGES, build_transform(encoder.image_res))
    stores = []
    for device in (torch.device("cpu"), CUDA):
        directory = tmp_path / device.type
        create_store(directory, photos, (17, 256), "float16")
        encode_into_store(encoder.to(device), reader, directory, device, batch_size=4)
        stores.append(FeatureStore(directory))
    cpu, cuda = stores
    assert len(cpu) == len(cuda) == len(photos)
    for name in photos:  # float16 keeps 11 significant bits: about 5e-4 relative
        torch.testing.assert_close(cuda[name], cpu[name], rtol=2e-3, atol=2e-3, msg=name)


@pytest.mark.parametrize("implementation", ATTENTION_IMPLEMENTATIONS)
@torch.no_grad()
def test_sparse_mask_acts_under_every_accepted_attention_implementation(implementation: str) -> None:
    """On CUDA too, the mask equals removing the dropped prefix positions (kept ones at their positions)."""
    model = make_model(sparse=True).to(CUDA)
    model.gpt.set_attn_implementation(implementation)
    prefix = cuda_prefix(model, 4)
    assert (~prefix.keep).any(), "the mask must drop some positions"
    ids = torch.randint(0, 1000, (4, 7), generator=torch.Generator().manual_seed(4)).to(CUDA)
    hidden = model.token_hidden(prefix, ids)
    unmasked = model.token_hidden(Prefix(prefix.embeds, torch.ones_like(prefix.keep)), ids)
    assert not torch.allclose(hidden, unmasked, atol=1e-3)
    for row in range(4):
        kept = prefix.keep[row].nonzero().squeeze(1)
        captions = torch.arange(NUM_TOKENS, NUM_TOKENS + ids.shape[1] - 1, device=CUDA)
        embeds = torch.cat([prefix.embeds[row, kept], model.gpt.transformer.wte(ids[row, :-1])]).unsqueeze(0)
        alone = model.gpt.transformer(inputs_embeds=embeds, position_ids=torch.cat([kept, captions])[None])
        torch.testing.assert_close(hidden[row, 1:], alone.last_hidden_state[0, kept.numel() :], atol=1e-4, rtol=1e-4)
