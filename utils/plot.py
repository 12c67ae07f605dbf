"""Training curves from the ``metrics.jsonl`` of one or more runs (needs matplotlib).

    python -m utils.plot runs/xe runs/scst --out curves.png

Panels, each drawn only when some run has its data: the training loss of cross-entropy runs, the SCST
reward with its baseline (dashed), and the validation CIDEr; one colour per run, x = the run's step. A run
that started from the checkpoint of another plotted run (SCST from XE) continues after that run's last step.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from utils.cli import ArgumentParser
from utils.io import atomic_write


@dataclass
class RunCurves:
    """Series of one run: ``name`` and ``{series: ([steps], [values])}``."""

    name: str
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    def add(self, key: str, step: int, value: float) -> None:
        steps, values = self.series.setdefault(key, ([], []))
        steps.append(step)
        values.append(value)


def read_run(run_dir: Path) -> RunCurves:
    """The loss, reward, baseline and validation CIDEr series of ``run_dir/metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a training run folder?")
    curves = RunCurves(run_dir.name)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not JSON ({err.msg})") from err
            _add_record(curves, record)
    return curves


def _add_record(curves: RunCurves, record: dict) -> None:
    step = record.get("step")
    if not isinstance(step, int):
        return
    if record.get("event") == "train":
        is_scst = "reward" in record
        for key in ("reward", "baseline") if is_scst else ("loss",):
            if isinstance(record.get(key), int | float):
                curves.add(key, step, float(record[key]))
    elif record.get("event") == "val" and isinstance(record.get("CIDEr"), int | float):
        curves.add("val_cider", step, 100.0 * record["CIDEr"])


def chain_offsets(run_dirs: list[Path], runs: list[RunCurves]) -> list[int]:
    """Per run, the last step of the plotted run whose checkpoint it started from (``config.yaml``), else 0."""
    last_step = {d.resolve(): max((s for steps, _ in r.series.values() for s in steps), default=0)
                 for d, r in zip(run_dirs, runs, strict=True)}  # fmt: skip
    offsets = []
    for run_dir in run_dirs:
        config = run_dir / "config.yaml"
        start = (yaml.safe_load(config.read_text()) or {}).get("checkpoint") if config.is_file() else None
        offsets.append(last_step.get(Path(start).resolve().parent, 0) if start else 0)
    return offsets


PANELS = (
    ("loss", "cross-entropy training loss"),
    ("reward", "SCST reward (CIDEr-D); dashed: baseline"),
    ("val_cider", "validation CIDEr"),
)


def plot_runs(run_dirs: Sequence[Path], out: Path, title: str | None = None) -> Path:
    """Draw the curves of ``run_dirs`` into the image ``out`` (format from its suffix, e.g. .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(Path(d)) for d in run_dirs]
    for run, offset in zip(runs, chain_offsets([Path(d) for d in run_dirs], runs), strict=True):
        run.series = {key: ([step + offset for step in steps], values) for key, (steps, values) in run.series.items()}
    panels = [(key, label) for key, label in PANELS if any(key in run.series for run in runs)]
    if not panels:
        raise ValueError("no training or validation records in " + ", ".join(map(str, run_dirs)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for axis, (key, label) in zip(axes[0], panels, strict=True):
        for index, run in enumerate(runs):
            colour = colours[index % len(colours)]
            if key in run.series:
                axis.plot(*run.series[key], color=colour, label=run.name, marker="o" if key == "val_cider" else None)
            if key == "reward" and "baseline" in run.series:
                axis.plot(*run.series["baseline"], color=colour, linestyle="--", linewidth=0.9)
        axis.set_title(label, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(out, binary=True) as handle:
        fig.savefig(handle, dpi=90, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m utils.plot", description=__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="image file (.png, .svg, .pdf)")
    parser.add_argument("--title", help="figure title")
    args = parser.parse(argv)
    if isinstance(args, int):
        return args
    try:
        out = plot_runs(args.runs, args.out, args.title)
    except ImportError:
        print("error: utils.plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"curves written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
