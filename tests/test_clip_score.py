"""CLIPScore and RefCLIPScore: the formula against a direct open_clip computation on a small random model,
a model whose embeddings are built to rank captions, evaluate.py --clip, and the offline message."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import to_tensor

import evaluate
from metrics.clip_score import ClipScorer, ClipUnavailable, load_clip, parse_clip_spec

# A CLIP small enough to build in a second, random weights, registered with open_clip under TINY.
TINY = "opg-tiny-clip"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


try:
    import open_clip as open_clip_module
except ImportError:
    open_clip_module = None
NEEDS_OPEN_CLIP = pytest.mark.optional_tool(
    None if open_clip_module else "open_clip not installed (pip install open_clip_torch)"
)


@pytest.fixture(scope="module")
def open_clip(tmp_path_factory):
    open_clip = open_clip_module
    folder = tmp_path_factory.mktemp("clip_cfg")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder)
    return open_clip


@pytest.fixture(scope="module")
def tiny_weights(open_clip, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return path


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 36), colour) for colour in COLOURS.values()]


@NEEDS_OPEN_CLIP
def test_scores_equal_a_direct_open_clip_computation(open_clip, tiny_weights):
    scorer = load_clip(f"{TINY}:{tiny_weights}")
    captions = ["a red square", "a green square on a table", "a blue square"]
    references = [["a red box", "red"], ["a green box"], ["a blue box", "a square", "something blue"]]
    scores = scorer.score(iter(_images()), captions, references)

    model, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=str(tiny_weights))
    tokenizer = open_clip.get_tokenizer(TINY)
    model.eval()
    expected_clip, expected_ref = [], []
    with torch.no_grad():
        for image, caption, refs in zip(_images(), captions, references, strict=True):
            v = model.encode_image(preprocess(image)[None])[0]
            c = model.encode_text(tokenizer(["A photo depicts " + caption]))[0]
            clip_s = 2.5 * max(F.cosine_similarity(v, c, dim=0).item(), 0.0)
            ref_cos = [F.cosine_similarity(c, model.encode_text(tokenizer(["A photo depicts " + r]))[0], dim=0).item()
                       for r in refs]  # fmt: skip
            text = max(max(ref_cos), 0.0)
            expected_clip.append(clip_s)
            expected_ref.append(2 * clip_s * text / (clip_s + text) if clip_s + text > 0 else 0.0)
    assert scores.per_image == pytest.approx(expected_clip, abs=1e-5)
    assert scores.ref_per_image == pytest.approx(expected_ref, abs=1e-5)
    assert scores.clip_s == pytest.approx(sum(expected_clip) / 3, abs=1e-5)
    assert scores.ref_clip_s == pytest.approx(sum(expected_ref) / 3, abs=1e-5)


class ColourCLIP(torch.nn.Module):
    """Image embedding: the mean colour less mid-grey (B, 3); text embedding: +1 for the colour its caption names
    and -1 for the others (B, 3), from token ids (B, 1) that :func:`colour_tokens` gives. Unlike colours point
    apart: their cosines are negative."""

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.mean(dim=(2, 3)) - 0.5

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return 2 * torch.eye(3)[tokens[:, 0]] - 1


def colour_tokens(texts: list[str]) -> torch.Tensor:
    names = list(COLOURS)
    return torch.tensor([[next(i for i, name in enumerate(names) if name in text)] for text in texts])


def test_matching_captions_score_above_shuffled_ones():
    scorer = ClipScorer(ColourCLIP(), to_tensor, colour_tokens)
    matching = ["a red square", "a green square", "a blue square"]
    shuffled = matching[1:] + matching[:1]
    references = [[caption] for caption in matching]
    good = scorer.score(iter(_images()), matching, references)
    bad = scorer.score(iter(_images()), shuffled, references)
    assert all(g > b for g, b in zip(good.per_image, bad.per_image, strict=True))
    assert good.clip_s > bad.clip_s and good.ref_clip_s > bad.ref_clip_s
    assert bad.per_image == [0.0, 0.0, 0.0]  # a negative cosine with the image counts as 0
    assert bad.ref_per_image == [0.0, 0.0, 0.0]


def test_references_pointing_away_from_the_caption_give_no_text_credit():
    scorer = ClipScorer(ColourCLIP(), to_tensor, colour_tokens)
    matching = ["a red square", "a green square", "a blue square"]
    elsewhere = [[caption] for caption in matching[1:] + matching[:1]]  # cosine -1/3 with each caption
    scores = scorer.score(iter(_images()), matching, elsewhere)
    assert all(value > 2 for value in scores.per_image)  # caption and image point the same way
    assert scores.ref_per_image == [0.0, 0.0, 0.0]  # harmonic mean with a text term of max(-1/3, 0) = 0


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [("ViT-B-32/openai", ("ViT-B-32", "openai")), ("ViT-B-32:/w/open_clip.bin", ("ViT-B-32", "/w/open_clip.bin")),
     ("hf-hub:org/repo", ("hf-hub:org/repo", ""))],
)  # fmt: skip
def test_clip_spec(spec, parsed):
    assert parse_clip_spec(spec) == parsed
    with pytest.raises(ClipUnavailable, match="NAME/PRETRAINED"):
        parse_clip_spec("ViT-B-32")


@NEEDS_OPEN_CLIP
def test_offline_weights_are_named_in_one_line(open_clip, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no network here; the same message comes after retries
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache
    with pytest.raises(ClipUnavailable) as caught:
        load_clip("ViT-B-32/openai")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        "CLIP weights ViT-B-32/openai are not on this machine and could not be downloaded: open_clip looks for "
        f"open_clip_model.safetensors or open_clip_pytorch_model.bin of the Hugging Face repository "
        f"timm/vit_base_patch32_clip_224.openai, in {tmp_path} (HF_HUB_CACHE)"
    )
    with pytest.raises(ClipUnavailable, match="no pretrained tag 'nope' for ViT-B-32"):
        load_clip("ViT-B-32/nope")
    with pytest.raises(ClipUnavailable, match="no weights file /nowhere/w.bin"):
        load_clip("ViT-B-32:/nowhere/w.bin")


REFERENCES = {name: [f"a {name} square", f"{name} paint"] for name in COLOURS}


@pytest.fixture
def colour_data(tmp_path) -> tuple[Path, Path, Path]:
    for name, image in zip(COLOURS, _images(), strict=True):
        image.save(tmp_path / f"{name}.png")
    gt = {
        "images": [{"id": n, "file_name": f"{name}.png"} for n, name in enumerate(COLOURS)],
        "annotations": [{"image_id": n, "id": 2 * n + k, "caption": caption}
                        for n, name in enumerate(COLOURS) for k, caption in enumerate(REFERENCES[name])],
    }  # fmt: skip
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    results = [{"image_id": n, "caption": f"a {name} tile"} for n, name in enumerate(COLOURS)]
    (tmp_path / "preds.json").write_text(json.dumps(results))
    return tmp_path, tmp_path / "gt.json", tmp_path / "preds.json"


@pytest.fixture
def one_meteor(monkeypatch):
    from metrics.coco_eval import CaptionScorer

    with CaptionScorer() as scorer:
        monkeypatch.setattr(evaluate, "CaptionScorer", lambda: contextlib.nullcontext(scorer))
        yield


@NEEDS_OPEN_CLIP
def test_evaluate_clip_scores_and_offline_fallback(open_clip, tiny_weights, colour_data, one_meteor, capsys):
    root, gt, preds = colour_data
    args = ["--results", str(preds), "--annotations", str(gt), "--no_spice", "--image_root", str(root)]
    assert evaluate.main([*args, "--clip", f"{TINY}:{tiny_weights}"]) == 0
    assert "RefCLIP-S" in capsys.readouterr().out
    metrics = json.loads((root / "preds.metrics.json").read_text())["metrics"]
    images = [Image.open(root / f"{name}.png") for name in COLOURS]
    captions = [f"a {name} tile" for name in COLOURS]
    direct = load_clip(f"{TINY}:{tiny_weights}").score(images, captions, list(REFERENCES.values()))
    assert metrics["CLIP-S"] == pytest.approx(direct.clip_s, abs=1e-6)
    assert metrics["RefCLIP-S"] == pytest.approx(direct.ref_clip_s, abs=1e-6)

    assert evaluate.main([*args, "--clip", f"{TINY}:{root / 'missing.bin'}"]) == 0  # the other metrics stand
    captured = capsys.readouterr()
    assert captured.err.strip() == f"CLIP-S and RefCLIP-S unavailable: --clip {TINY}:{root / 'missing.bin'}: " \
                                   f"no weights file {root / 'missing.bin'}"  # fmt: skip
    report = json.loads((root / "preds.metrics.json").read_text())
    assert "CIDEr" in report["metrics"] and "CLIP-S" not in report["metrics"]
    assert "no weights file" in report["unavailable"]["RefCLIP-S"]
