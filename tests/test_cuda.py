"""The GPU path on a CUDA device: CUDA-graph decoding against the eager path, prediction and the feature
cache against the CPU's, and the sparse mask under every accepted attention implementation. Every test is
skipped where CUDA is absent (``scripts/gpu_check.sh`` runs them on a GPU machine); the training steps in
every precision are in tests/test_precision.py, which runs them on the CPU and, where present, on CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import SHARED, save_model, tiny_config
from test_decoding import NUM_TOKENS, VISUAL_DIM, make_model

from data.datasets import ImageReader
from data.transforms import build_transform
from engine.features import FeatureStore, create_store, encode_into_store
from models.build import build_captioner
from models.captioner import Prefix
from models.decoding import DecodeOptions, decode, dropout_off, teacher_forced_logprobs
from models.encoder import build_encoder
from models.gpt2 import ATTENTION_IMPLEMENTATIONS
from models.static_decode import FastDecode
from utils.precision import autocast

pytestmark = pytest.mark.optional_tool(None if torch.cuda.is_available() else "needs a CUDA device; none is present")

CUDA = torch.device("cuda")
GREEDY = DecodeOptions(max_len=14, min_len=1)
SAMPLE = DecodeOptions(method="sample", num_samples=3, max_len=14, min_len=1, temperature=0.8)
REAL_IMAGES = SHARED / "real_images"


def cuda_prefix(model, images: int, seed: int = 1) -> Prefix:
    visual = torch.randn(images, NUM_TOKENS, VISUAL_DIM, generator=torch.Generator().manual_seed(seed))
    return model.prefix_from_visual(visual.to(CUDA))


def graph_decode(model, prefix: Prefix, options: DecodeOptions, fast: FastDecode, caplog, **kwargs):
    """Decode twice with CUDA graphs (the first records, the second replays); fail if recording fell back."""
    decode(model, prefix, options, with_logprobs=True, fast=fast, **kwargs)
    result = decode(model, prefix, options, with_logprobs=True, fast=fast, **kwargs)
    assert "CUDA graph recording failed" not in caplog.text, caplog.text
    return result


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_cuda_graph_greedy_equals_the_eager_path(precision: str, tolerance: float, caplog) -> None:
    model = make_model(sparse=True).to(CUDA)
    prefix = cuda_prefix(model, 6)
    with torch.no_grad(), autocast(precision, CUDA):
        eager = decode(model, prefix, GREEDY, with_logprobs=True)
        replayed = graph_decode(model, prefix, GREEDY, FastDecode(cuda_graphs=True), caplog)
    assert len(set(eager.lengths.tolist())) > 1, "rows must finish at varied steps"
    assert torch.equal(replayed.tokens, eager.tokens) and torch.equal(replayed.lengths, eager.lengths)
    torch.testing.assert_close(replayed.token_logprobs, eager.token_logprobs, atol=tolerance, rtol=tolerance)


def test_replayed_graph_sees_the_optimizer_steps(caplog) -> None:
    """Graphs read the weights where they live: after three in-place AdamW steps, replay = eager."""
    model = make_model(sparse=True).to(CUDA)
    visual = torch.randn(4, NUM_TOKENS, VISUAL_DIM, generator=torch.Generator().manual_seed(2)).to(CUDA)
    fast = FastDecode(cuda_graphs=True)
    with torch.no_grad():
        before = graph_decode(model, model.prefix_from_visual(visual), GREEDY, fast, caplog)
    ids = torch.randint(0, 1000, (4, 8), generator=torch.Generator().manual_seed(3)).to(CUDA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-2)
    for _ in range(3):
        model(None, ids, ids.clone(), features=visual)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        prefix = model.prefix_from_visual(visual)
        eager = decode(model, prefix, GREEDY, with_logprobs=True)
        replayed = decode(model, prefix, GREEDY, with_logprobs=True, fast=fast)
    assert not torch.equal(eager.token_logprobs[:, 0], before.token_logprobs[:, 0]), "the steps changed nothing"
    assert torch.equal(replayed.tokens, eager.tokens)
    torch.testing.assert_close(replayed.token_logprobs, eager.token_logprobs, atol=1e-5, rtol=1e-5)


def test_sampling_on_the_static_cache_equals_the_eager_path(caplog) -> None:
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
            replayed = graph_decode(model, prefix, SAMPLE, FastDecode(cuda_graphs=True), caplog, uniforms=uniforms)
        teacher_forced_logprobs(model, cuda_prefix(model, 4), replayed, SAMPLE.temperature).sum().backward()
    assert torch.equal(replayed.tokens, eager.tokens) and torch.equal(replayed.lengths, eager.lengths)
    torch.testing.assert_close(replayed.token_logprobs, eager.token_logprobs.detach(), atol=1e-5, rtol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-5, rtol=1e-4, msg=name)


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
