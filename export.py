"""Export a trained checkpoint as a folder in the Hugging Face Hub's conventions.

    python export.py --checkpoint runs/scst/best.pt --out exported/opg-coco [--license mit] [--repo_id me/opg-coco]

Writes ``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer files and a
``README.md`` model card (the run's ``test_metrics.json`` beside the checkpoint supplies the test metrics).
``load_captioner`` and ``predict.py --checkpoint`` read the folder; ``huggingface-cli upload`` publishes it.
Exit status 2 on unusable input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from models.model_card import model_card
from models.pretrained import folder_config, load_model, save_folder
from models.tokenizer import load_tokenizer
from utils.checkpoint import CheckpointError
from utils.cli import ArgumentParser, add_flag
from utils.io import write_text


def parse_args(argv: list[str] | None) -> argparse.Namespace | int:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint written by training (.pt)")
    parser.add_argument("--out", type=Path, required=True, help="folder to write (new or empty unless --overwrite)")
    parser.add_argument("--metrics", type=Path, help="test metrics JSON (default: test_metrics.json beside it)")
    parser.add_argument("--license", default="other", help="license field of the model card (e.g. mit)")
    parser.add_argument("--repo_id", help="Hub repository the folder will be published as (for the card)")
    parser.add_argument("--name", help="model name in the card (default: the --out folder's name)")
    add_flag(parser, "--overwrite", "write into a non-empty --out folder")
    return parser.parse(argv)


def read_test_report(path: Path) -> dict | None:
    """The run's test metrics, or None (with a warning) when there are none."""
    if not path.is_file():
        logging.getLogger("export").warning("no test metrics at %s: the model card will say so", path)
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err


def export(args: argparse.Namespace) -> Path:
    out = args.out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CheckpointError(f"{out} is not empty: choose another --out or pass --overwrite")
    if args.checkpoint.is_dir():
        raise CheckpointError(f"{args.checkpoint} is a folder: export takes a training checkpoint (.pt)")
    model, cfg = load_model(args.checkpoint)
    report = read_test_report(args.metrics or args.checkpoint.parent / "test_metrics.json")
    save_folder(model, cfg, load_tokenizer(cfg.model.tokenizer), out)
    card = model_card(
        cfg.training, folder_config(model, cfg), report, args.name or out.resolve().name, args.license,
        args.repo_id or str(out),
    )  # fmt: skip
    write_text(out / "README.md", card)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if isinstance(args, int):
        return args
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        out = export(args)
    except (CheckpointError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} to {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
