"""Checkpoints: self-describing round trip, strict loading with readable errors, atomic writes."""

from pathlib import Path

import pytest
import torch
from helpers import TINY_GPT2, save_model, tiny_config

from models.build import architecture, build_captioner
from models.pretrained import load_model
from utils.checkpoint import CheckpointError, atomic_save, load_state_strict, read_checkpoint, save_checkpoint
from utils.config import to_dict


def _save_tiny(path: Path, **overrides):
    cfg = tiny_config(**overrides)
    model = build_captioner(cfg).eval()
    save_model(path, model, cfg)
    return model, cfg


def test_round_trip_rebuilds_the_same_model_from_the_file_alone(tmp_path):
    model, cfg = _save_tiny(tmp_path / "m.pt", **{"model.mapping_type": "transformer", "model.mapper_layers": 1,
                                                  "model.mapper_heads": 2})  # fmt: skip
    loaded, loaded_cfg = load_model(tmp_path / "m.pt")
    assert (loaded_cfg.encoder, loaded_cfg.model, loaded_cfg.decode) == (cfg.encoder, cfg.model, cfg.decode)
    assert loaded_cfg.training == to_dict(cfg) and loaded_cfg.precision == cfg.train.precision
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    visual = torch.randn(2, 17, 256)
    ids = torch.tensor([[64, 2266, 13], [734, 4171, 13]])
    with torch.no_grad():
        assert torch.equal(
            model.token_logits(model.prefix_from_visual(visual), ids),
            loaded.token_logits(loaded.prefix_from_visual(visual), ids),
        )


def test_round_trip_keeps_the_output_vocabulary(tmp_path):
    cfg = tiny_config()
    vocab = torch.tensor([13, 64, 257, 2266, 4171, 50256])
    model = build_captioner(cfg, output_ids=vocab).eval()
    save_model(tmp_path / "m.pt", model, cfg)
    loaded, _ = load_model(tmp_path / "m.pt")
    assert torch.equal(loaded.output_ids, vocab)
    visual, ids = torch.randn(2, 17, 256), torch.tensor([[64, 2266, 13], [257, 4171, 13]])
    with torch.no_grad():
        logits = loaded.token_logits(loaded.prefix_from_visual(visual), ids)
        assert torch.equal(logits, model.token_logits(model.prefix_from_visual(visual), ids))
    assert torch.isfinite(logits[..., vocab]).all() and torch.isinf(logits).sum() == logits[..., 0].numel() * 50251


def test_strict_load_lists_missing_unexpected_and_mis_shaped_keys(tmp_path):
    _save_tiny(tmp_path / "mlp.pt")
    other = build_captioner(tiny_config(**{"model.use_sparse_mask": False, "model.gpt2_config": {
        "n_layer": 1, "n_embd": 64, "n_head": 2, "n_positions": 64}}))  # fmt: skip
    with pytest.raises(CheckpointError) as err:
        load_state_strict(other, read_checkpoint(tmp_path / "mlp.pt")["model"], "mlp.pt")
    message = str(err.value)
    assert "mlp.pt" in message and "unexpected" in message and "sparse_mask.m" in message
    assert "gpt.transformer.h.1" in message
    deeper = build_captioner(tiny_config(**{"model.gpt2_config": {**TINY_GPT2, "n_layer": 3}}))
    # a GPT-2 block holds 12 tensors: c_attn, c_proj, ln_1, ln_2, mlp.c_fc and mlp.c_proj, weight and bias each
    with pytest.raises(CheckpointError, match=r"mlp\.pt do not fit the model; 12 missing: gpt\.transformer\.h\.2\."):
        load_state_strict(deeper, read_checkpoint(tmp_path / "mlp.pt")["model"], "mlp.pt")
    wider = build_captioner(tiny_config(**{"model.gpt2_config": {"n_layer": 2, "n_embd": 32, "n_head": 2}}))
    with pytest.raises(CheckpointError, match=r"another shape: .*checkpoint \(50257, 64\), model \(50257, 32\)"):
        load_state_strict(wider, read_checkpoint(tmp_path / "mlp.pt")["model"], "mlp.pt")


@pytest.mark.parametrize("content", [b"", b"hello, I am text", b"PK\x03\x04truncated"])
def test_unreadable_files_are_named(tmp_path, content):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(content)
    with pytest.raises(CheckpointError, match="bad.pt"):
        read_checkpoint(bad)


def test_foreign_checkpoint_is_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an opg-captioner checkpoint"):
        read_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "missing.pt")


def test_failed_serialisation_keeps_the_previous_checkpoint(tmp_path):
    """An object that cannot be pickled (a real full disk is in test_failures.py)."""
    path = tmp_path / "last.pt"
    atomic_save({"format": "x", "value": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot be pickled")

    with pytest.raises(RuntimeError, match="cannot be pickled"):
        atomic_save({"value": Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


@pytest.mark.parametrize("saved", [True, False, None], ids=["applied", "not applied", "saved before the option"])
def test_a_checkpoint_decodes_with_the_mask_setting_it_was_saved_with(tmp_path, saved):
    """An SCST checkpoint (``apply_sparse_mask: false``) keeps its mask weights but reads every position;
    one saved before the option existed applies its mask, as it was trained."""
    cfg = tiny_config(**{"model.threshold": 0.5})
    model = build_captioner(cfg)
    config = to_dict(cfg)
    if saved is None:
        del config["model"]["apply_sparse_mask"]
    else:
        config["model"]["apply_sparse_mask"] = saved
    save_checkpoint(tmp_path / "m.pt", model, config, architecture(model))
    loaded, loaded_cfg = load_model(tmp_path / "m.pt")
    assert loaded.sparse_mask is not None and loaded_cfg.model.apply_sparse_mask is (saved is not False)
    with torch.no_grad():
        keep = loaded.prefix_from_visual(torch.randn(4, 17, 256, generator=torch.Generator().manual_seed(0))).keep
    assert bool(keep.all()) is (saved is False)
