"""Training runs end to end: the command line, resume after an interruption, and two-process DDP."""

import copy
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_GPT2, tiny_config
from oracles import pycocoevalcap_cider
from pycocoevalcap import spice
from test_accumulation import _caption_batch

from data.text import IGNORE_INDEX
from engine.config import TrainConfig
from engine.loop import Optimization
from engine.optim import build_optimizer
from engine.runner import Run, RunResult
from engine.steps import XEStep
from models.build import build_captioner
from models.gpt2 import build_gpt2
from models.tokenizer import load_tokenizer
from utils.checkpoint import read_checkpoint

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def _cli_args(data: Path, out: Path) -> list[str]:
    return [
        "--encoder.vision_config", "swin_demo", "--encoder.checkpoint", "none",
        "--model.gpt2_config", "{n_layer: 2, n_embd: 64, n_head: 2}",
        "--data.image_root", str(data), "--data.train_file", str(data / "train.json"),
        "--data.val_file", str(data / "val.json"), "--data.test_file", str(data / "test.json"),
        "--cider_df", "none", "--augment=False", "--num_workers", "0", "--device", "cpu",
        "--batch_size", "8", "--eval_batch_size", "8", "--max_len", "8", "--min_len", "1",
        "--lr", "1e-3", "--log_every", "1", "--output_dir", str(out),
    ]  # fmt: skip


def _run_cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "train_scst.py"), *args], capture_output=True, text=True, timeout=600
    )


def test_xe_then_scst_from_the_command_line(tiny_dataset, tmp_path):
    xe_dir, scst_dir = tmp_path / "xe", tmp_path / "scst"
    done = _run_cli([*_cli_args(tiny_dataset, xe_dir), "--epochs", "1", "--output_vocab", "train"])
    assert done.returncode == 0, done.stderr[-3000:]
    output_ids = read_checkpoint(xe_dir / "best.pt")["architecture"]["output_ids"]
    captions = [e["caption"] for e in json.loads((tiny_dataset / "train.json").read_text())]
    assert all(re.fullmatch(r"[a-z ]+", c) for c in captions)  # so training's cleaning only appends "."
    gpt2 = load_tokenizer("gpt2")
    expected = {13, 50256} | {i for c in captions for i in gpt2.encode(c + ".")}  # "." and end-of-text stop
    assert output_ids == sorted(expected)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "test_metrics.json", "test_predictions.json"):
        assert stat.S_IMODE((xe_dir / name).stat().st_mode) == 0o666 & ~umask, name  # as open() would make it
    events = [json.loads(line)["event"] for line in (xe_dir / "metrics.jsonl").read_text().splitlines()]
    assert events.count("train") == 30 and "val" in events and events[-1] == "test"
    metrics = json.loads((xe_dir / "test_metrics.json").read_text())
    predictions = json.loads((xe_dir / "test_predictions.json").read_text())
    assert len(predictions) == 8
    assert metrics["metrics"]["CIDEr"] == pytest.approx(pycocoevalcap_cider(predictions, tiny_dataset), abs=1e-12)
    spice_jars = Path(spice.__file__).parent / "lib"
    has_jars = all((spice_jars / f"stanford-corenlp-3.6.0{s}.jar").is_file() for s in ("", "-models"))
    assert ("SPICE" in metrics["metrics"]) == has_jars and ("SPICE" in metrics["unavailable"]) != has_jars

    done = _run_cli([*_cli_args(tiny_dataset, scst_dir), "--scst=True", "--checkpoint", str(xe_dir / "best.pt"),
                     "--epochs", "1", "--batch_size", "4", "--num_samples", "3", "--baseline", "mean"])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (scst_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert len(train) == 12 and all({"reward", "baseline", "sample_len", "entropy"} <= r.keys() for r in train)
    assert read_checkpoint(scst_dir / "last.pt")["config"]["scst"] is True
    assert read_checkpoint(scst_dir / "last.pt")["architecture"]["output_ids"] == output_ids
    # the command line left model.output_vocab at "full": the checkpoint's vocabulary wins, with a warning
    log = (scst_dir / "train.log").read_text()
    assert f"model.output_vocab=full is ignored: {xe_dir / 'best.pt'} keeps its own" in log
    start, end = [r for r in records if r["event"] == "val"]
    assert (start["step"], end["step"]) == (0, 12)  # the starting checkpoint is scored before the first step
    kept = xe_dir / "best.pt" if start["CIDEr"] >= end["CIDEr"] else scst_dir / "last.pt"
    best = read_checkpoint(scst_dir / "best.pt")["model"]
    assert all(torch.equal(best[k], v) for k, v in read_checkpoint(kept)["model"].items())


def _last_stderr_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()  # log lines (INFO ...) come before the error
    return lines[-1] if lines else ""


def test_scst_without_checkpoint_is_refused(tiny_dataset, tmp_path):
    done = _run_cli([*_cli_args(tiny_dataset, tmp_path), "--scst=True"])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert _last_stderr_line(done) == (
        "train_scst.py: error: SCST starts from a cross-entropy checkpoint: give --checkpoint PATH"
    )
    assert not (tmp_path / "last.pt").exists()


def test_missing_encoder_checkpoint_is_named(tiny_dataset, tmp_path):
    done = _run_cli([*_cli_args(tiny_dataset, tmp_path), "--encoder.checkpoint", str(tmp_path / "nope.th")])
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert _last_stderr_line(done) == f"train_scst.py: error: encoder checkpoint not found: {tmp_path / 'nope.th'}"
    assert not (tmp_path / "last.pt").exists()


def _train(cfg) -> RunResult:
    run = Run(cfg)
    try:
        return run.train()
    finally:
        run.close()


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_resume_after_interruption_reproduces_the_uninterrupted_run(tiny_dataset, tmp_path, accum_steps):
    """Checkpoints fall between optimizer steps, so a run stopped mid-epoch resumes with the next step's
    first micro-batch, as the uninterrupted run took it."""
    overrides = {"train.epochs": 2, "train.max_steps_per_epoch": 4, "train.save_every_steps": 2,
                 "train.accum_steps": accum_steps}  # fmt: skip
    _train(tiny_config(tiny_dataset, tmp_path / "straight", **overrides))
    stopped = _train(tiny_config(tiny_dataset, tmp_path / "resumed", **overrides, **{"train.stop_after_steps": 6}))
    assert stopped.stopped and stopped.state.epoch == 1 and stopped.state.epoch_step == 2
    _train(tiny_config(tiny_dataset, tmp_path / "resumed", **overrides, resume=True))
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    steps = [(r["event"], r["step"]) for r in records if r["event"] in ("train", "resume")]
    assert steps[-3:] == [("resume", 6), ("train", 7), ("train", 8)]  # continued, not started afresh
    straight = read_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = read_checkpoint(tmp_path / "resumed" / "last.pt")
    assert straight["train_state"]["counters"] == resumed["train_state"]["counters"]
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def _worker(out: Path, *args: str, processes: int = 1) -> subprocess.CompletedProcess:
    """ddp_worker.py writing into ``out``, in one process or with torchrun in ``processes``."""
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    command = [*launch, str(TESTS / "ddp_worker.py"), args[0], str(out), *args[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, timeout=600, capture_output=True, text=True)


@pytest.fixture(scope="module")
def xe_single(tiny_dataset, tmp_path_factory) -> Path:
    """The worker's XE steps in one process: the DDP XE test's oracle and the SCST test's starting point."""
    out = tmp_path_factory.mktemp("xe_single")
    done = _worker(out, str(tiny_dataset), "1", "xe")
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _two_processes(out: Path, *args: str) -> tuple[dict, dict]:
    """The weights each of two torchrun processes saved."""
    done = _worker(out, *args, processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")


def _assert_same_training(one: dict, rank0: dict, rank1: dict) -> None:
    for key, value in one.items():
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ at {key}"
        assert torch.allclose(rank0[key], value, atol=1e-5), f"differs from batch 8 at once in one process at {key}"


def test_two_process_ddp_matches_one_process(tiny_dataset, xe_single, tmp_path):
    """XE with the N-pair loss (weight 1): its negatives come from both processes, so the step is the same."""
    rank0, rank1 = _two_processes(tmp_path / "xe_ddp", str(tiny_dataset), "1", "xe")
    _assert_same_training(torch.load(xe_single / "rank0.pt"), rank0, rank1)
    _assert_three_steps_with_aux(tmp_path / "xe_ddp")


def test_two_process_ddp_with_the_feature_cache_matches_one_process(tiny_dataset, tmp_path):
    """The randomly initialised encoder is built alike on both ranks, so both read the one store rank 0
    created (its folder is named by the encoder's weights) and train as one process does from its own."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    done = _worker(single, str(tiny_dataset), "1", "xe_cached")
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = _two_processes(ddp, str(tiny_dataset), "1", "xe_cached")
    _assert_same_training(torch.load(single / "rank0.pt"), rank0, rank1)
    stores = [sorted(p.name for p in (out / "features").iterdir()) for out in (single, ddp)]
    assert stores[0] == stores[1] and len(stores[0]) == 2, stores  # the training and the validation images
    _assert_three_steps_with_aux(ddp)


def _assert_three_steps_with_aux(out: Path) -> None:
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in steps if r["event"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3] and all(r["aux"] > 0 for r in train)


def _logged(out: Path, key: str) -> list[float]:
    """``key`` of each training step in the run's metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if r["event"] == "train"]


@pytest.fixture(scope="module")
def scst_single(tiny_dataset, xe_single, tmp_path_factory) -> Path:
    """The worker's SCST steps in one process, from the XE steps' weights."""
    out = tmp_path_factory.mktemp("scst_single")
    done = _worker(out, str(tiny_dataset), "1", "scst", str(xe_single / "last.pt"))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_two_process_scst_matches_one_process(tiny_dataset, xe_single, scst_single, tmp_path):
    """SCST averages gradients by hand; each image samples from its own seed, so both runs draw the same
    captions and take the same steps."""
    one = torch.load(scst_single / "rank0.pt")
    rank0, rank1 = _two_processes(tmp_path / "scst_ddp", str(tiny_dataset), "1", "scst", str(xe_single / "last.pt"))
    _assert_same_training(one, rank0, rank1)
    one_xe = torch.load(xe_single / "rank0.pt")
    assert any(not torch.equal(one[k], one_xe[k]) for k in one)
    train = [json.loads(line) for line in (tmp_path / "scst_ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["event"] == "train"] == [1, 2]


def _micro_batches_logged(out: Path) -> str:
    """The micro-batch count of the run's "training:" log line."""
    line = next(line for line in (out / "train.log").read_text().splitlines() if " training: " in line)
    return re.search(r"in (\d+) micro-batch", line).group(1)


@pytest.mark.parametrize("processes", [1, 2])
def test_accumulated_xe_steps_are_the_large_batch_steps(tiny_dataset, xe_single, tmp_path, processes):
    """Batch 8 in 2 micro-batches per process (of 4 in one process, of 2 in two): the same three steps,
    weight for weight, as batch 8 at once. The N-pair loss (weight 1) takes its negatives from all 8 images."""
    out = tmp_path / "xe_accum"
    done = _worker(out, str(tiny_dataset), "2", "xe", processes=processes)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(out / f"rank{rank}.pt") for rank in range(processes)]
    _assert_same_training(torch.load(xe_single / "rank0.pt"), ranks[0], ranks[-1])
    assert _micro_batches_logged(out) == "2"
    assert _logged(out, "step") == [1, 2, 3]
    # the logged loss and N-pair loss are the whole step's, as batch 8 at once logs them
    for key in ("loss", "aux"):
        assert _logged(out, key) == pytest.approx(_logged(xe_single, key), rel=1e-5), key


@pytest.mark.parametrize("processes", [1, 2])
def test_accumulated_scst_steps_are_the_large_batch_steps(tiny_dataset, xe_single, scst_single, tmp_path, processes):
    """SCST, batch 8 in 2 micro-batches per process: each image draws its samples from its own seed, so the
    two steps equal those of batch 8 at once, weight for weight."""
    out = tmp_path / "scst_accum"
    done = _worker(out, str(tiny_dataset), "2", "scst", str(xe_single / "last.pt"), processes=processes)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(out / f"rank{rank}.pt") for rank in range(processes)]
    _assert_same_training(torch.load(scst_single / "rank0.pt"), ranks[0], ranks[-1])
    assert _micro_batches_logged(out) == "2"
    for key in ("loss", "reward"):
        assert _logged(out, key) == pytest.approx(_logged(scst_single, key), rel=1e-5), key


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("--lr=abc", "train.lr: cannot read 'abc' as float"),  # utils.config
        (
            "--mapping_type=lstm",
            "argument --model.mapping_type/--mapping_type: invalid choice: 'lstm' (choose from mlp, transformer)",
        ),  # argparse
    ],
    ids=["lr", "mapping_type"],
)
def test_bad_options_fail_with_status_2(bad, message):
    done = _run_cli([bad, "--print_config"])
    # argparse quotes the choices ('mlp', 'transformer') in some Python versions, not in others
    stderr = done.stderr.replace("'mlp', 'transformer'", "mlp, transformer")
    assert (done.returncode, stderr, done.stdout) == (2, f"train_scst.py: error: {message}\n", "")  # no config


def test_optimizer_is_fused_adamw_over_trainable_parameters_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    model[0].bias.requires_grad_(False)
    initial = copy.deepcopy(model)
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.01, adam_eps=1e-6))
    reference_optimizer = torch.optim.AdamW(
        [p for p in reference.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01, eps=1e-6, foreach=False
    )
    assert optimizer.defaults["fused"]
    inputs = torch.randn(4, 6)
    for _ in range(3):
        for net, opt in ((model, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            net(inputs).square().mean().backward()
            opt.step()
    for (name, param), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(param, ref, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(model[0].bias, initial[0].bias)
    assert not torch.equal(model[1].weight, initial[1].weight)


@pytest.mark.parametrize(("grad_clip", "step"), [(0.0, [3.0, 4.0]), (1.0, [0.6, 0.8]), (10.0, [3.0, 4.0])])
def test_grad_clip_caps_the_gradient_norm(grad_clip, step):
    """Gradient (3, 4), of norm 5: clipped to norm 1 (0.6, 0.8) with train.grad_clip 1, whole with 0 (off)
    and with a bound above its norm; plain SGD at learning rate 1 moves the weights by it."""
    weights = torch.nn.Parameter(torch.zeros(2))
    sgd = torch.optim.SGD([weights], lr=1.0)
    optimization = Optimization([weights], sgd, torch.optim.lr_scheduler.LambdaLR(sgd, lambda _: 1.0),
                                torch.amp.GradScaler("cpu", enabled=False), "fp32", grad_clip)  # fmt: skip
    optimization.update((weights * torch.tensor([3.0, 4.0])).sum(), "step 1")
    torch.testing.assert_close(weights.detach(), -torch.tensor(step))


def test_xe_step_smooths_the_labels_by_train_label_smoothing(tokenizer):
    """The XE step's cross-entropy is torch's with the configured label smoothing, over the model's
    teacher-forced logits of the real caption tokens."""
    torch.manual_seed(0)
    cfg = tiny_config(**{"train.label_smoothing": 0.1, "train.use_aux_loss": False})
    model = build_captioner(cfg).eval()
    features = torch.randn(8, 17, 256, generator=torch.Generator().manual_seed(1))
    batch = _caption_batch(tokenizer, slice(0, 8), features)
    real = batch["labels"] != IGNORE_INDEX
    with torch.no_grad():
        out = XEStep(model, torch.device("cpu"), cfg.train)(batch)
        logits = model.token_logits(model.encode(features=features), batch["input_ids"])[real]
    xe = out["xe"]
    assert out["loss"] == xe  # without the N-pair loss, one batch's objective is its cross-entropy
    plain = torch.nn.functional.cross_entropy(logits, batch["labels"][real])
    smoothed = torch.nn.functional.cross_entropy(logits, batch["labels"][real], label_smoothing=0.1)
    assert abs(float(smoothed - plain)) > 1e-3  # the smoothing shows in the value
    torch.testing.assert_close(xe, smoothed)


def test_pretrained_gpt2_trains_with_dropout_from_the_first_step(tiny_dataset, tmp_path):
    """from_pretrained returns GPT-2 in eval mode; the reference's model.train() turns its dropout on."""
    folder = tmp_path / "gpt2"
    build_gpt2("gpt2", dict(TINY_GPT2)).save_pretrained(folder)
    cfg = tiny_config(tiny_dataset, tmp_path / "run", **{"model.gpt2": str(folder), "model.gpt2_config": None,
                                                          "train.stop_after_steps": 2})  # fmt: skip
    run = Run(cfg)
    assert not run.model.gpt.training  # as loaded
    modes: list[bool] = []
    run.model.gpt.transformer.drop.register_forward_pre_hook(lambda module, _: modes.append(module.training))
    try:
        assert run.train().stopped
    finally:
        run.close()
    assert modes == [True, True] and run.model.gpt.transformer.drop.p == 0.1


@pytest.mark.parametrize(("epochs", "total_steps", "steps"), [(3, 5, 5), (1, 10, 4)])
def test_total_steps_sets_the_schedule_and_caps_the_run(tiny_dataset, tmp_path, epochs, total_steps, steps):
    overrides = {"train.epochs": epochs, "train.total_steps": total_steps, "train.max_steps_per_epoch": 4,
                 "train.warmup_ratio": 0.2, "train.val_meteor": False}  # fmt: skip
    cfg = tiny_config(tiny_dataset, tmp_path, **overrides)
    _train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in train] == list(range(1, steps + 1))
    # transformers' linear schedule: lr(s) = s / warm-up, then (total - s) / (total - warm-up); logged after step s
    warmup = 0.2 * total_steps
    expected = [
        1e-3 * (s / warmup if s < warmup else (total_steps - s) / (total_steps - warmup)) for s in range(1, steps + 1)
    ]
    assert [r["lr"] for r in train] == pytest.approx(expected)
    assert (train[-1]["lr"] == 0.0) == (steps == total_steps)
