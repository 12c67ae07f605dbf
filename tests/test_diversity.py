"""Diversity figures recomputed by hand on small caption files: distinct captions, vocabulary, novelty,
distinct-n, and mBLEU-4 / distinct-n within n-best lists, through evaluate.py and its metrics JSON."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

import evaluate
from metrics.coco_eval import CaptionScorer
from metrics.diversity import caption_diversity, distinct_n, set_diversity

# Image 4's caption PTB-tokenises to image 1's ("a red circle"): lowercased, the period dropped.
RESULTS = {1: "a red circle", 2: "a red circle", 3: "two blue squares on the left", 4: "A red circle."}
TRAINING = ["A red circle.", "three green stars"]
# n-best lists: image 1's two captions share 5 of 6 words; image 2 holds two equal captions and one apart
SETS = {
    1: ["a red circle on the left", "a red circle on the right"],
    2: ["two blue squares on the left", "two blue squares on the left", "one green star at the top"],
}
# Each caption's BLEU-4 against the other captions of its image (equal lengths: no brevity penalty):
# image 1, either caption: p1..p4 = 5/6, 4/5, 3/4, 2/3; image 2: 1 for the two equal captions, about 0 for
# the third (no bigram in common)
MBLEU_4 = (2 * (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25 + 2 * 1.0 + 0.0) / 5
DISTINCT_1_SETS = (7 / 12 + 11 / 18) / 2  # image 1: 7 distinct of 12 words; image 2: 11 of 18
DISTINCT_2_SETS = (6 / 10 + 10 / 15) / 2  # bigrams: 6 of 10; 10 of 15


def test_distinct_n_counts_ngrams_within_captions_only():
    captions = ["a b a b", "b a"]  # bigrams: ab ba ab | ba -> 2 distinct of 4; none spans the two captions
    assert distinct_n(captions, 1) == 2 / 6
    assert distinct_n(captions, 2) == 2 / 4
    assert distinct_n(captions, 3) == 2 / 2
    assert distinct_n(["a"], 2) == 0.0


def test_caption_diversity_by_hand():
    tokenized = ["a red circle", "a red circle", "two blue squares on the left", "a red circle"]
    diversity = caption_diversity(tokenized, training={"a red circle", "three green stars"})
    assert (diversity.images, diversity.distinct, diversity.distinct_captions) == (4, 2, 0.5)
    assert diversity.vocabulary == 9  # a red circle two blue squares on the left
    assert diversity.distinct_1 == 9 / 15 and diversity.distinct_2 == 7 / 11
    assert (diversity.most_repeated, diversity.most_repeated_count) == ("a red circle", 3)
    assert diversity.novel == 1 / 4
    assert caption_diversity(tokenized).novel is None


def test_set_diversity_by_hand():
    diversity = set_diversity(SETS)
    assert (diversity.images, diversity.captions) == (2, 5)
    assert diversity.mbleu_4 == pytest.approx(MBLEU_4, abs=1e-8)  # pycocoevalcap adds 1e-15 / 1e-9 terms
    assert diversity.distinct_1 == pytest.approx(DISTINCT_1_SETS, rel=1e-12)
    assert diversity.distinct_2 == pytest.approx(DISTINCT_2_SETS, rel=1e-12)
    with pytest.raises(ValueError, match="fewer than 2 captions"):
        set_diversity({1: ["a red circle"]})


@pytest.fixture(scope="module")
def shared_scorer():
    with CaptionScorer() as scorer:
        yield scorer


@pytest.fixture
def one_meteor(monkeypatch, shared_scorer):
    """evaluate.py reuses one METEOR Java process (seconds to start) instead of starting one per call."""
    monkeypatch.setattr(evaluate, "CaptionScorer", lambda: contextlib.nullcontext(shared_scorer))


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def _ground_truth(image_ids) -> dict:
    images = [{"id": i, "file_name": f"{i}.png"} for i in image_ids]
    refs = ["a red circle on a gray background", "a circle"]
    annotations = [{"image_id": i, "id": 10 * i + n, "caption": c} for i in image_ids for n, c in enumerate(refs)]
    return {"images": images, "annotations": annotations}


def test_evaluate_reports_diversity_in_table_and_json(tmp_path, capsys, one_meteor):
    gt = _write(tmp_path / "gt.json", _ground_truth([1, 2, 3, 4]))
    results = _write(tmp_path / "preds.json", [{"image_id": i, "caption": c} for i, c in RESULTS.items()])
    train = _write(tmp_path / "train.json", [{"image": f"t{n}.png", "caption": c} for n, c in enumerate(TRAINING)])
    args = ["--results", str(results), "--annotations", str(gt), "--no_spice"]
    assert evaluate.main([*args, "--train_captions", str(train)]) == 0
    table = capsys.readouterr().out
    assert "distinct captions        50.00%  (2 of 4)" in table
    assert "vocabulary                   9   words" in table
    assert "novel captions           25.00%" in table and "most repeated                3x  'a red circle'" in table
    figures = json.loads((tmp_path / "preds.metrics.json").read_text())["diversity"]
    assert figures == {
        "images": 4, "distinct": 2, "distinct_captions": 0.5, "vocabulary": 9, "distinct_1": 9 / 15,
        "distinct_2": 7 / 11, "most_repeated": "a red circle", "most_repeated_count": 3, "novel": 0.25,
    }  # fmt: skip


def test_evaluate_measures_n_best_lists(tmp_path, capsys, one_meteor):
    gt = _write(tmp_path / "gt.json", _ground_truth(SETS))
    rows = [  # as predict.py --num_captions K writes them
        {"image_id": i, "caption": captions[0], "file_name": f"{i}.png",
         "captions": [{"caption": c, "score": -float(n)} for n, c in enumerate(captions)]}
        for i, captions in SETS.items()
    ]  # fmt: skip
    results = _write(tmp_path / "nbest.json", rows)
    assert evaluate.main(["--results", str(results), "--annotations", str(gt), "--no_spice"]) == 0
    assert "mBLEU-4" in capsys.readouterr().out
    report = json.loads((tmp_path / "nbest.metrics.json").read_text())
    assert report["set_diversity"]["mbleu_4"] == pytest.approx(MBLEU_4, abs=1e-8)
    assert report["set_diversity"]["distinct_1"] == pytest.approx(DISTINCT_1_SETS, rel=1e-12)
    assert report["set_diversity"]["distinct_2"] == pytest.approx(DISTINCT_2_SETS, rel=1e-12)
    assert report["diversity"]["distinct"] == 2 and report["diversity"]["novel"] is None
    rows[1].pop("captions")
    _write(results, rows)
    assert evaluate.main(["--results", str(results), "--annotations", str(gt), "--no_spice"]) == 2
    assert "1 of 2 entries have no 'captions' list" in capsys.readouterr().err
