"""CLIPScore and RefCLIPScore (Hessel et al., EMNLP 2021) with an ``open_clip`` model.

For an image v, its caption c and its references R (captions prefixed with "A photo depicts ", as the
paper does for both):

- CLIP-S(c, v) = w * max(cos(E_image(v), E_text(c)), 0), w = 2.5;
- RefCLIP-S(c, R, v) = harmonic mean of CLIP-S(c, v) and max(max over r in R of cos(E_text(c), E_text(r)), 0)
  (the text term is not scaled by w; 0 when both terms are 0).

Both are averaged over images. The paper uses CLIP ViT-B/32 (``ViT-B-32/openai``). ``open_clip`` is an optional
dependency (``pip install open_clip_torch``), imported only by :func:`load_clip`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

W = 2.5
PROMPT = "A photo depicts "
INSTALL = "pip install open_clip_torch"


class ClipUnavailable(RuntimeError):
    """The CLIP model cannot be built here (open_clip missing, unknown name, weights not on this machine)."""


@dataclass
class ClipScores:
    """Mean scores (fractions: 0.76 is 76 in tables) and each image's, in the order scored."""

    clip_s: float
    per_image: list[float]
    ref_clip_s: float | None = None
    ref_per_image: list[float] | None = None


def _batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class ClipScorer:
    """CLIP-S and RefCLIP-S with ``model`` (anything with open_clip's ``encode_image`` (B, 3, H, W) -> (B, D)
    and ``encode_text`` (B, L) -> (B, D)), its image ``preprocess`` (PIL image -> (3, H, W)) and
    ``tokenizer`` (list of texts -> (B, L) token ids)."""

    def __init__(
        self, model: Any, preprocess: Callable, tokenizer: Callable, device: str = "cpu", batch_size: int = 64
    ) -> None:
        self.model = model.to(device).eval() if hasattr(model, "to") else model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size

    @torch.no_grad()
    def image_embeddings(self, images: Iterable[Any]) -> torch.Tensor:
        """Unit-length embeddings (N, D) of PIL images, read lazily batch by batch."""
        parts = []
        for batch in _batches(images, self.batch_size):
            pixels = torch.stack([self.preprocess(image) for image in batch]).to(self.device)
            parts.append(F.normalize(self.model.encode_image(pixels).float(), dim=-1).cpu())
        return torch.cat(parts)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length embeddings (N, D) of "A photo depicts " + each text."""
        parts = []
        for batch in _batches(texts, self.batch_size):
            tokens = self.tokenizer([PROMPT + text for text in batch]).to(self.device)
            parts.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(parts)

    def score(
        self, images: Iterable[Any], captions: Sequence[str], references: Sequence[Sequence[str]] | None = None
    ) -> ClipScores:
        """CLIP-S of each image (PIL, in the order of ``captions``) and its caption; RefCLIP-S too when each
        image's ``references`` are given."""
        image_emb = self.image_embeddings(images)
        if len(image_emb) != len(captions):
            raise ValueError(f"{len(image_emb)} images for {len(captions)} captions")
        caption_emb = self.text_embeddings(captions)
        clip_s = W * (image_emb * caption_emb).sum(-1).clamp(min=0)  # (N,)
        scores = ClipScores(float(clip_s.mean()), clip_s.tolist())
        if references is None:
            return scores
        flat = [ref for refs in references for ref in refs]
        owner = torch.tensor([i for i, refs in enumerate(references) for _ in refs])
        cos = (self.text_embeddings(flat) * caption_emb[owner]).sum(-1)  # (total refs,)
        best = torch.full((len(captions),), -1.0).scatter_reduce(0, owner, cos, "amax").clamp(min=0)  # (N,)
        total = clip_s + best
        ref_clip_s = torch.where(total > 0, 2 * clip_s * best / total.clamp(min=1e-12), torch.zeros_like(total))
        scores.ref_clip_s, scores.ref_per_image = float(ref_clip_s.mean()), ref_clip_s.tolist()
        return scores


def parse_clip_spec(spec: str) -> tuple[str, str]:
    """``NAME/PRETRAINED`` (an open_clip tag: ``ViT-B-32/openai``) or ``NAME:FILE`` (local weights for the
    architecture NAME) -> ``(name, tag or file)``; ``hf-hub:ORG/REPO`` is passed on whole, with no tag."""
    if spec.startswith("hf-hub:"):
        return spec, ""
    name, colon, weights = spec.partition(":")
    if not colon:
        name, slash, weights = spec.partition("/")
        if not slash:
            raise ClipUnavailable(f"--clip {spec!r}: give NAME/PRETRAINED (e.g. ViT-B-32/openai) or NAME:FILE")
    if not name or not weights:
        raise ClipUnavailable(f"--clip {spec!r}: give NAME/PRETRAINED (e.g. ViT-B-32/openai) or NAME:FILE")
    return name, weights


def load_clip(spec: str, device: str = "cpu", batch_size: int = 64) -> ClipScorer:
    """A :class:`ClipScorer` with the open_clip model of ``spec`` (:func:`parse_clip_spec`). Raises
    :class:`ClipUnavailable` with one line saying what is missing and where open_clip looks for it."""
    try:
        import open_clip
    except ImportError as err:
        raise ClipUnavailable(f"CLIPScore needs the open_clip package: {INSTALL}") from err
    name, weights = parse_clip_spec(spec)
    local = ":" in spec and not spec.startswith("hf-hub:")
    if local and not Path(weights).expanduser().is_file():
        raise ClipUnavailable(f"--clip {spec}: no weights file {weights}")
    if not local and not spec.startswith("hf-hub:"):
        _check_known(open_clip, name, weights)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=os.path.expanduser(weights) if local else (weights or None), device=device
        )
    except Exception as err:  # a download failed, or a file that does not fit the architecture
        raise ClipUnavailable(_unavailable(open_clip, spec, name, weights, local, err)) from err
    return ClipScorer(model, preprocess, open_clip.get_tokenizer(name), device, batch_size)


def _check_known(open_clip: Any, name: str, tag: str) -> None:
    if name not in open_clip.list_models():
        raise ClipUnavailable(f"--clip {name}/{tag}: open_clip has no model {name!r} (open_clip.list_models())")
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise ClipUnavailable(f"--clip {name}/{tag}: no pretrained tag {tag!r} for {name}; open_clip has {tags}")


def _unavailable(open_clip: Any, spec: str, name: str, weights: str, local: bool, err: Exception) -> str:
    """One line: which file is missing and where open_clip looks for it (or why a local file failed)."""
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    if local:
        return f"--clip {spec}: {weights} does not load into open_clip's {name} ({reason})"
    cfg = open_clip.get_pretrained_cfg(name, weights) if weights else {}
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        from huggingface_hub import constants

        where = (f"{filename or 'open_clip_model.safetensors or open_clip_pytorch_model.bin'} of the Hugging Face "
                 f"repository {repo}, in {constants.HF_HUB_CACHE} (HF_HUB_CACHE)")  # fmt: skip
    elif cfg.get("url"):
        where = f"{os.path.basename(cfg['url'])} in {os.path.expanduser('~/.cache/clip')}"
    else:
        where = f"{spec} on the Hugging Face Hub"
    return (
        f"CLIP weights {spec} are not on this machine and could not be downloaded: open_clip looks for {where}; "
        f"download them once where there is network access, or give --clip {name}:FILE ({reason})"
    )
