"""COCO caption metrics: agreement with pycocoevalcap, input checks, coverage, SPICE fallback, evaluate.py."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

import evaluate
from metrics.coco_eval import (
    CORENLP_JARS,
    CaptionDataError,
    CaptionScorer,
    CoverageError,
    check_coverage,
    evaluate_results,
    load_ground_truth,
    load_image_domains,
    load_results,
    spice_unavailable_reason,
)
from utils.io import DataFileError, image_id_from_path

GTS = {
    42: [
        "A man riding a brown horse on the beach.",
        "A person rides a horse along the shore.",
        "Someone on horseback near the ocean.",
    ],
    7: ["Two dogs play with a frisbee in the park.", "Dogs chasing a red frisbee on the grass."],
    391895: ["A plate of food with broccoli and rice.", "Dinner plate with vegetables, rice and meat."],
    13: ["A red double decker bus on a city street.", "A bus driving down a busy road."],
    5: ["A cat sleeping on a laptop keyboard.", "A grey cat lying on an open laptop."],
}
RES = {
    42: "a man rides a horse on the beach",
    7: "two dogs playing with a frisbee in a park",
    391895: "a plate of rice and broccoli",
    13: "a red bus driving down a street",
    5: "a cat laying on a laptop",
}


@pytest.fixture(scope="module")
def scorer():
    with CaptionScorer() as shared:
        yield shared


@pytest.fixture(scope="module")
def reference_metrics() -> dict[str, float]:
    """The same input scored by pycocoevalcap's own tokenizer and scorers, as COCOEvalCap does."""
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in GTS.items()})
    res = tokenizer.tokenize({k: [{"caption": c}] for k, c in RES.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    metrics = {f"BLEU-{n + 1}": value for n, value in enumerate(bleu)}
    metrics["METEOR"] = meteor.compute_score(gts, res)[0]
    metrics["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    cider, per_image = Cider().compute_score(gts, res)
    metrics["CIDEr"] = cider
    metrics["per_image"] = dict(zip(gts, per_image, strict=True))
    return metrics


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def coco_ground_truth(gts: dict, domains: dict | None = None) -> dict:
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in gts]
    for image in images:
        if domains:
            image["domain"] = domains[image["id"]]
    annotations = [
        {"image_id": i, "id": n, "caption": c}
        for n, (i, c) in enumerate(((i, c) for i, refs in gts.items() for c in refs), 1)
    ]
    return {"images": images, "annotations": annotations}


def test_metrics_equal_pycocoevalcap(scorer, reference_metrics):
    report = scorer.score(GTS, RES, per_image=True, spice=False)
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert report.metrics[name] == pytest.approx(reference_metrics[name], rel=1e-9), name
    expected_per_image = {i: reference_metrics["per_image"][i] for i in GTS}
    assert report.per_image == pytest.approx(expected_per_image, rel=1e-9)
    assert 0.5 < report.metrics["CIDEr"] < 3.0  # fraction, as pycocoevalcap reports it
    assert report.unavailable["SPICE"].startswith("skipped")


def test_line_breaks_inside_captions_do_not_shift_images(scorer):
    broken = {**RES, 42: "a man rides a horse\ron the beach", 7: "two dogs playing\nwith a frisbee in a park"}
    assert scorer.score(GTS, broken, spice=False).metrics == scorer.score(GTS, RES, spice=False).metrics


def test_meteor_can_be_skipped_without_changing_the_other_metrics(scorer):
    full = scorer.score(GTS, RES, spice=False)
    fast = evaluate_results(RES, GTS, spice=False, scorer=scorer, meteor=False)
    assert "METEOR" not in fast.metrics and fast.unavailable["METEOR"].startswith("skipped")
    assert fast.metrics == {name: value for name, value in full.metrics.items() if name != "METEOR"}


def test_spice_reported_unavailable_when_jars_missing(scorer, tmp_path, monkeypatch):
    monkeypatch.setattr(scorer, "spice_lib_dir", tmp_path)  # an empty folder: no CoreNLP jars
    report = scorer.score(GTS, RES)
    assert "SPICE" not in report.metrics
    assert str(tmp_path) in report.unavailable["SPICE"]
    assert "stanford-corenlp-3.6.0.jar" in report.unavailable["SPICE"]
    assert report.metrics["CIDEr"] > 0
    table = report.format_table()
    assert "SPICE" in table and "n/a" in table and "unavailable" in table


def test_spice_jar_check(tmp_path):
    assert "stanford-corenlp-3.6.0-models.jar" in spice_unavailable_reason(tmp_path)
    for name in CORENLP_JARS:
        (tmp_path / name).write_bytes(b"jar")
    assert spice_unavailable_reason(tmp_path) is None


def test_per_domain_metrics_match_scoring_each_domain_alone(scorer):
    domains = {42: "in-domain", 7: "out-domain", 391895: "in-domain", 13: "near-domain", 5: "out-domain"}
    report = scorer.score(GTS, RES, spice=False, domains=domains)
    assert list(report.per_domain) == ["in-domain", "near-domain", "out-domain"]
    out_ids = [7, 5]
    alone = scorer.score({i: GTS[i] for i in out_ids}, {i: RES[i] for i in out_ids}, spice=False)
    assert report.per_domain["out-domain"] == pytest.approx(alone.metrics)
    assert "out-domain" in report.format_table()


def test_coverage_errors_name_the_images():
    results = {i: c for i, c in RES.items() if i != 391895}
    results[999] = "an extra caption"
    with pytest.raises(CoverageError, match=r"1 ground-truth images without prediction: 391895.*1 predictions .* 999"):
        check_coverage(results, GTS)
    coverage = check_coverage(results, GTS, allow_partial=True)
    assert (coverage.n_evaluated, coverage.n_missing, coverage.n_extra, coverage.partial) == (4, 1, 1, True)
    with pytest.raises(CoverageError, match="share no image"):
        check_coverage({1000: "x"}, GTS, allow_partial=True)


def test_partial_evaluation_scores_the_overlap(scorer):
    results = {i: c for i, c in RES.items() if i != 5}
    report = evaluate_results(results, GTS, allow_partial=True, spice=False, scorer=scorer)
    overlap = scorer.score({i: GTS[i] for i in results}, results, spice=False)
    assert report.metrics == overlap.metrics
    assert report.coverage.missing_ids == [5]
    assert report.to_dict()["coverage"]["n_evaluated"] == 4
    with pytest.raises(CoverageError):
        evaluate_results(results, GTS, scorer=scorer)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("val2014/COCO_val2014_000000000042.jpg", 42),
        ("COCO_val2014_000000391895.jpg", 391895),
        ("flickr30k/1000092795.jpg", 1000092795),
        ("pg.jpg", "pg"),
        ("gpj.jpg", "gpj"),
        ("1001773457_577c3a7d70.jpg", "1001773457_577c3a7d70"),
        ("img_0012.png", 12),
    ],
)
def test_image_id_from_path(path, expected):
    assert image_id_from_path(path) == expected


def test_load_ground_truth_both_formats(tmp_path):
    coco = load_ground_truth(write_json(tmp_path / "gt.json", coco_ground_truth(GTS)))
    assert coco == GTS
    karpathy = [{"image": f"val2014/COCO_val2014_{i:012d}.jpg", "caption": refs} for i, refs in GTS.items()]
    karpathy.append({"image": "flickr/pg.jpg", "caption": ["a photo", ""]})
    loaded = load_ground_truth(write_json(tmp_path / "test.json", karpathy))
    assert loaded == {**GTS, "pg": ["a photo"]}
    with_ids = [{"image": "a/1.jpg", "caption": ["x y"], "image_id": 77}]
    assert load_ground_truth(write_json(tmp_path / "ids.json", with_ids)) == {77: ["x y"]}


def test_load_ground_truth_errors(tmp_path):
    clash = [
        {"image": "a/COCO_val2014_000000000042.jpg", "caption": ["x"]},
        {"image": "b/42.jpg", "caption": ["y"]},
    ]
    with pytest.raises(CaptionDataError, match="both map to image id 42"):
        load_ground_truth(write_json(tmp_path / "clash.json", clash))
    with pytest.raises(CaptionDataError, match="expected a COCO caption file"):
        load_ground_truth(write_json(tmp_path / "obj.json", {"images": []}))
    with pytest.raises(DataFileError, match="cannot read"):
        load_ground_truth(tmp_path / "absent.json")


def test_load_image_domains(tmp_path):
    domains = {i: "in-domain" if i % 2 else "out-domain" for i in GTS}
    path = write_json(tmp_path / "nocaps.json", coco_ground_truth(GTS, domains))
    assert load_image_domains(path) == domains
    assert load_image_domains(write_json(tmp_path / "plain.json", coco_ground_truth(GTS))) == {}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"image_id": 1, ', "not valid JSON"),
        ('{"image_id": 1, "caption": "x"}', "expected a list"),
        ('[{"image_id": 1}]', "entry 0 lacks"),
        (
            '[{"image_id": 3, "caption": "a"}, {"image_id": 3, "caption": "b"},'
            ' {"image_id": "4", "caption": "c"}, {"image_id": 4, "caption": "d"}]',
            r"2 duplicate image ids: 3, 4",
        ),
        (
            '[{"image_id": 8, "caption": " "}, {"image_id": 9, "caption": "ok"}]',
            r"1 empty captions, image ids: 8",
        ),
    ],
)
def test_load_results_errors(tmp_path, content, message):
    path = tmp_path / "results.json"
    path.write_text(content)
    with pytest.raises(DataFileError, match=message) as error:  # CaptionDataError for the content
        load_results(path)
    assert str(path) in str(error.value)


def test_load_results_normalises_ids(tmp_path):
    items = [
        {"image_id": 42, "caption": "a"},
        {"image_id": "7", "caption": "b"},
        {"image_id": "coco_13", "caption": "c"},
    ]
    assert load_results(write_json(tmp_path / "r.json", items)) == {42: "a", 7: "b", 13: "c"}


def test_evaluate_cli_end_to_end(tmp_path, capsys, reference_metrics, scorer, monkeypatch):
    # Reuse the running METEOR instead of starting another Java process (about 10 s).
    monkeypatch.setattr(evaluate, "CaptionScorer", lambda: contextlib.nullcontext(scorer))
    gt_path = write_json(tmp_path / "test_gt.json", coco_ground_truth(GTS))
    results_path = write_json(tmp_path / "preds.json", [{"image_id": i, "caption": c} for i, c in RES.items()])
    per_image = tmp_path / "per_image.json"
    code = evaluate.main(
        [
            "--results",
            str(results_path),
            "--annotations",
            str(gt_path),
            "--no_spice",
            "--per_image",
            str(per_image),
        ]
    )
    assert code == 0
    (cider_line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("CIDEr ")]
    assert cider_line.split()[1] == f"{reference_metrics['CIDEr'] * 100:.2f}"
    metrics = json.loads((tmp_path / "preds.metrics.json").read_text())
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"):
        assert metrics["metrics"][name] == pytest.approx(reference_metrics[name], rel=1e-9), name
    assert metrics["unavailable"] == {"SPICE": "skipped (spice=False)"}  # --no_spice, not the missing jars
    assert metrics["coverage"]["n_evaluated"] == len(GTS)
    rows = json.loads(per_image.read_text())
    # each image's own caption and CIDEr, worst first; CIDEr comes from metrics.cider.CiderD (corpus mode),
    # pycocoevalcap's formula to the last bits of a float64
    assert sorted(row["image_id"] for row in rows) == sorted(GTS)
    for row in rows:
        assert row["caption"] == RES[row["image_id"]]
        assert row["CIDEr"] == pytest.approx(reference_metrics["per_image"][row["image_id"]], rel=1e-12, abs=1e-12)
    assert [row["CIDEr"] for row in rows] == sorted(row["CIDEr"] for row in rows)


def test_evaluate_cli_input_errors_exit_2(tmp_path, capsys):
    gt_path = write_json(tmp_path / "gt.json", coco_ground_truth(GTS))
    partial = write_json(tmp_path / "partial.json", [{"image_id": 42, "caption": "a horse"}])
    assert evaluate.main(["--results", str(partial), "--annotations", str(gt_path)]) == 2
    assert "without prediction" in capsys.readouterr().err
    assert evaluate.main(["--results", str(tmp_path / "missing.json"), "--annotations", str(gt_path)]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_evaluate_cli_allow_partial_scores_the_overlap(tmp_path, scorer, monkeypatch):
    monkeypatch.setattr(evaluate, "CaptionScorer", lambda: contextlib.nullcontext(scorer))
    gt_path = write_json(tmp_path / "gt.json", coco_ground_truth(GTS))
    results = [{"image_id": i, "caption": c} for i, c in RES.items() if i != 5]
    results_path = write_json(tmp_path / "preds.json", results)
    output = tmp_path / "scores" / "partial.json"
    args = ["--results", str(results_path), "--annotations", str(gt_path), "--no_spice", "--output", str(output)]
    assert evaluate.main([*args, "--allow_partial"]) == 0
    coverage = json.loads(output.read_text())["coverage"]
    assert (coverage["partial"], coverage["n_evaluated"], coverage["missing_ids"]) == (True, 4, [5])
    assert not (tmp_path / "preds.metrics.json").exists()
