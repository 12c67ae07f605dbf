"""utils.io: atomic writes with the umask's permissions, JSON errors naming the file, batches with unreadable items."""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from data.datasets import collate_images
from utils.io import (
    DataFileError,
    Unreadable,
    WriteError,
    append_jsonl,
    atomic_write,
    install_folder,
    read_json,
    remove_stale_temporaries,
    split_unreadable,
    staged_folder,
    write_json,
    write_text,
)


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_permissions_the_umask_allows(tmp_path, mask, expected) -> None:
    with umask(mask):
        write_text(tmp_path / "new.txt", "x")
        (tmp_path / "old.txt").write_text("old")
        os.chmod(tmp_path / "old.txt", 0o600)
        write_text(tmp_path / "old.txt", "new")  # a replaced file is a new file: the umask decides again
        append_jsonl(tmp_path / "metrics.jsonl", {"step": 1})
        (tmp_path / "by_open.txt").write_text("x")
    written = ("new.txt", "old.txt", "metrics.jsonl", "by_open.txt")
    assert {name: mode(tmp_path / name) for name in written} == dict.fromkeys(written, expected)
    assert (tmp_path / "old.txt").read_text() == "new"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path) -> None:
    target = tmp_path / "metrics.json"
    write_json(target, {"CIDEr": 1.0})
    with pytest.raises(RuntimeError, match="serialiser broke"), atomic_write(target) as handle:
        handle.write('{"CIDEr": ')
        raise RuntimeError("serialiser broke")
    assert read_json(target) == {"CIDEr": 1.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_stale_temporaries_of_killed_writes_are_removed(tmp_path) -> None:
    (tmp_path / ".last.pt.1a2b3c4d.tmp").write_bytes(b"half")
    (tmp_path / "last.pt").write_bytes(b"whole")
    (tmp_path / "notes.tmp").write_text("a file of the user's, not a hidden temporary")
    assert remove_stale_temporaries(tmp_path) == [".last.pt.1a2b3c4d.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]


@pytest.mark.parametrize("chained", [False, True])
def test_a_disk_full_mid_write_names_the_file_and_keeps_the_old_one(tmp_path, chained) -> None:
    """An OSError in the block, or a RuntimeError raised from one (as torch.save does), is a WriteError."""
    target = tmp_path / "last.pt"
    target.write_bytes(b"old")
    full = OSError(errno.ENOSPC, "No space left on device")
    expected = re.escape(f"cannot write checkpoint {target} (No space left on device: disk full); the previous")
    with pytest.raises(WriteError, match=expected) as caught, atomic_write(target, True, "checkpoint") as handle:
        handle.write(b"half")
        if chained:
            raise RuntimeError("PytorchStreamWriter failed writing file data") from full
        raise full
    assert caught.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"] and target.read_bytes() == b"old"


def test_json_round_trip_keeps_text_and_ends_indented_files_with_a_newline(tmp_path) -> None:
    data = [{"image_id": 42, "caption": "un café à côté"}]
    write_json(tmp_path / "a.json", data, indent=1)
    text = (tmp_path / "a.json").read_text(encoding="utf-8")
    assert json.loads(text) == read_json(tmp_path / "a.json") == data
    assert "café" in text and text.endswith("}\n]\n")


def test_read_json_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(DataFileError, match=f"cannot read {tmp_path / 'absent.json'}: No such file"):
        read_json(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(DataFileError, match=f"{tmp_path / 'bad.json'} is not valid JSON"):
        read_json(tmp_path / "bad.json")


def test_append_jsonl_adds_one_line_per_record(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"event": "train", "loss": 2.5})
    append_jsonl(path, {"event": "val", "CIDEr": float("nan")})
    lines = path.read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["train", "val"] and "NaN" in lines[1]


def test_collation_drops_unreadable_items_and_accounts_for_them() -> None:
    a, b = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    items = [(a, 0), Unreadable("x.jpg", "missing", "no such file"), (b, 2), Unreadable("y.png", "missing", "gone")]
    good, accounting = split_unreadable(items)
    assert good == [(a, 0), (b, 2)]
    assert accounting["skipped"] == 2 and accounting["skipped_why"] == {"missing": 2}
    assert [(f.path, f.reason) for f in accounting["failures"]] == [("x.jpg", "no such file"), ("y.png", "gone")]
    batch = collate_images(items)
    assert torch.equal(batch["images"], torch.stack([a, b])) and batch["indices"] == [0, 2]
    assert batch["failures"] == accounting["failures"]
    empty = collate_images([Unreadable("z.jpg", "empty", "empty file (0 bytes)")])
    assert "images" not in empty and "indices" not in empty and empty["skipped"] == 1


def test_a_write_that_cannot_start_names_the_file(tmp_path) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("a file where a folder should be")
    target = blocker / "x" / "last.pt"
    expected = f"cannot write checkpoint {target} .*no last.pt was written"
    with pytest.raises(WriteError, match=expected), atomic_write(target, binary=True, what="checkpoint") as handle:
        handle.write(b"never")


def _tree(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): f.read_text() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_install_folder_replaces_a_folder_whole_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "set"
    (target / "old").mkdir(parents=True)
    (target / "old" / "a.txt").write_text("old")
    with staged_folder(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".set.") and not any(staging.iterdir())
        (staging / "b.txt").write_text("new")
        assert install_folder(staging, target, replace=True)
    assert _tree(target) == {"b.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_install_folder_without_replace_keeps_a_folder_another_process_made(tmp_path: Path) -> None:
    target = tmp_path / "store"
    with staged_folder(target) as staging:
        (staging / "mine.txt").write_text("mine")
        target.mkdir()
        (target / "theirs.txt").write_text("theirs")
        assert not install_folder(staging, target)
    assert _tree(target) == {"theirs.txt": "theirs"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_failed_build_leaves_the_old_folder_and_no_staging(tmp_path: Path) -> None:
    target = tmp_path / "set"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="generator broke"), staged_folder(target) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("generator broke")
    assert _tree(target) == {"a.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_a_failed_rename_puts_the_replaced_folder_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "set"
    target.mkdir()
    (target / "a.txt").write_text("old")
    real_rename = os.rename

    def failing_rename(src, dst):
        if Path(dst) == target:
            raise OSError(28, "No space left on device")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with staged_folder(target) as staging, pytest.raises(OSError, match="No space"):
        install_folder(staging, target, replace=True)
    assert _tree(target) == {"a.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
