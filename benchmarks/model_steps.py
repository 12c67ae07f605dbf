"""The model alone and one loader worker alone, for the rehearsal's comparison with its end-to-end rates."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.harness import SIZES
from data.datasets import CaptionCollator, CaptionTrainDataset
from data.transforms import build_transform
from engine.config import CONFIG_DIR, build_config
from engine.steps import ScstStep
from metrics.cider import CiderD
from metrics.cider_df import DocumentFrequency
from models.build import build_captioner
from models.tokenizer import load_tokenizer
from utils.precision import autocast, resolve_precision

REFERENCES = (
    "a man riding a wave on top of a surfboard",
    "a surfer rides a large wave in the ocean",
    "a person on a surfboard riding a wave",
    "a man surfing on a big blue wave",
    "surfer in a black wetsuit riding a wave",
)


def _seconds_per_call(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / repeats


def model_step_rates(device: torch.device, xe_batch: int, scst_batch: int, caption_len: int = 16) -> dict:
    """Images/s of an XE and an SCST training step (configs/xe.yaml and scst.yaml, paper size, random
    weights) on random images already on the device."""
    overrides = {"encoder.checkpoint": None, **SIZES["paper"]}
    xe_cfg = build_config([CONFIG_DIR / "xe.yaml"], overrides)
    scst_cfg = build_config([CONFIG_DIR / "scst.yaml"], overrides)
    precision = resolve_precision(xe_cfg.train.precision, device)
    torch.manual_seed(0)
    model = build_captioner(xe_cfg).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    res, repeats = model.encoder.image_res, 5 if device.type == "cuda" else 2

    def step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            with autocast(precision, device):
                loss = loss_fn()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return run

    images = torch.randn(xe_batch, 3, res, res, device=device)
    ids = torch.randint(0, 50256, (xe_batch, caption_len), device=device)
    aux = xe_cfg.train.aux_weight if xe_cfg.train.use_aux_loss else 0.0
    xe = _seconds_per_call(step(lambda: model(images, ids, ids.clone(), aux_weight=aux)["loss"]), device, repeats)
    references = [list(REFERENCES)] * scst_batch
    tokenizer = load_tokenizer("gpt2")
    scst_step = ScstStep(model, tokenizer, CiderD(DocumentFrequency.from_references(references)), references,
                         scst_cfg.scst_opts, device)  # fmt: skip
    batch = {"images": torch.randn(scst_batch, 3, res, res, device=device), "indices": list(range(scst_batch))}
    scst = _seconds_per_call(step(lambda: scst_step(batch)["loss"]), device, repeats)
    return {"xe": xe_batch / xe, "scst": scst_batch / scst}


def loader_rate(train_file: Path, image_root: Path, batch: int, batches: int = 4) -> float:
    """Images/s of one loader worker: training items (JPEG decode, training transform) and collation,
    in this process with one thread as a DataLoader worker has."""
    dataset = CaptionTrainDataset(train_file, image_root, build_transform(224, train=True))
    collate = CaptionCollator(load_tokenizer("gpt2"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
        started = time.perf_counter()
        for b in range(batches):
            collate([dataset[i] for i in order[b * batch : (b + 1) * batch]])
        return batches * batch / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
