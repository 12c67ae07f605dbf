"""Scores computed by pycocoevalcap alone, to check what the project reports against."""

from __future__ import annotations

import json
from pathlib import Path


def pycocoevalcap_cider(predictions: list[dict], data: Path) -> float:
    """Corpus CIDEr of COCO results against the split's references, computed by pycocoevalcap alone."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    entries = json.loads((data / "test.json").read_text())
    references = {str(int(Path(e["image"]).stem.rsplit("_", 1)[1])): e["caption"] for e in entries}
    gts = {str(p["image_id"]): [{"caption": c} for c in references[str(p["image_id"])]] for p in predictions}
    res = {str(p["image_id"]): [{"caption": p["caption"]}] for p in predictions}
    tokenizer = PTBTokenizer()
    return Cider().compute_score(tokenizer.tokenize(gts), tokenizer.tokenize(res))[0]
