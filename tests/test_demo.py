"""The built-in demo end to end on a tiny generated data set: both stages, the table and the summary."""

import json
from pathlib import Path

import pytest
import yaml
from oracles import pycocoevalcap_cider
from PIL import Image

import demo
from data.synthetic import generate_dataset

TINY = ["--train.epochs", "1", "--train.batch_size", "8", "--eval_batch_size=8", "--data.num_workers", "0"]


def test_demo_runs_xe_then_scst_and_reports_each_stage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = generate_dataset(tmp_path / "data", num_train=24, num_val=8, num_test=8, image_size=64)
    cache = ["--data.feature_cache_dir", str(tmp_path / "features")]
    args = ["--output_dir", str(tmp_path / "out"), "--data_dir", str(data.root), "--device", "cpu"]
    scst_only = tmp_path / "scst.yaml"
    scst_only.write_text("train:\n  max_steps_per_epoch: 2\n  batch_size: 4\n")
    report = ["--report_to", "tensorboard"]
    assert demo.main([*args, *TINY, *cache, *report, "--scst_config", str(scst_only)]) == 0

    summary = json.loads((tmp_path / "out" / "demo_summary.json").read_text())
    rows = summary["rows"]
    stages = ["XE", "XE + SCST (greedy baseline)", "XE + SCST (mean baseline)"]
    assert [name for name in rows if not name.startswith(("constant", "human"))] == stages
    assert rows["human (leave-one-out)"]["grounding"]["all"] == 1.0

    def rescored(stage: str) -> float:  # the stage's own test captions, scored by pycocoevalcap alone
        return pycocoevalcap_cider(
            json.loads((tmp_path / "out" / stage / "test_predictions.json").read_text()), data.root
        )

    xe_cider = rescored("xe")
    assert rows["XE"]["metrics"]["CIDEr"] == pytest.approx(xe_cider, abs=1e-12)
    xe_captions = [p["caption"] for p in json.loads((tmp_path / "out" / "xe" / "test_predictions.json").read_text())]
    assert rows["XE"]["diversity"]["distinct"] == len(set(xe_captions))  # the model's captions are PTB-clean
    assert rows["XE"]["diversity"]["vocabulary"] == len({w for c in xe_captions for w in c.split()})
    constant = next(row for name, row in rows.items() if name.startswith("constant"))["diversity"]
    assert (constant["distinct"], constant["most_repeated_count"], constant["novel"]) == (1, 8, 0.0)
    for baseline in ("greedy", "mean"):
        scst_cider = rescored(f"scst_{baseline}")
        assert rows[f"XE + SCST ({baseline} baseline)"]["metrics"]["CIDEr"] == pytest.approx(scst_cider, abs=1e-12)
        assert summary["scst_cider_gain"][baseline] == pytest.approx(scst_cider / xe_cider - 1, abs=1e-12)
        run = tmp_path / "out" / f"scst_{baseline}"
        assert (run / "best.pt").is_file()
        resolved = yaml.safe_load((run / "config.yaml").read_text())  # what the stage trained with
        assert (resolved["scst"], resolved["scst_opts"]["baseline"]) == (True, baseline)
        xe_best = (tmp_path / "out" / "xe" / "best.pt").resolve()
        assert resolved["checkpoint"] == str(xe_best)
        assert f"initialised from {xe_best}" in (run / "train.log").read_text()
    printed = capsys.readouterr().out
    assert "Demo test split (8 images)" in printed and "SCST's test CIDEr relative to XE" in printed
    assert all(name in printed for name in stages)
    assert "distinct   vocab  dist-1  dist-2   novel  | grounding" in printed
    with Image.open(tmp_path / "out" / "curves.png") as curves:  # loss, reward and validation panels
        assert curves.format == "PNG" and curves.width > 2.5 * curves.height
    check_tensorboard(tmp_path / "out" / "xe", ["loss", "xe", "aux", "lr"])
    check_tensorboard(tmp_path / "out" / "scst_mean", ["loss", "reward", "baseline", "entropy", "lr"])


def check_tensorboard(run: Path, train_keys: list[str]) -> None:
    """The run's TensorBoard events hold its metrics.jsonl values at their steps, and sample captions."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}).Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for event, keys in (("train", train_keys), ("val", ["CIDEr", "BLEU-4", "distinct_captions", "vocabulary"])):
        for key in keys:
            logged = [(e.step, e.value) for e in events.Scalars(f"{event}/{key}")]
            expected = [(r["step"], r[key]) for r in records if r["event"] == event]
            assert [s for s, _ in logged] == [s for s, _ in expected] and len(logged) > 0
            assert [v for _, v in logged] == pytest.approx([v for _, v in expected], rel=1e-6)
    test_cider = next(r["CIDEr"] for r in records if r["event"] == "test")
    assert events.Scalars("test/CIDEr")[-1].value == pytest.approx(test_cider, rel=1e-6)
    samples = events.Tensors("val/samples/text_summary")
    assert len(samples) == sum(r["event"] == "val" for r in records)
    assert "| image | caption | a reference |" in samples[-1].tensor_proto.string_val[0].decode()


def test_demo_rejects_malformed_and_unknown_options(capsys: pytest.CaptureFixture) -> None:
    assert demo.main(["--train.epochs"]) == 2
    assert "--train.epochs/--epochs: expected one argument" in capsys.readouterr().err
    assert demo.main(["--xe", "train.epochs=1"]) == 2  # the former KEY=VALUE spelling
    assert "unknown option --xe (did you mean --xe_config" in capsys.readouterr().err
