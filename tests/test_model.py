"""The OPG model: shapes, gradients, masks and a tiny overfitting run."""

import pytest
import torch
from helpers import TINY_GPT2, tiny_config

from data.text import IGNORE_INDEX, clean_caption
from models.build import build_captioner
from models.captioner import Prefix, attention_mask
from models.mapper import MLPMapper, TransformerMapper
from models.tokenizer import GPT2_VOCAB_SIZE, caption_vocabulary


def _batch(tokenizer, captions, size=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(len(captions), 3, size, size, generator=g)
    ids = [tokenizer.encode(clean_caption(c)) for c in captions]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tokenizer.eos_token_id)
    labels = torch.full((len(ids), width), IGNORE_INDEX)
    for i, seq in enumerate(ids):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, : len(seq)] = torch.tensor(seq)
    return images, input_ids, labels


def test_tokenizer_is_real_gpt2(tokenizer):
    assert len(tokenizer) == GPT2_VOCAB_SIZE
    assert tokenizer.encode("a man riding a horse.") == [64, 582, 10311, 257, 8223, 13]


def test_clean_caption():
    assert clean_caption('A man-made "Lake", at dusk!  (Nice)') == "a man made lake at dusk nice."
    assert clean_caption("one two three", max_words=2) == "one two."


def test_mappers_shapes():
    visual = torch.randn(3, 50, 32)
    assert MLPMapper(32, 16, 50)(visual).shape == (3, 50, 16)
    assert TransformerMapper(32, 16, 10, num_layers=2, num_heads=2)(visual).shape == (3, 10, 16)


@pytest.mark.parametrize("mapping_type", ["mlp", "transformer"])
def test_forward_shapes_and_losses(tokenizer, mapping_type):
    cfg = tiny_config(**{"model.mapping_type": mapping_type, "model.mapper_layers": 1, "model.mapper_heads": 2})
    model = build_captioner(cfg)
    images, input_ids, labels = _batch(tokenizer, ["a red circle", "two blue squares on the left"])
    prefix = model.encode(images)
    assert prefix.embeds.shape == (2, 17, 64) and prefix.keep.shape == (2, 17)
    logits = model.token_logits(prefix, input_ids)
    assert logits.shape == (*input_ids.shape, GPT2_VOCAB_SIZE)
    out = model(images, input_ids, labels, aux_weight=0.1)
    assert torch.isfinite(out["loss"])
    expected = float((out["xe"] + 0.1 * out["aux"]).detach())
    assert out["loss"].detach().item() == pytest.approx(expected, rel=1e-5)


def test_teacher_forced_logits_are_gpt2s_next_token_logits_after_the_prefix(tokenizer):
    """Logit ``t`` is what GPT-2 itself predicts after the prefix and the tokens before ``t``: Hugging Face's
    own forward over ``[prefix ; caption]``, with the dropped prefix positions as its padding mask."""
    model = build_captioner(tiny_config()).eval()
    _, input_ids, _ = _batch(tokenizer, ["a red circle", "two blue squares on the left"])
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(2, model.prefix_length, generator=g) > 0.4
    keep[:, 0] = True  # a query with no visible key is this model's own convention, not Hugging Face's
    prefix = Prefix(torch.randn(2, model.prefix_length, 64, generator=g), keep)
    with torch.no_grad():
        embeds = torch.cat([prefix.embeds, model.gpt.transformer.wte(input_ids)], dim=1)
        padding = torch.cat([keep, torch.ones_like(input_ids, dtype=torch.bool)], dim=1).long()
        positions = torch.arange(embeds.shape[1]).expand(2, -1)
        gpt = model.gpt(inputs_embeds=embeds, attention_mask=padding, position_ids=positions).logits
        steps = input_ids.shape[1]
        expected = gpt[:, model.prefix_length - 1 : model.prefix_length - 1 + steps]
        torch.testing.assert_close(model.token_logits(prefix, input_ids), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "overrides,frozen_prefixes",
    [({}, ("encoder.", "sparse_mask.")), ({"model.sparse_mask_mode": "ste"}, ("encoder.",)),
     ({"model.only_prefix": True, "model.sparse_mask_mode": "ste"}, ("encoder.", "gpt.")),
     ({"model.mapping_type": "transformer", "model.mapper_layers": 1, "model.mapper_heads": 2},
      ("encoder.", "sparse_mask."))],
)  # fmt: skip
def test_every_trainable_parameter_gets_a_gradient(tokenizer, overrides, frozen_prefixes):
    model = build_captioner(tiny_config(**overrides))
    images, input_ids, labels = _batch(tokenizer, ["a red circle", "two blue squares", "three stars"])
    model(images, input_ids, labels, aux_weight=0.1)["loss"].backward()
    for name, param in model.named_parameters():
        if name.startswith(frozen_prefixes):
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.requires_grad, name
            assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient for {name}"
    assert any(n.startswith("sparse_mask.") for n, _ in model.named_parameters())


def test_a_frozen_gpt2_runs_without_dropout_in_training(tokenizer):
    """With ``only_prefix`` GPT-2 stays in eval mode when the model trains (as ClipCap's prefix-only model)."""
    gpt2 = {**TINY_GPT2, "resid_pdrop": 0.5, "embd_pdrop": 0.5, "attn_pdrop": 0.5}
    _, input_ids, _ = _batch(tokenizer, ["a red circle on the left"])
    prefix = Prefix(torch.randn(1, 17, 64), torch.ones(1, 17, dtype=torch.bool))
    for only_prefix in (True, False):
        model = build_captioner(tiny_config(**{"model.gpt2_config": gpt2, "model.only_prefix": only_prefix})).train()
        with torch.no_grad():
            same = torch.equal(model.token_logits(prefix, input_ids), model.token_logits(prefix, input_ids))
        assert same is only_prefix and model.mapper.training


def test_sparse_mask_drops_positions_and_keeps_embeddings(tokenizer):
    model = build_captioner(tiny_config(**{"model.threshold": 0.5})).eval()
    images, _, _ = _batch(tokenizer, ["a red circle on the left"])
    prefix = model.encode(images)
    assert 0 < prefix.keep.sum() < prefix.keep.numel()
    visual = model.encoder(images)
    assert torch.allclose(prefix.embeds, model.mapper(visual))  # the gate is the identity going forward


def test_dropped_prefix_positions_are_invisible(tokenizer):
    model = build_captioner(tiny_config(**{"model.use_sparse_mask": False})).eval()
    _, input_ids, _ = _batch(tokenizer, ["a red circle on the left"])
    keep = torch.rand(1, model.prefix_length, generator=torch.Generator().manual_seed(1)) > 0.5
    keep[0, -1] = True  # the last prefix position's own state predicts the first word
    prefix = Prefix(torch.randn(1, model.prefix_length, 64), keep)
    base = model.token_logits(prefix, input_ids)
    noise = torch.randn_like(prefix.embeds)
    dropped = torch.where(prefix.keep.unsqueeze(-1), prefix.embeds, noise)
    kept = torch.where(prefix.keep.unsqueeze(-1), noise, prefix.embeds)
    dropped_change = (model.token_logits(Prefix(dropped, prefix.keep), input_ids) - base).abs().max()
    kept_change = (model.token_logits(Prefix(kept, prefix.keep), input_ids) - base).abs().max()
    assert dropped_change < 1e-5 and kept_change > 1e-3


def test_attention_mask_is_causal_and_self_visible():
    keep = torch.tensor([[False, True, False, True]])
    mask = attention_mask(keep, 0, 4)[0, 0]
    assert mask.tolist() == [[True, False, False, False], [False, True, False, False],
                             [False, True, False, False], [False, True, False, True]]  # fmt: skip
    step = attention_mask(torch.tensor([[False, True, False, True, True]]), 4, 1)[0, 0]
    assert step.tolist() == [[False, True, False, True, True]]


def test_output_vocabulary_restricts_the_softmax_to_the_training_tokens(tokenizer):
    captions = ["a red circle", "two blue squares on the left"]
    images, input_ids, labels = _batch(tokenizer, captions)
    vocab = caption_vocabulary(tokenizer, [clean_caption(c) for c in captions])
    assert vocab.tolist() == sorted(set(labels[labels != IGNORE_INDEX].tolist()) | {13, 50256})
    full = build_captioner(tiny_config()).eval()
    restricted = build_captioner(tiny_config(), output_ids=vocab).eval()
    restricted.load_state_dict({**full.state_dict(), "output_ids": vocab})
    prefix = full.encode(images)
    full_logits, logits = full.token_logits(prefix, input_ids), restricted.token_logits(prefix, input_ids)
    outside = torch.ones(GPT2_VOCAB_SIZE, dtype=torch.bool)
    outside[vocab] = False
    torch.testing.assert_close(logits[..., vocab], full_logits[..., vocab])
    assert (logits[..., outside] == -torch.inf).all()
    real = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[real], labels[real])
    xe = restricted(images, input_ids, labels)["xe"]
    assert xe.item() == pytest.approx(expected.item(), rel=1e-5) and xe.item() < full(images, input_ids, labels)["xe"]
    labels[0, 0] = 9999  # a token the training captions never used
    with pytest.raises(ValueError, match=r"\[9999\] are outside the model's output vocabulary"):
        restricted(images, input_ids, labels)


def test_padding_is_ignored_not_a_real_token(tokenizer):
    model = build_captioner(tiny_config(**{"model.use_sparse_mask": False})).eval()
    images, input_ids, labels = _batch(tokenizer, ["a red circle", "two blue squares on the left side"])
    both = model(images, input_ids, labels)["xe"].detach()
    short = labels[0] != IGNORE_INDEX
    alone = model(images[:1], input_ids[:1, : short.sum()], labels[:1, : short.sum()])["xe"]
    n0, n1 = short.sum(), (labels[1] != IGNORE_INDEX).sum()
    second = model(images[1:], input_ids[1:], labels[1:])["xe"]
    assert both.item() == pytest.approx(float(((alone * n0 + second * n1) / (n0 + n1)).detach()), rel=1e-5)


def test_overfitting_a_few_samples_drives_the_loss_down(tokenizer):
    torch.manual_seed(0)
    model = build_captioner(tiny_config())
    images, input_ids, labels = _batch(tokenizer, ["a red circle", "two blue squares", "three green stars"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(images, input_ids, labels, aux_weight=0.1)["xe"]
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.1 * losses[0]


def test_label_smoothing_gives_its_share_to_the_mean_over_the_vocabulary(tokenizer):
    """Smoothed cross-entropy by hand: (1 - eps) * NLL of the target + eps * mean NLL over all V tokens."""
    model = build_captioner(tiny_config()).eval()
    images, input_ids, labels = _batch(tokenizer, ["a red circle", "two blue squares on the left"])
    real = labels != IGNORE_INDEX
    # A model that favours the captions' tokens, so that the target's NLL and the vocabulary's mean differ
    model.gpt.lm_head.bias = torch.nn.Parameter(torch.zeros(GPT2_VOCAB_SIZE))
    model.gpt.lm_head.bias.data[labels[real]] = 10.0
    with torch.no_grad():
        xe = model(images, input_ids, labels, label_smoothing=0.2)["xe"]
        logprobs = torch.log_softmax(model.token_logits(model.encode(images), input_ids)[real], dim=-1)
        nll = -logprobs.gather(1, labels[real][:, None]).mean()
    expected = 0.8 * nll - 0.2 * logprobs.mean()
    assert xe.item() == pytest.approx(expected.item(), rel=1e-5) and expected > nll + 1.0


@pytest.mark.parametrize("text_tokens", [20, 5])
def test_npair_loss_is_the_references_text_to_image_loss(tokenizer, text_tokens):
    """Each caption's mean embedding over its first ``aux_text_tokens`` real tokens (the reference's 20) is
    classified among the batch's mean prefixes (the reference: anchor = text, positive = image; its mean also
    counted padding, ours not)."""
    captions = [
        "a very long caption with many words that goes on and on past twenty tokens for sure right now ok",
        "a dog.",
        "two cats on a bed.",
    ]
    model = build_captioner(tiny_config(**{"model.use_sparse_mask": False})).eval()
    with torch.no_grad():  # larger embeddings, so that the texts' and images' similarities differ clearly
        model.gpt.transformer.wte.weight.mul_(20)
        for param in model.mapper.parameters():
            param.mul_(3)
    images, input_ids, labels = _batch(tokenizer, captions)
    assert (labels[0] != IGNORE_INDEX).sum() > text_tokens and (labels[1] != IGNORE_INDEX).sum() < text_tokens
    with torch.no_grad():
        aux = model(images, input_ids, labels, aux_weight=1.0, aux_text_tokens=text_tokens)["aux"]
        image = model.encode(images).embeds.mean(1)
        wte = model.gpt.transformer.wte.weight
        real = [ids[lab != IGNORE_INDEX][:text_tokens] for ids, lab in zip(input_ids, labels, strict=True)]
        text = torch.stack([wte[ids].mean(0) for ids in real])
        logits = text @ image.t()  # rows: texts, columns: images
        ce = -torch.log_softmax(logits, dim=1).diagonal().mean()
        l2 = 0.02 * 0.25 * (text.pow(2).sum() / 3 + image.pow(2).sum() / 3)
    assert aux.item() == pytest.approx((ce + l2).item(), rel=1e-5)
    swapped = -torch.log_softmax(logits, dim=0).diagonal().mean() + l2
    assert aux.item() != pytest.approx(swapped.item(), rel=1e-3)
