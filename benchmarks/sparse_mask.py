"""Measure the sparse prefix mask on the demo data: how many prefix positions each mode drops, and the
test metrics of XE with no mask, the reference's ``hard`` mask and the learning ``ste`` mask.

Each run is the demo's XE stage (``configs/demo.yaml``) with one encoder and one mask setting:
``swin_demo`` gives the demo's 17 prefix positions (4 x 4 grid + mean), ``swin_tiny_test`` at 224 px the
paper's 50 (7 x 7 grid + mean). The dropped fraction is measured on the test split with the best
checkpoint. On 2 CPU cores a ``swin_demo`` run takes 3 to 4 minutes, a ``swin_tiny_test`` one 6 to 13.
With ``--scst`` every masked XE run is followed by the demo's SCST stage (``configs/demo_scst.yaml``) from
its best checkpoint twice: without the mask (the reference's SCST stage) and with it
(``model.apply_sparse_mask true``).

    python benchmarks/sparse_mask.py [--encoders swin_demo,swin_tiny_test] [--masks none,hard,ste] [--scst]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from data.datasets import CaptionImageDataset  # noqa: E402
from data.synthetic import grounding_accuracy  # noqa: E402
from data.transforms import build_transform  # noqa: E402
from engine.config import CONFIG_DIR, build_config  # noqa: E402
from engine.runner import Run  # noqa: E402
from metrics.coco_eval import CaptionScorer  # noqa: E402
from models.captioner import OPGCaptioner  # noqa: E402


@torch.no_grad()
def dropped_positions(model: OPGCaptioner, dataset: CaptionImageDataset) -> tuple[float, float]:
    """(mean fraction of prefix positions dropped, fraction of images with at least one dropped)."""
    model.eval()
    keep = []
    for start in range(0, len(dataset), 100):
        images = torch.stack([dataset[i][0] for i in range(start, min(start + 100, len(dataset)))])
        keep.append(model.encode(images).keep)
    kept = torch.cat(keep)
    return float((~kept).float().mean()), float((~kept).any(dim=1).float().mean())


def stage_overrides(encoder: str, mask: str) -> dict:
    """The options of one encoder and mask setting, the same in both stages (SCST loads the XE weights)."""
    overrides = {
        "encoder.vision_config": encoder,
        "model.use_sparse_mask": mask != "none",
        "model.sparse_mask_mode": "hard" if mask == "none" else mask,
    }
    if encoder != "swin_demo":  # GPT-2 must hold the prefix and the caption: 50 + 30 positions
        demo = build_config([CONFIG_DIR / "demo.yaml"])
        overrides["model.gpt2_config"] = {**demo.model.gpt2_config, "n_positions": 96}
    return overrides


def measure(config: str, overrides: dict, scorer: CaptionScorer) -> dict:
    """Train one stage and measure its best checkpoint on the test split."""
    cfg = build_config([CONFIG_DIR / config], overrides)
    run = Run(cfg, scorer)
    started = time.perf_counter()
    try:
        result = run.train()
        test = CaptionImageDataset(
            cfg.data.test_file, cfg.data.image_root, build_transform(run.model.encoder.image_res), "test"
        )
        dropped, images = dropped_positions(run.model, test) if run.model.masks_prefix else (0.0, 0.0)
    finally:
        run.close()
    metadata = Path(cfg.data.image_root) / "metadata.json"
    return {
        "encoder": cfg.encoder.vision_config,
        "positions": run.model.prefix_length,
        "dropped": dropped,
        "images_with_drops": images,
        "CIDEr": result.test["CIDEr"],
        "grounding": grounding_accuracy(result.captions, metadata),
        "minutes": (time.perf_counter() - started) / 60,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default="swin_demo,swin_tiny_test")
    parser.add_argument("--masks", default="none,hard,ste")
    parser.add_argument("--scst", action="store_true", help="SCST without and with the mask after masked XE runs")
    parser.add_argument("--output_dir", default=str(REPO_ROOT / "runs" / "sparse_mask"))
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    rows = []

    def record(row: dict, **labels: str) -> None:
        rows.append({**labels, **row})
        (out / "sparse_mask.json").write_text(json.dumps(rows, indent=2))

    with CaptionScorer() as scorer:
        for encoder in args.encoders.split(","):
            for mask in args.masks.split(","):
                overrides = stage_overrides(encoder, mask)
                xe_dir = out / f"{encoder}_{mask}"
                record(measure("demo.yaml", {**overrides, "output_dir": str(xe_dir)}, scorer), mask=mask, stage="XE")
                if not args.scst or mask == "none":
                    continue
                for applied in (False, True):
                    name = f"{encoder}_{mask}_scst_{'mask' if applied else 'nomask'}"
                    scst = {**overrides, "model.apply_sparse_mask": applied, "checkpoint": str(xe_dir / "best.pt"),
                            "output_dir": str(out / name)}  # fmt: skip
                    stage = f"XE + SCST {'with' if applied else 'without'} the mask"
                    record(measure("demo_scst.yaml", scst, scorer), mask=mask, stage=stage)
    print("| encoder | positions | mask | stage | dropped | images with drops | CIDEr | count | shape | position |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        scores = (r["CIDEr"], *(r["grounding"][key] for key in ("count", "shape", "position")))
        cells = [r["encoder"], r["positions"], r["mask"], r["stage"], f"{r['dropped']:.1%}",
                 f"{r['images_with_drops']:.1%}", *(f"{100 * v:.1f}" for v in scores)]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(main())
