"""Time ``evaluate.py`` against calling pycocoevalcap's scorers directly, on the same 5,000 captions.

Predictions: the paper's model's captions of the COCO Karpathy test split
(``shared/opg_karpathy_test_predictions.json``). Their ground truth is not available offline, so the
references are other real captions: each image gets the captions of five other images of the file, drawn
by a seeded shuffle (the scores are therefore low; only the time and the agreement of the two paths
matter). Both paths see the same files:

- direct: ``PTBTokenizer().tokenize`` of references and predictions, then ``Bleu(4)``, ``Meteor()``
  (Java start included), ``Rouge()`` and ``Cider()`` one after the other, as ``COCOEvalCap.evaluate``
  does without SPICE;
- ``evaluate.py --no_spice`` called in this process (reading the files, the coverage check and writing
  the metrics included).

The two are run ``--repeats`` times, alternating, and the best time of each is printed with the largest
difference between their metrics.

    python benchmarks/bench_evaluate.py [--repeats 2] [--images 5000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import evaluate  # noqa: E402

SHARED = Path(os.environ.get("OPG_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))


def write_inputs(folder: Path, images: int, seed: int = 0) -> tuple[Path, Path]:
    """Results file (the real predictions) and a COCO caption file whose five references per image are
    the captions of five other images."""
    predictions = json.loads((SHARED / "opg_karpathy_test_predictions.json").read_text())[:images]
    captions = [p["caption"] for p in predictions]
    rng = random.Random(seed)
    annotations = []
    for index, prediction in enumerate(predictions):
        others = rng.sample(range(len(captions) - 1), 5)  # indices into the captions without this one
        for k in others:
            caption = captions[k + (k >= index)]
            annotations.append({"image_id": prediction["image_id"], "id": len(annotations), "caption": caption})
    gt = {"images": [{"id": p["image_id"]} for p in predictions], "annotations": annotations}
    results, gt_file = folder / "results.json", folder / "gt.json"
    results.write_text(json.dumps([{"image_id": p["image_id"], "caption": p["caption"]} for p in predictions]))
    gt_file.write_text(json.dumps(gt))
    return results, gt_file


def direct(results: Path, gt_file: Path) -> dict[str, float]:
    """pycocoevalcap's scorers called one after the other on PTB-tokenised captions."""
    gt = json.loads(gt_file.read_text())
    gts: dict[int, list[dict]] = {}
    for ann in gt["annotations"]:
        gts.setdefault(ann["image_id"], []).append({"caption": ann["caption"]})
    res = {r["image_id"]: [{"caption": r["caption"]}] for r in json.loads(results.read_text())}
    tokenizer = PTBTokenizer()
    gts_tok, res_tok = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
    metrics = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}
    meteor = Meteor()
    metrics["METEOR"] = meteor.compute_score(gts_tok, res_tok)[0]
    del meteor
    metrics["ROUGE-L"] = Rouge().compute_score(gts_tok, res_tok)[0]
    metrics["CIDEr"] = Cider().compute_score(gts_tok, res_tok)[0]
    return metrics


def through_evaluate(results: Path, gt_file: Path, folder: Path) -> dict[str, float]:
    out = folder / "metrics.json"
    with contextlib.redirect_stdout(io.StringIO()):
        status = evaluate.main(["--results", str(results), "--annotations", str(gt_file), "--no_spice",
                                "--output", str(out)])  # fmt: skip
    if status != 0:
        raise RuntimeError(f"evaluate.py exited with {status}")
    return json.loads(out.read_text())["metrics"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {"pycocoevalcap scorers, directly": [], "evaluate.py --no_spice": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        results, gt_file = write_inputs(folder, args.images)
        for _ in range(args.repeats):
            for name, fn in zip(times, (lambda: direct(results, gt_file),
                                        lambda: through_evaluate(results, gt_file, folder)), strict=True):  # fmt: skip
                started = time.perf_counter()
                metrics = fn()
                times[name].append(time.perf_counter() - started)
                if name.startswith("pycoco"):
                    reference = metrics
                else:
                    gap = max(abs(metrics[k] - v) for k, v in reference.items())
    print(f"{args.images} images x 5 references (captions of other images), best of {args.repeats}:")
    for name, seconds in times.items():
        print(f"  {name:<34} {min(seconds):6.1f} s   (all: {', '.join(f'{s:.1f}' for s in seconds)})")
    print(f"  largest metric difference: {gap:.2e}; CIDEr {reference['CIDEr']:.4f}, METEOR {reference['METEOR']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
