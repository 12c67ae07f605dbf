"""Score a COCO results file against caption ground truth (BLEU, METEOR, ROUGE-L, CIDEr, SPICE) and
measure how diverse its captions are.

    python evaluate.py --results preds.json --annotations data/coco/test_gt.json

Prints a table (metrics x100), writes the metrics as JSON (default: next to the results,
``preds.metrics.json``) and optionally each image's CIDEr. Exit status 2 on unusable input or without Java.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from metrics.coco_eval import (
    CaptionScorer,
    EvalReport,
    evaluate_results,
    load_ground_truth,
    load_image_domains,
    load_image_entries,
    parse_caption_sets,
    parse_results,
)
from metrics.diversity import measure
from metrics.java import java_missing
from utils.cli import ArgumentParser, add_flag
from utils.io import DataFileError, ImageId, read_json, write_json

METRICS_HELP = """metrics (captions PTB-tokenised as pycocoevalcap does; docs/evaluation.md has the formulas):
  BLEU-1..4          n-gram precision x brevity penalty (Papineni et al., ACL 2002)
  METEOR             aligned unigram F-mean with a fragmentation penalty (Banerjee & Lavie, 2005)
  ROUGE-L            longest-common-subsequence F-measure (Lin, 2004)
  CIDEr              tf-idf weighted 1-4-gram cosine with the references, x10 (Vedantam et al., CVPR 2015)
  SPICE              F-score of scene-graph tuples (Anderson et al., ECCV 2016); needs CoreNLP jars
  CLIP-S             --clip: 2.5 x max(cos(image, "A photo depicts " + caption), 0) (Hessel et al., EMNLP 2021)
  RefCLIP-S          --clip: harmonic mean of CLIP-S and max(max over references of cos(caption, reference), 0)
  distinct captions  distinct captions / images
  vocabulary         distinct tokens over all captions
  novel captions     share of captions not among --train_captions' captions
  distinct-1, -2     distinct n-grams / all n-grams over all captions (Li et al., NAACL 2016)
  mBLEU-4            n-best lists: each caption's BLEU-4 against the other captions of its image, averaged
                     (Shetty et al., ICCV 2017); distinct-n per image: within each image's captions
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace | int:
    parser = ArgumentParser(description=__doc__, epilog=METRICS_HELP)
    parser.add_argument("--results", type=Path, required=True, help="COCO results JSON: [{image_id, caption}]")
    parser.add_argument(
        "--annotations",
        type=Path,
        required=True,
        help="ground truth: COCO caption file (e.g. test_gt.json) or Karpathy-style list (test.json)",
    )
    add_flag(parser, "--allow_partial", "score the images present in both files instead of failing on a mismatch")
    add_flag(parser, "--no_spice", "skip SPICE (slow; needs Stanford CoreNLP)")
    parser.add_argument(
        "--train_captions",
        type=Path,
        help="training captions (an annotation file as --annotations) for the share of novel captions",
    )
    parser.add_argument(
        "--clip",
        help="also CLIP-S and RefCLIP-S with this open_clip model: NAME/PRETRAINED (ViT-B-32/openai, the paper's; "
        "open_clip downloads it on first use) or NAME:FILE (local weights for architecture NAME)",
    )
    parser.add_argument("--image_root", type=Path, help="--clip: folder the annotation file's image paths are in")
    parser.add_argument("--clip_device", default="cpu", help="--clip: torch device of the CLIP model")
    parser.add_argument("--per_image", type=Path, help="also write each image's caption and CIDEr here")
    parser.add_argument("--output", type=Path, help="metrics JSON (default: <results>.metrics.json)")
    return parser.parse(argv)


def per_image_rows(report: EvalReport, results: dict[ImageId, str]) -> list[dict]:
    """Per-image CIDEr rows, worst first, for error analysis."""
    scores = report.per_image or {}
    rows = [{"image_id": image_id, "caption": results[image_id], "CIDEr": cider} for image_id, cider in scores.items()]
    return sorted(rows, key=lambda row: row["CIDEr"])


def add_diversity(
    report: EvalReport,
    results: dict[ImageId, str],
    sets: dict[ImageId, list[str]],
    gts: dict[ImageId, list[str]],
    train_captions: Path | None,
) -> None:
    """Measure the scored images' captions again with the training captions (novel share) and the n-best
    lists (mBLEU-4, distinct-n per image), all tokenised in one Java run."""
    scored = [image_id for image_id in gts if image_id in results]
    training = None
    if train_captions is not None:
        training = [caption for refs in load_ground_truth(train_captions).values() for caption in refs]
    report.diversity, report.set_diversity = measure(
        [results[i] for i in scored], {i: sets[i] for i in scored} if sets else None, training
    )


def add_clip_scores(
    report: EvalReport, results: dict[ImageId, str], gts: dict[ImageId, list[str]], args: argparse.Namespace
) -> None:
    """CLIP-S and RefCLIP-S of the scored images into ``report.metrics``; when the model or an image cannot
    be read, the reason goes to ``report.unavailable`` (one line on the terminal) and the rest stands."""
    # torch and open_clip load only when asked for: they take seconds to import
    from data.image_io import ImageLoadError, load_image
    from metrics.clip_score import ClipUnavailable, load_clip

    files = dict(load_image_entries(args.annotations))
    scored = [image_id for image_id in gts if image_id in results]
    try:
        missing = [image_id for image_id in scored if image_id not in files]
        if missing:
            raise ClipUnavailable(f"{args.annotations} names no image file for image id {missing[0]!r}")
        scorer = load_clip(args.clip, args.clip_device)
        images = (load_image(args.image_root / files[image_id]) for image_id in scored)
        scores = scorer.score(images, [results[i] for i in scored], [gts[i] for i in scored])
    except (ClipUnavailable, ImageLoadError) as err:
        for name in ("CLIP-S", "RefCLIP-S"):
            report.unavailable[name] = str(err)
        print(f"CLIP-S and RefCLIP-S unavailable: {err}", file=sys.stderr)
        return
    report.metrics.update({"CLIP-S": scores.clip_s, "RefCLIP-S": scores.ref_clip_s})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if isinstance(args, int):
        return args
    if args.clip and args.image_root is None:
        print("evaluate.py: error: --clip needs --image_root (the folder of the annotation file's images)",
              file=sys.stderr)  # fmt: skip
        return 2
    missing_java = java_missing()
    if missing_java:
        print(f"error: {missing_java}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        gts = load_ground_truth(args.annotations)
        domains = load_image_domains(args.annotations)
        items = read_json(args.results)
        results = parse_results(items, str(args.results))
        sets = parse_caption_sets(items, str(args.results))
        with CaptionScorer() as scorer:
            report = evaluate_results(
                results,
                gts,
                allow_partial=args.allow_partial,
                spice=not args.no_spice,
                per_image=args.per_image is not None,
                scorer=scorer,
                domains=domains,
            )
        if sets or args.train_captions:
            add_diversity(report, results, sets, gts, args.train_captions)
        if args.clip:
            add_clip_scores(report, results, gts, args)
    except DataFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.format_table())
    output = args.output or args.results.with_suffix(".metrics.json")
    write_json(output, {"results": str(args.results), "annotations": str(args.annotations), **report.to_dict()})
    print(f"metrics written to {output}")
    if args.per_image is not None:
        write_json(args.per_image, per_image_rows(report, results))
        print(f"per-image CIDEr written to {args.per_image}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
