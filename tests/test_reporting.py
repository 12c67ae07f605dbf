"""Tests for utils.plot (curves from metrics.jsonl) and utils.reporting (dashboards); test_demo.py checks the
TensorBoard events of real runs and the demo's curves.png."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from utils.logs import MetricsLog
from utils.plot import chain_offsets, read_run
from utils.plot import main as plot_main
from utils.reporting import WandbReporter, parse_report_to


def write_run(run: Path, scst: bool) -> list[dict]:
    """A metrics.jsonl as training writes it (through MetricsLog)."""
    log = MetricsLog(run / "metrics.jsonl")
    records = []
    for step in range(1, 7):
        values = {"reward": 0.5 + 0.1 * step, "baseline": 0.4 + 0.1 * step} if scst else {"xe": 4.0 / step}
        values = {"epoch": 0, "step": step, "lr": 1e-3, "loss": 4.0 / step, **values}
        log.write("train", **values)
        records.append(values)
    log.write("val", epoch=1, step=6, CIDEr=0.8 + scst, **{"BLEU-4": 0.2})
    log.write("test", CIDEr=0.7)
    return records


def test_curves_from_metrics_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    xe_records = write_run(tmp_path / "xe", scst=False)
    scst_records = write_run(tmp_path / "scst", scst=True)
    xe, scst = read_run(tmp_path / "xe"), read_run(tmp_path / "scst")
    assert xe.series["loss"] == ([r["step"] for r in xe_records], [r["loss"] for r in xe_records])
    for key in ("reward", "baseline"):
        assert scst.series[key] == ([r["step"] for r in scst_records], [r[key] for r in scst_records])
    assert set(xe.series) == {"loss", "val_cider"} and set(scst.series) == {"reward", "baseline", "val_cider"}
    assert scst.series["val_cider"] == ([6], [pytest.approx(180.0)])
    both, only_xe = tmp_path / "both.png", tmp_path / "xe.png"
    assert plot_main([str(tmp_path / "xe"), str(tmp_path / "scst"), "--out", str(both)]) == 0
    assert plot_main([str(tmp_path / "xe"), "--out", str(only_xe), "--title", "XE"]) == 0
    with Image.open(both) as three_panels, Image.open(only_xe) as two_panels:
        assert three_panels.format == two_panels.format == "PNG"
        assert three_panels.width == pytest.approx(1.5 * two_panels.width, rel=0.02)  # no reward panel for XE
    assert f"curves written to {both}" in capsys.readouterr().out
    (tmp_path / "scst" / "config.yaml").write_text(f"scst: true\ncheckpoint: {tmp_path / 'xe' / 'best.pt'}\n")
    offsets = chain_offsets([tmp_path / "xe", tmp_path / "scst"], [xe, scst])
    assert offsets == [0, 6]  # SCST continues after the XE run it started from
    absent = tmp_path / "absent"
    assert plot_main([str(absent), "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == (
        f"error: {absent / 'metrics.jsonl'} does not exist: is {absent} a training run folder?\n"
    )
    assert not (tmp_path / "x.png").exists()


def test_report_to_values() -> None:
    assert parse_report_to("none") == [] and parse_report_to("tensorboard, wandb") == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match="unknown \\['mlflow'\\]"):
        parse_report_to("tensorboard,mlflow")


def _run_file(run: Path) -> bytes:
    """The bytes of the offline run's ``run-<id>.wandb`` file so far (none before wandb creates it)."""
    files = list(run.glob("*.wandb"))
    assert len(files) <= 1, files
    return files[0].read_bytes() if files else b""


def test_wandb_offline_run_holds_the_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline by default
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl", [WandbReporter(tmp_path / "run", {"train": {"lr": 1}})])
    log.write("train", step=3, loss=2.5, reward=0.75)
    log.write("val", step=3, CIDEr=1.25)
    log.text("val/samples", "| image | caption |\n|---|---|\n| 7 | a red square |")
    log.close()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    keys = (b"train/loss", b"train/reward", b"val/CIDEr", b"2.5", b"1.25")
    pages = runs[0] / "files" / "media" / "html" / "val"
    deadline = time.monotonic() + 30  # wandb's service process writes the run file after finish() returns
    while (missing := [k for k in keys if k not in _run_file(runs[0])]) or not list(pages.glob("samples_3_*.html")):
        assert time.monotonic() < deadline, f"30 s after finish(): {runs[0]} lacks {missing} or {pages}/samples_3_*"
        time.sleep(0.2)
    (page,) = pages.glob("samples_3_*.html")
    assert "a red square" in page.read_text()
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"] == 2.5
