"""Training from WebDataset shards: writing them, splitting an epoch over processes and workers, resuming,
and bad shards. Shards are read back by the webdataset library itself as the oracle of their content."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from torch.utils.data import DataLoader

from data import prepare_custom, shard_df
from data.datasets import CaptionImageDataset
from data.prepare_coco import ImageRecord
from data.shard_eval import ShardEvalData
from data.shard_writer import write_shards
from data.shards import (
    BAD_SHARD,
    NO_CAPTION,
    ShardError,
    ShardSet,
    ShardStream,
    StreamPlan,
    collate_references,
)
from data.text import clean_caption, strip_stop
from data.transforms import build_transform
from engine.evaluation import generate_captions
from engine.runner import Run
from metrics.cider_df import DocumentFrequency
from models.build import build_captioner
from models.decoding import DecodeOptions
from utils.checkpoint import read_checkpoint
from utils.distributed import DistInfo

try:
    import webdataset as wds
except ImportError:
    wds = None
pytestmark = pytest.mark.optional_tool(None if wds else "training from shards needs the webdataset package")

TESTS = Path(__file__).resolve().parent


def _prepare(dataset: Path, out: Path, shard_size: int) -> Path:
    """The generated data set's splits, written by data.prepare_custom with --shards."""
    rows = out / "captions.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    with rows.open("w") as handle:
        for split in ("train", "val", "test"):
            for entry in json.loads((dataset / f"{split}.json").read_text()):
                handle.write(json.dumps({"image": entry["image"], "caption": entry["caption"], "split": split}) + "\n")
    args = ["--captions", str(rows), "--image_root", str(dataset), "--out", str(out / "prepared"),
            "--shards", str(out / "shards"), "--shard_size", str(shard_size)]  # fmt: skip
    assert prepare_custom.main(args) == 0
    return out / "shards"


@pytest.fixture(scope="module")
def even(tiny_dataset, tmp_path_factory) -> Path:
    """48 training images in 4 shards of 12."""
    return _prepare(tiny_dataset, tmp_path_factory.mktemp("even"), 12)


@pytest.fixture(scope="module")
def uneven(tiny_dataset, tmp_path_factory) -> Path:
    """48 training images in shards of 10, 10, 10, 10 and 8."""
    return _prepare(tiny_dataset, tmp_path_factory.mktemp("uneven"), 10)


def _spec(shards: Path) -> str:
    return str(shards / f"{{00000..{len(list(shards.glob('*.tar'))) - 1:05d}}}.tar")


def _oracle(shards: Path) -> list[dict]:
    """Every sample of the shards as the webdataset library reads them."""
    return list(wds.WebDataset(sorted(str(p) for p in shards.glob("*.tar")), shardshuffle=False, empty_check=False))


def test_shards_hold_img2dataset_samples_with_original_bytes_and_stats(tiny_dataset, even):
    samples = _oracle(even)
    train = json.loads((even.parent / "prepared" / "train.json").read_text())
    captions: dict[str, list[str]] = {}
    for entry in train:
        captions.setdefault(entry["image"], []).append(entry["caption"])
    assert len(samples) == len(captions) == 48
    for sample in samples:
        meta = json.loads(sample["json"])
        assert meta["key"] == sample["__key__"] and len(sample["__key__"]) == 9
        assert sample["jpg"] == (tiny_dataset / meta["url"]).read_bytes()
        assert meta["caption"] == captions[meta["url"]] and len(meta["caption"]) > 1
        assert sample["txt"].decode() == captions[meta["url"]][0]
    stats = [json.loads(p.read_text()) for p in sorted(even.glob("*_stats.json"))]
    assert [s["successes"] for s in stats] == [s["count"] for s in stats] == [12, 12, 12, 12]


def test_epoch_length_from_stats_or_train_samples(uneven, tmp_path):
    assert ShardSet.open(_spec(uneven), None).samples == 48
    assert ShardSet.open(_spec(uneven), None).sizes == [10, 10, 10, 10, 8]
    bare = tmp_path / "bare"
    bare.mkdir()
    for tar in uneven.glob("*.tar"):
        shutil.copy(tar, bare / tar.name)
    assert ShardSet.open(_spec(bare), 30).samples == 30
    with pytest.raises(ShardError, match=r"_stats\.json.*data\.train_samples"):
        ShardSet.open(_spec(bare), None)
    with pytest.raises(ShardError, match=r"3 of 8 shard files not found \(first: .*00005\.tar\)"):
        ShardSet.open(str(uneven / "{00000..00007}.tar"), None)


class _Keys(ShardStream):
    """The stream with each sample's key in place of its decoded image."""

    def decode(self, sample: dict) -> str:
        return sample["__key__"]


def _keys(shards: Path, rank: int, world: int, workers: int, steps: int, batch: int = 4, **plan) -> list[str]:
    """Keys one process receives, through a real DataLoader with ``workers`` workers."""
    plan = StreamPlan(plan.pop("seed", 1), plan.pop("epoch", 0), rank, world, workers, batch, steps, **plan)
    stream = _Keys(ShardSet.open(_spec(shards), None), plan, transform=None)
    loader = DataLoader(stream, batch_size=batch, num_workers=workers, collate_fn=list)
    return [key for batch_keys in loader for key in batch_keys]


def test_even_shards_give_every_sample_once_across_ranks_and_workers(even):
    everything = sorted(s["__key__"] for s in _oracle(even))
    rank0, rank1 = (_keys(even, rank, 2, 2, steps=6) for rank in (0, 1))
    assert len(rank0) == len(rank1) == 24
    assert sorted(rank0 + rank1) == everything
    assert _keys(even, 0, 2, 2, steps=6) == rank0  # the same seed reads the same samples in the same order
    assert _keys(even, 0, 2, 2, steps=6, epoch=1) != rank0


def test_one_reader_mixes_its_shards_in_the_shuffle_buffer(even):
    keys = _keys(even, 0, 1, 0, steps=12)
    assert sorted(keys) == sorted(s["__key__"] for s in _oracle(even))
    # Keys start with their shard's number. Read shard after shard, 44 of the 47 neighbours would share a
    # shard; shuffled across the 4 shards, about a quarter do.
    neighbours = sum(a[:5] == b[:5] for a, b in zip(keys, keys[1:], strict=False))
    assert neighbours < 20, keys


def test_training_items_draw_one_of_their_references_each_epoch(even):
    samples, shard_set = _oracle(even), ShardSet.open(_spec(even), None)
    drawn: dict[str, set[str]] = {s["__key__"]: set() for s in samples}
    for epoch in range(3):
        stream = ShardStream(shard_set, StreamPlan(1, epoch, 0, 1, 0, 4, steps=12), build_transform(32, train=False))
        for sample in samples:
            image, caption = stream.decode(sample)
            assert image.shape == (3, 32, 32)
            drawn[sample["__key__"]].add(caption)
    for sample in samples:
        assert drawn[sample["__key__"]] <= {clean_caption(c) for c in json.loads(sample["json"])["caption"]}
    # 5 references: three draws repeat one 1 time in 25
    assert sum(len(captions) > 1 for captions in drawn.values()) > 40


def test_uneven_shards_give_every_rank_the_same_steps(uneven):
    everything = {s["__key__"] for s in _oracle(uneven)}
    rank0, rank1 = (_keys(uneven, rank, 2, 0, steps=6) for rank in (0, 1))
    assert len(rank0) == len(rank1) == 24
    assert not set(rank0) & set(rank1) and set(rank0) | set(rank1) <= everything
    # The rank whose shards hold fewer than 24 samples starts over on them; none is read three times.
    seen = Counter(rank0 + rank1)
    assert max(seen.values()) == 2 and len(seen) >= 48 - 10


@pytest.mark.parametrize("skip", [1, 3])
def test_resume_continues_with_the_samples_the_uninterrupted_epoch_reads(even, skip):
    whole = _keys(even, 1, 2, 2, steps=6)
    assert _keys(even, 1, 2, 2, steps=6, skip_steps=skip) == whole[skip * 4 :]


def _corrupt(shards: Path, out: Path) -> Path:
    """A copy of ``shards`` (with their stats) where, written by webdataset's TarWriter, shard 0's first
    image is not an image and its second sample has no caption, and shard 2 is cut in the middle."""
    shutil.copytree(shards, out)
    samples = list(wds.WebDataset(str(shards / "00000.tar"), shardshuffle=False, empty_check=False))
    samples[0]["jpg"] = b"<html>not found</html>"
    del samples[1]["txt"], samples[1]["json"]
    with wds.TarWriter(str(out / "00000.tar")) as tar:
        for sample in samples:
            tar.write({k: v for k, v in sample.items() if k != "__url__"})
    data = (out / "00002.tar").read_bytes()
    (out / "00002.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(tarfile.ReadError), tarfile.open(out / "00002.tar") as tar:  # Python's tar reader fails too
        for member in tar:
            tar.extractfile(member).read()
    return out


@pytest.fixture(scope="module")
def corrupt(uneven, tmp_path_factory) -> Path:
    return _corrupt(uneven, tmp_path_factory.mktemp("corrupt") / "shards")


def _train(cfg) -> object:
    run = Run(cfg)
    try:
        return run.train()
    finally:
        run.close()


def _config(data: Path, shards: Path, out: Path, **overrides) -> object:
    return tiny_config(data, out, **{"data.train_shards": _spec(shards), "train.val_meteor": False, **overrides})


def test_a_bad_shard_stops_the_run_naming_it(tiny_dataset, corrupt, tmp_path):
    with pytest.raises(ShardError, match=r"shard .*00002\.tar is truncated or unreadable .*on_bad_shard skip"):
        _train(_config(tiny_dataset, corrupt, tmp_path / "run"))


def test_resume_on_shards_with_bad_data_reproduces_the_uninterrupted_run(tiny_dataset, corrupt, tmp_path):
    """Two epochs of 6 steps with augmentation from shards with a corrupt image, a sample without caption and
    a truncated shard (skipped), read by 2 loader workers; the run stopped at step 9 (step 3 of epoch 2) and
    resumed."""
    overrides = {"train.epochs": 2, "train.save_every_steps": 3, "data.on_bad_shard": "skip",
                 "data.num_workers": 2, "data.augment": True}  # fmt: skip
    _train(_config(tiny_dataset, corrupt, tmp_path / "straight", **overrides))
    stopped = _train(_config(tiny_dataset, corrupt, tmp_path / "resumed", **overrides, **{"train.stop_after_steps": 9}))
    assert stopped.stopped and (stopped.state.epoch, stopped.state.epoch_step) == (1, 3)
    _train(_config(tiny_dataset, corrupt, tmp_path / "resumed", **overrides, resume=True))
    straight = read_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = read_checkpoint(tmp_path / "resumed" / "last.pt")
    counters = straight["train_state"]["counters"]
    assert counters == resumed["train_state"]["counters"] and counters["global_step"] == 12
    reasons = counters["skipped_by_reason"]
    assert {BAD_SHARD, NO_CAPTION, "not an image"} <= set(reasons) and counters["skipped_images"] == sum(
        reasons.values()
    )
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def _two_processes(data: Path, shards: Path, val_shards: str, out: Path, *overrides: str) -> None:
    """tests/shard_worker.py in 2 torchrun processes."""
    out.mkdir(exist_ok=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launch, str(TESTS / "shard_worker.py"), str(data), _spec(shards), val_shards, str(out), *overrides]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_on_uneven_shards_take_the_same_steps(tiny_dataset, uneven, tmp_path):
    """One epoch over 2 processes, validated on 3 shards of the val split (2 for rank 0, 1 for rank 1)."""
    out = tmp_path / "ddp"
    entries = json.loads((uneven.parent / "prepared" / "val.json").read_text())
    records = [ImageRecord(e["image"], e["image_id"], "val", e["caption"]) for e in entries]
    write_shards(records, tiny_dataset, tmp_path / "val", shard_size=3)
    _two_processes(tiny_dataset, uneven, _spec(tmp_path / "val"), out)
    keys = [(out / f"keys_rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 24  # 48 samples // batch 8 = 6 steps of 4 per process
    assert not set(keys[0]) & set(keys[1]) and set(keys[0]) | set(keys[1]) <= {s["__key__"] for s in _oracle(uneven)}
    states = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert states[0]["global_step"] == states[1]["global_step"] == 6
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in train if r["event"] == "val"] == [6]
    assert "8 of 8 ground-truth images have a prediction" in (out / "train.log").read_text()


def test_prepare_without_webdataset_says_how_to_install_it(tiny_dataset, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "webdataset", None)  # import webdataset now raises ImportError
    with pytest.raises(AssertionError):
        _prepare(tiny_dataset, tmp_path, 12)
    assert capsys.readouterr().err.strip() == "error: shards need the webdataset package: pip install webdataset"


def test_document_frequencies_from_shards_equal_those_of_the_prepared_split(even, tmp_path):
    assert shard_df.main(["--shards", _spec(even), "--out", str(tmp_path / "df.json.gz")]) == 0
    from_shards = DocumentFrequency.load(tmp_path / "df.json.gz")
    from_json = DocumentFrequency.load(even.parent / "prepared" / "train_cider_df.json.gz")  # data.prepare_custom
    assert from_shards.counts == from_json.counts and from_shards.log_num_docs == from_json.log_num_docs
    assert ("<eos>",) in from_shards.counts


def test_scst_items_carry_every_reference_of_their_sample(even):
    plan = StreamPlan(1, 0, 0, 1, 0, 4, steps=3)
    stream = ShardStream(ShardSet.open(_spec(even), None), plan, build_transform(32, train=False), references=True)
    batches = list(DataLoader(stream, batch_size=4, collate_fn=collate_references))
    by_index = {int(s["__key__"]): json.loads(s["json"])["caption"] for s in _oracle(even)}
    assert len(batches) == 3 and all(b["images"].shape == (4, 3, 32, 32) for b in batches)
    for batch in batches:
        for index, references in zip(batch["indices"], batch["references"], strict=True):
            assert references == [strip_stop(clean_caption(c)) for c in by_index[index]] and len(references) > 1


def test_scst_from_shards_needs_document_frequencies_and_trains_with_them(tiny_dataset, even, tiny_checkpoint,
                                                                          tmp_path):  # fmt: skip
    overrides = {"scst": True, "checkpoint": str(tiny_checkpoint), "train.stop_after_steps": 2,
                 "data.cider_df": str(tmp_path / "df.json.gz")}  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"python -m data\.shard_df --shards"):
        _train(_config(tiny_dataset, even, tmp_path / "no_df", **overrides))
    assert shard_df.main(["--shards", _spec(even), "--out", str(tmp_path / "df.json.gz")]) == 0
    result = _train(_config(tiny_dataset, even, tmp_path / "scst", **overrides))
    assert result.stopped and result.state.global_step == 2
    train = [json.loads(line) for line in (tmp_path / "scst" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["event"] == "train"] == [1, 2] and all(
        "reward" in r for r in train if r["event"] == "train"
    )


def test_validation_from_shards_captions_what_the_json_files_give(tiny_dataset, even, tokenizer, tmp_path):
    """The prepared val split written as 3 shards by data.shard_writer: the same ids, references and
    captions (2 loader workers) as val.json with its JPEG files."""
    prepared = even.parent / "prepared"
    entries = json.loads((prepared / "val.json").read_text())
    records = [ImageRecord(e["image"], e["image_id"], "val", e["caption"]) for e in entries]
    write_shards(records, tiny_dataset, tmp_path / "val", shard_size=3)
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_captioner(cfg).eval()
    transform = build_transform(model.encoder.image_res, train=False)
    shards = ShardEvalData(str(tmp_path / "val" / "{00000..00002}.tar"), transform)
    files = CaptionImageDataset(prepared / "val.json", tiny_dataset, transform, "val")
    assert shards.ids == files.ids and shards.references == files.references
    dist, options = DistInfo(0, 1, 0, torch.device("cpu")), DecodeOptions(method="greedy", max_len=8)
    from_shards = generate_captions(model, shards, tokenizer, options, dist, batch_size=3, num_workers=2)
    from_files = generate_captions(model, files, tokenizer, options, dist, batch_size=3)
    assert from_shards == from_files and len(from_files) == len(entries) == 8


def test_two_processes_resumed_mid_epoch_give_the_uninterrupted_weights(tiny_dataset, uneven, tmp_path):
    """Dropout and augmentation on, 2 processes of 1 loader worker: stopped at step 8 (step 2 of epoch 2),
    resumed; rank 1's random state comes back from last.pt as rank 0's does."""
    settings = ("train.epochs=2", "data.augment=true", "data.num_workers=1")
    _two_processes(tiny_dataset, uneven, "", tmp_path / "straight", *settings)
    _two_processes(tiny_dataset, uneven, "", tmp_path / "resumed", *settings, "train.stop_after_steps=8")
    assert read_checkpoint(tmp_path / "resumed" / "last.pt")["train_state"]["counters"]["global_step"] == 8
    _two_processes(tiny_dataset, uneven, "", tmp_path / "resumed", *settings, "resume=true")
    straight = read_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = read_checkpoint(tmp_path / "resumed" / "last.pt")
    assert straight["train_state"]["counters"] == resumed["train_state"]["counters"]
    assert len(resumed["train_state"]["rng_ranks"]) == 2
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
