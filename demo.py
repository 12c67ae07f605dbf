"""Built-in demo: generate the shapes data set if missing, train XE, fine-tune with SCST, and compare
test metrics with a constant-caption baseline and the human leave-one-out score.

    python demo.py [--output_dir runs/demo] [--data_dir datasets/demo] [--scst_baselines greedy,mean]
                   [--xe_config FILE ...] [--scst_config FILE ...] [--section.key VALUE ...]

The stages read configs/demo.yaml and configs/demo_scst.yaml, then the --xe_config / --scst_config files,
then the config options given here, which apply to both stages (the same options as train_scst.py; the
defaults shown are the code's, which the demo's YAML files change).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data.datasets import read_annotations
from data.synthetic import grounding_accuracy
from data.text import clean_caption, strip_stop
from engine.config import CONFIG_DIR, SCHEMA, Config, build_config
from metrics.coco_eval import CaptionScorer, load_ground_truth
from metrics.diversity import Diversity, caption_diversity
from metrics.java import java_missing
from metrics.tokenize import ptb_tokenize
from utils.cli import ArgumentParser, add_schema_options, schema_overrides
from utils.config import ConfigError
from utils.io import ImageId, write_json

if TYPE_CHECKING:
    from engine.runner import RunResult

ROOT = Path(__file__).resolve().parent
COLUMNS = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
FACTS = ("count", "colour", "shape", "position", "all")
DIVERSITY = {"distinct": "distinct_captions", "vocab": "vocabulary", "dist-1": "distinct_1", "dist-2": "distinct_2",
             "novel": "novel"}  # fmt: skip


def run_stage(files: list[str | Path], overrides: dict[str, Any], scorer: CaptionScorer) -> RunResult:
    from engine.runner import Run

    run = Run(build_config(files, overrides), scorer)
    try:
        return run.train()
    finally:
        run.close()


def baselines(cfg: Config, scorer: CaptionScorer) -> dict[str, tuple[dict, dict[ImageId, str]]]:
    """Constant caption (the most common training caption) and human leave-one-out (first reference
    scored against the others) on the test split."""
    gts = load_ground_truth(cfg.data.test_file)
    train = read_annotations(cfg.data.train_file, "train")
    constant = Counter(strip_stop(clean_caption(e["caption"])) for e in train).most_common(1)[0][0]
    constant_res = dict.fromkeys(gts, constant)
    loo_res = {i: refs[0] for i, refs in gts.items()}
    loo_gts = {i: refs[1:] for i, refs in gts.items()}
    return {
        f"constant: '{constant}'": (scorer.score(gts, constant_res, spice=False).metrics, constant_res),
        "human (leave-one-out)": (scorer.score(loo_gts, loo_res, spice=False).metrics, loo_res),
    }


def diversities(rows: dict[str, tuple[dict, dict[ImageId, str]]], train_file: str) -> dict[str, Diversity]:
    """Each row's caption diversity, novelty against the training captions (one PTB tokenizer run)."""
    training = [entry["caption"] for entry in read_annotations(train_file, "train")]
    groups: dict[Any, list[str]] = {name: list(captions.values()) for name, (_, captions) in rows.items()}
    tokens = ptb_tokenize({**groups, ("training",): training})
    known = set(tokens[("training",)])
    return {name: caption_diversity(tokens[name], known) for name in rows}


def format_table(
    rows: dict[str, tuple[dict, dict[ImageId, str]]], metadata: Path, diversity: dict[str, Diversity]
) -> str:
    header = (f"{'':<44}" + "".join(f"{c:>9}" for c in COLUMNS) + "".join(f"{d:>8}" for d in DIVERSITY)
              + "  | grounding " + " ".join(f"{f:>8}" for f in FACTS))  # fmt: skip
    lines = [header, "-" * len(header)]
    for name, (metrics, captions) in rows.items():
        grounding = grounding_accuracy(captions, metadata)
        cells = "".join(f"{metrics[c] * 100:9.1f}" for c in COLUMNS)
        figures = vars(diversity[name])
        cells += "".join(f"{figures[k]:8d}" if k == "vocabulary" else f"{figures[k] * 100:8.1f}"
                         for k in DIVERSITY.values())  # fmt: skip
        facts = " ".join(f"{grounding[f] * 100:8.1f}" for f in FACTS)
        lines.append(f"{name[:44]:<44}{cells}  | {'':9} {facts}")
    return "\n".join(lines)


def examples(rows: dict[str, tuple[dict, dict[ImageId, str]]], gts: dict[ImageId, list[str]], count: int) -> str:
    lines = []
    for image_id in list(gts)[:count]:
        lines.append(f"image {image_id}: reference '{gts[image_id][0]}'")
        lines += [f"    {name[:28]:<28} {captions[image_id]}" for name, (_, captions) in rows.items()
                  if not name.startswith(("constant", "human"))]  # fmt: skip
    return "\n".join(lines)


def write_curves(out: Path, runs: list[str]) -> Path | None:
    """``curves.png`` beside the summary: loss, SCST reward and validation CIDEr of the demo's runs."""
    try:
        from utils.plot import plot_runs

        return plot_runs([out / run for run in runs], out / "curves.png", "demo runs")
    except ImportError:
        logging.getLogger("demo").warning("matplotlib is not installed: no curves.png (pip install matplotlib)")
        return None


def build_parser() -> ArgumentParser:
    usage = "demo.py [--output_dir DIR] [--data_dir DIR] [--xe_config FILE] [--scst_config FILE] [--section.key V ...]"
    parser = ArgumentParser(prog="demo.py", description=__doc__, usage=usage)
    parser.add_argument("--output_dir", default=str(ROOT / "runs" / "demo"), help="the stages' run folders go here")
    parser.add_argument("--data_dir", default=None, help="demo data set folder (default: configs/demo.yaml's)")
    parser.add_argument("--scst_baselines", default="greedy,mean", help="SCST runs to make ('' for none)")
    parser.add_argument("--xe_config", action="append", default=[], metavar="FILE", help="YAML file, XE stage only")
    parser.add_argument("--scst_config", action="append", default=[], metavar="FILE", help="YAML file, SCST only")
    # The demo sets each stage's run folder, stage and starting checkpoint itself
    add_schema_options(parser, SCHEMA, exclude=("output_dir", "scst", "checkpoint", "resume"))
    return parser


def shared_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config options given on the command line, and the data set's files with ``--data_dir``."""
    common: dict[str, Any] = schema_overrides(args, SCHEMA)
    if args.data_dir:
        data = Path(args.data_dir).resolve()
        common.update({"data.image_root": str(data), "data.train_file": str(data / "train.json"),
                       "data.val_file": str(data / "val.json"), "data.test_file": str(data / "test.json")})  # fmt: skip
    return common


def summarise(
    out: Path, rows: dict[str, tuple[dict, dict[ImageId, str]]], gains: dict[str, float], cfg: Config, minutes: float
) -> None:
    """Write ``demo_summary.json`` and ``curves.png``, print the table of the test split and examples."""
    metadata = Path(cfg.data.image_root) / "metadata.json"
    gts = load_ground_truth(cfg.data.test_file)
    diversity = diversities(rows, cfg.data.train_file)
    summary = {name: {"metrics": m, "diversity": vars(diversity[name]), "grounding": grounding_accuracy(c, metadata)}
               for name, (m, c) in rows.items()}  # fmt: skip
    report = {"minutes": minutes, "rows": summary, "scst_cider_gain": gains}
    write_json(out / "demo_summary.json", report, indent=2)
    curves = write_curves(out, ["xe", *(f"scst_{b}" for b in gains)])
    print(f"\nDemo test split ({len(gts)} images), metrics x100; distinct = % of distinct captions, vocab = "
          "words used, dist-n = % distinct n-grams, novel = % not among the training captions; grounding = % of "
          "captions stating the truth")  # fmt: skip
    print(format_table(rows, metadata, diversity))
    if gains:
        print("SCST's test CIDEr relative to XE: " + ", ".join(f"{b} baseline {g:+.1%}" for b, g in gains.items()))
    print(f"\nExamples:\n{examples(rows, gts, 4)}")
    print(f"\nTotal time {minutes:.1f} min; details in {out}" + (f", training curves in {curves}" if curves else ""))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse(argv)
    if isinstance(args, int):
        return args
    missing_java = java_missing()
    if missing_java:
        print(f"demo.py: error: {missing_java}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    out = Path(args.output_dir).resolve()
    common = shared_overrides(args)
    xe_files = [CONFIG_DIR / "demo.yaml", *args.xe_config]
    scst_files = [CONFIG_DIR / "demo_scst.yaml", *args.scst_config]
    try:  # both stages' configs, before any work
        for files in (xe_files, scst_files):
            build_config(files, common)
    except ConfigError as err:
        print(f"demo.py: error: {err}", file=sys.stderr)
        return 2
    with CaptionScorer() as scorer:
        xe = run_stage(xe_files, {**common, "output_dir": str(out / "xe")}, scorer)
        rows = {"XE": (xe.test, xe.captions)}
        xe_cider = xe.test["CIDEr"]
        gains: dict[str, float] = {}  # SCST's relative change of the test CIDEr, per baseline
        for baseline in filter(None, args.scst_baselines.split(",")):
            overrides = {**common, "output_dir": str(out / f"scst_{baseline}"),
                         "checkpoint": str(out / "xe" / "best.pt"), "scst_opts.baseline": baseline}  # fmt: skip
            scst = run_stage(scst_files, overrides, scorer)
            rows[f"XE + SCST ({baseline} baseline)"] = (scst.test, scst.captions)
            gains[baseline] = scst.test["CIDEr"] / xe_cider - 1 if xe_cider else float("nan")
        cfg = build_config([CONFIG_DIR / "demo.yaml"], common)
        rows = {**baselines(cfg, scorer), **rows}
    summarise(out, rows, gains, cfg, (time.perf_counter() - started) / 60)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    raise SystemExit(main())
