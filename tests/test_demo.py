"""The built-in demo end to end on a tiny generated data set: both stages, the table and the summary."""

import json
from pathlib import Path

import pytest
from oracles import pycocoevalcap_cider

import demo
from data.synthetic import generate_dataset

TINY = ["train.epochs=1", "train.batch_size=8", "train.eval_batch_size=8", "data.num_workers=0"]


def test_demo_runs_xe_then_scst_and_reports_each_stage(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = generate_dataset(tmp_path / "data", num_train=24, num_val=8, num_test=8, image_size=64)
    cache = f"data.feature_cache_dir={tmp_path / 'features'}"
    args = ["--output_dir", str(tmp_path / "out"), "--data_dir", str(data.root), "--device", "cpu"]
    scst = [*TINY, cache, "train.max_steps_per_epoch=2", "train.batch_size=4"]
    assert demo.main([*args, "--xe", *TINY, cache, "--scst", *scst]) == 0

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
    for baseline in ("greedy", "mean"):
        scst_cider = rescored(f"scst_{baseline}")
        assert rows[f"XE + SCST ({baseline} baseline)"]["metrics"]["CIDEr"] == pytest.approx(scst_cider, abs=1e-12)
        assert summary["scst_cider_gain"][baseline] == pytest.approx(scst_cider / xe_cider - 1, abs=1e-12)
        assert (tmp_path / "out" / f"scst_{baseline}" / "best.pt").is_file()
        assert "initialised from" in (tmp_path / "out" / f"scst_{baseline}" / "train.log").read_text()
    printed = capsys.readouterr().out
    assert "Demo test split (8 images)" in printed and "SCST's test CIDEr relative to XE" in printed
    assert all(name in printed for name in stages)


def test_demo_rejects_malformed_overrides(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        demo.main(["--xe", "train.epochs"])
    assert "KEY=VALUE" in capsys.readouterr().err
