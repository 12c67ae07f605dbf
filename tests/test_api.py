"""Tests for the Python API (models.api): inputs of every kind, batching, n-best lists, sampling options and
the sparse mask's kept positions (test_export.py runs it in a fresh process on an exported folder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import save_model, tiny_config
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor, to_tensor

from data.image_io import load_image
from data.transforms import build_transform
from models import ScoredCaption, load_captioner
from models.build import build_captioner
from models.decoding import DecodeOptions, captions_from_tokens, decode
from models.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("single_thread", "hub_offline")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    cfg = tiny_config(**{"decode.beams": 2, "decode.max_len": 8, "decode.min_len": 1, "model.threshold": 0.5})
    model = build_captioner(cfg)
    path = tmp_path_factory.mktemp("api") / "tiny.pt"
    save_model(path, model, cfg)
    return path


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("photos")
    paths = []
    for i in range(5):
        path = root / f"p{i}.png"
        Image.effect_noise((40 + 9 * i, 32), 30 + 20 * i).convert("RGB").save(path)
        paths.append(path)
    return paths


def direct_captions(
    captioner, paths: list[Path], options: DecodeOptions, generator: torch.Generator | None = None
) -> tuple[list[str], torch.Tensor]:
    """Oracle: transform the files and run the shared decoder by hand."""
    transform = build_transform(captioner.model.encoder.image_res)
    images = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        result = decode(captioner.model, captioner.model.encode(images), options, generator=generator)
    return captions_from_tokens(load_tokenizer(captioner.cfg.model.tokenizer), result), result.scores


def test_captions_equal_the_shared_decoder_for_every_input_kind(checkpoint, photos) -> None:
    captioner = load_captioner(checkpoint, device="auto")
    assert captioner.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    expected, _ = direct_captions(captioner, photos, DecodeOptions(method="beam", beams=3, max_len=8, min_len=1))
    assert len(set(expected)) > 1
    pils = [load_image(p) for p in photos]
    assert captioner.caption(photos, beams=3) == expected
    assert captioner.caption([str(p) for p in photos], beams=3, batch_size=2) == expected
    assert captioner.caption(pils, beams=3) == expected
    assert captioner.caption([pil_to_tensor(p) for p in pils], beams=3) == expected  # uint8
    assert captioner.caption([to_tensor(p) for p in pils], beams=3) == expected  # float in [0, 1]
    assert captioner.caption(photos[0], beams=3) == expected[:1]
    same_size = [p.resize((40, 32)) for p in pils]
    batch = torch.stack([to_tensor(p) for p in same_size])  # B x 3 x H x W
    assert captioner.caption(batch, beams=3) == captioner.caption(same_size, beams=3)


def test_defaults_come_from_the_saved_decode_config(checkpoint, photos) -> None:
    captioner = load_captioner(checkpoint, device="cpu")
    assert (captioner.decode_defaults.beams, captioner.decode_defaults.max_len) == (2, 8)
    expected, _ = direct_captions(captioner, photos, DecodeOptions(method="beam", beams=2, max_len=8, min_len=1))
    assert captioner.caption(photos) == expected
    greedy, _ = direct_captions(captioner, photos, DecodeOptions(max_len=5, min_len=1))
    assert captioner.caption(photos, method="greedy", max_len=5) == greedy


def test_every_decoding_setting_reaches_the_decoder(checkpoint, photos) -> None:
    captioner = load_captioner(checkpoint, device="cpu")
    gpt = captioner.model.gpt
    with torch.no_grad():  # GPT-2's last LayerNorm biased towards the (tied) end-of-text embedding: captions end early
        gpt.transformer.ln_f.bias += 15 * gpt.lm_head.weight[50256]
    # each setting, left at the saved default instead (max_len 8, min_len 1, length penalty 1, no blocking), changes
    # the captions
    settings = {"max_len": 6, "min_len": 3, "length_penalty": 0.5, "no_repeat_ngram": 2}
    expected, _ = direct_captions(captioner, photos, DecodeOptions(method="beam", beams=3, **settings))
    assert captioner.caption(photos, beams=3, **settings) == expected


def test_n_best_lists_are_the_best_beams_with_their_scores(checkpoint, photos) -> None:
    captioner = load_captioner(checkpoint, device="cpu")
    n_best = captioner.caption(photos, num_captions=3)
    options = DecodeOptions(method="beam", beams=3, num_return=3, max_len=8, min_len=1)  # beam widened to 3
    texts, scores = direct_captions(captioner, photos, options)
    assert [[c.text for c in captions] for captions in n_best] == [texts[i : i + 3] for i in range(0, 15, 3)]
    flat_scores = [c.score for captions in n_best for c in captions]
    torch.testing.assert_close(torch.tensor(flat_scores), scores.float())
    assert all(isinstance(c, ScoredCaption) for captions in n_best for c in captions)
    assert [captions[0].text for captions in n_best] == captioner.caption(photos, beams=3)


def test_sampling_options_seed_and_scored_samples(checkpoint, photos) -> None:
    captioner = load_captioner(checkpoint, device="cpu")
    settings = {"method": "sample", "temperature": 0.7, "top_p": 0.9, "seed": 5}
    first = captioner.caption(photos, **settings)
    options = DecodeOptions(method="sample", max_len=8, min_len=1, temperature=0.7, top_p=0.9)
    assert first == direct_captions(captioner, photos, options, torch.Generator().manual_seed(5))[0]
    assert first == captioner.caption(photos, **settings)
    assert first != captioner.caption(photos, **{**settings, "seed": 6})
    greedy = captioner.caption(photos, method="greedy")
    assert captioner.caption(photos, method="sample", top_k=1, seed=5) == greedy  # only the best token is left
    samples = captioner.caption(photos, num_captions=4, **settings)
    assert [len(s) for s in samples] == [4] * len(photos)
    assert all(a.score >= b.score for s in samples for a, b in zip(s, s[1:], strict=False))
    with pytest.raises(ValueError, match="greedy decoding gives one caption"):
        captioner.caption(photos, method="greedy", num_captions=2)
    with pytest.raises(ValueError, match="num_return=5"):
        captioner.caption(photos, beams=3, num_captions=5)
    with pytest.raises(TypeError, match="cannot caption a int"):
        captioner.caption([3])


def test_kept_positions_are_the_sparse_mask_decisions(checkpoint, photos) -> None:
    captioner = load_captioner(checkpoint, device="cpu")
    assert captioner.has_sparse_mask
    kept = captioner.kept_positions(photos, batch_size=2)
    transform = build_transform(captioner.model.encoder.image_res)
    images = torch.stack([transform(load_image(p)) for p in photos])
    with torch.no_grad():
        visual = captioner.model.encoder(images)
        prefix = captioner.model.mapper(visual)
        scores = captioner.model.sparse_mask.scores(prefix)
    assert torch.equal(torch.stack(kept), scores > 0.5)  # model.threshold
    assert 0 < torch.stack(kept).sum() < torch.stack(kept).numel()
    grid = captioner.spatial_grid
    assert kept[0].shape == (1 + grid * grid,) and grid == captioner.model.encoder.grid_size
