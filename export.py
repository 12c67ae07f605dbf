"""Export a trained checkpoint as a folder in the Hugging Face Hub's conventions.

    python export.py --checkpoint runs/scst/best.pt --out exported/opg-coco [--license mit] [--repo_id me/opg-coco]
                     [--space [--space_model me/opg-coco] [--space_examples DIR]]

Writes ``config.json``, ``model.safetensors``, ``generation_config.json``, the tokenizer files and a
``README.md`` model card (the run's ``test_metrics.json`` beside the checkpoint supplies the test metrics).
``load_captioner`` and ``predict.py --checkpoint`` read the folder; ``huggingface-cli upload`` publishes it.
With --space the folder is a Hugging Face Space instead: the captioning page's ``app.py``, ``requirements.txt``,
a README with the Space's header, the project's inference code, and the model in ``model/`` (or, with
--space_model, the Hub id it loads). Exit status 2 on unusable input.
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
    add_flag(parser, "--space", "write a Hugging Face Space (the web page over the model) instead")
    parser.add_argument("--space_model", help="with --space: load this published Hub id instead of copying the model")
    parser.add_argument("--space_examples", type=Path, help="with --space: example photos (.jpg/.png) for the page")
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
    if (args.space_model or args.space_examples) and not args.space:
        raise ValueError("--space_model and --space_examples only go with --space")
    name = args.name or out.resolve().name
    model, cfg = load_model(args.checkpoint)  # checked before anything is written, also for --space_model
    if args.space:
        from webapp.space import MODEL_DIR, write_space

        write_space(out, name, args.license, args.space_model, args.space_examples)
        if args.space_model:
            return out
        out = out / MODEL_DIR
    report = read_test_report(args.metrics or args.checkpoint.parent / "test_metrics.json")
    save_folder(model, cfg, load_tokenizer(cfg.model.tokenizer), out)
    card = model_card(cfg.training, folder_config(model, cfg), report, name, args.license, args.repo_id or str(out))
    write_text(out / "README.md", card)
    return args.out


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
