"""Where files are read and written: atomic writes, JSON, image ids, and the accounting of unreadable items.

Every file a run, ``predict.py``, ``evaluate.py`` or ``data.prepare_*`` writes goes through :func:`atomic_write`
(or a helper built on it): a temporary file beside the target, flushed to disk, then renamed over it, so a
reader, a crash or a kill never sees half a file, and the file gets the permissions the umask allows
(0644 under umask 022), as ``open()`` would give it. A failed write removes its temporary file and raises
:class:`WriteError` naming the file; a kill leaves it for :func:`remove_stale_temporaries`. Whole folders (a
generated data set, a feature store's layout) are built in a :func:`staged_folder` and renamed into place by
:func:`install_folder`.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO, Any, NamedTuple

logger = logging.getLogger(__name__)

ImageId = int | str

TMP_SUFFIX = ".tmp"
_WRITE_HINTS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file size limit reached (ulimit -f)",
}
# Stems like "COCO_val2014_000000391895" or "391895": words that start with a letter, then the number.
_ID_PATTERN = re.compile(r"^(?:[A-Za-z][A-Za-z0-9]*_)*(\d+)$")
_TRAILING_NUMBER = re.compile(r"(\d+)$")


class DataFileError(ValueError):
    """An input file, or a value read from it, that is missing, unreadable or malformed; the message names it."""


class WriteError(OSError):
    """A file could not be written (disk full, quota, permissions); the previous file, if any, is unchanged."""


# ----- writing ----------------------------------------------------------------------------------------------
@contextmanager
def atomic_write(path: str | os.PathLike, binary: bool = False, what: str = "file") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; when the block ends without error, fsync it and
    rename it to ``path``. Text is UTF-8 with ``\\n`` line ends. ``what`` names the file in errors
    ("cannot write checkpoint runs/x/last.pt (No space left on device: disk full); ...")."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fd = _create_temporary(path)
    except OSError as err:
        raise _write_error(path, err, what) from err
    text_options = {} if binary else {"encoding": "utf-8", "newline": ""}
    try:
        with os.fdopen(fd, "wb" if binary else "w", **text_options) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_directory(path.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        # A failed write is an OSError, or a RuntimeError chained to one (torch.save); other errors of the
        # caller's block (a ValueError while serialising, say) pass through as they are.
        os_error = _os_error_in(err) if isinstance(err, OSError | RuntimeError) else None
        if os_error is not None and not isinstance(err, WriteError):
            raise _write_error(path, os_error, what) from err
        raise


def _create_temporary(path: Path) -> tuple[Path, int]:
    """A new ``.<name>.<random>.tmp`` beside ``path``, created with mode 0666 so that the umask alone decides
    the final permissions (``tempfile.mkstemp`` would make it 0600, unreadable by a research group)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}")
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue


def _os_error_in(err: BaseException) -> OSError | None:
    """The OSError that ``err`` is or is chained to."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno is not None:
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _write_error(path: Path, err: OSError, what: str) -> WriteError:
    hint = _WRITE_HINTS.get(err.errno)
    reason = f"{err.strerror or err}" + (f": {hint}" if hint else "")
    kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
    error = WriteError(f"cannot write {what} {path} ({reason}); {kept}")
    error.errno = err.errno
    return error


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (a power cut right after it must not bring back the old file)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes, what: str = "file") -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, binary=True, what=what) as handle:
        handle.write(data)


def write_text(path: str | os.PathLike, text: str, what: str = "file") -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    with atomic_write(path, what=what) as handle:
        handle.write(text)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = None, what: str = "file") -> None:
    """Write ``data`` as UTF-8 JSON (non-ASCII kept as is) atomically; indented files end with a newline."""
    text = json.dumps(data, ensure_ascii=False, indent=indent)
    write_text(path, text + ("\n" if indent is not None else ""), what)


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line. A log grows, so it cannot be replaced atomically; one ``write``
    of the whole line in append mode keeps a concurrent reader from seeing lines interleaved."""
    line = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary files that writes killed mid-way (``kill -9``, power loss) left in ``directory``.

    Call it only where no other process is writing into ``directory``. Returns the names removed.
    """
    removed = []
    for tmp in Path(directory).glob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return sorted(removed)


@contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """An empty hidden folder beside ``target`` (same file system, so it can be renamed there) to build a
    folder's contents in; it is deleted when the block ends, unless :func:`install_folder` moved it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def install_folder(staging: Path, target: str | os.PathLike, replace: bool = False) -> bool:
    """Rename the finished folder ``staging`` to ``target``: a reader sees no folder or a whole one, never half.

    With ``replace`` a folder already at ``target`` is moved aside first and deleted once the new one is in
    place (put back if the rename fails). Returns False when another process put a folder at ``target``
    first: that folder is kept and ``staging`` is left to the caller's :func:`staged_folder` to delete.
    """
    target = Path(target)
    old = None
    if replace and target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        if target.exists():
            installed = False
        else:
            if old is not None:
                os.replace(old, target)
            raise
    else:
        installed = True
        _fsync_directory(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return installed


# ----- reading ----------------------------------------------------------------------------------------------
def read_json(path: str | os.PathLike) -> Any:
    """Parsed JSON of ``path``; a missing or malformed file raises :class:`DataFileError` naming it."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as err:
        raise DataFileError(f"cannot read {path}: {err.strerror or err}") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataFileError(f"{path} is not valid JSON: {err}") from err


# ----- image ids --------------------------------------------------------------------------------------------
def normalise_image_id(value: Any) -> ImageId:
    """Canonical image id: ints stay, ``"42"``, ``"coco_42"`` or ``"COCO_val2014_000000000042"`` become 42.

    Other strings (Flickr8k stems such as ``"1000268201_693b08cb0e"``) are kept unchanged.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise DataFileError(f"image id {value!r} is neither an int nor a string")
    if isinstance(value, int):
        return value
    match = _ID_PATTERN.match(value)
    return int(match.group(1)) if match else value


def image_id_from_path(path: str) -> ImageId:
    """Image id of an image file: ``"val2014/COCO_val2014_000000000042.jpg"`` -> 42, ``"pg.jpg"`` -> "pg"."""
    return normalise_image_id(PurePosixPath(path.replace("\\", "/")).stem)


def assign_image_ids(paths: Sequence[str | os.PathLike]) -> list[int]:
    """Image ids for files: the trailing number of the file stem when it has one and no other file has
    the same (``COCO_val2014_000000060623.jpg`` -> 60623), otherwise a running index that continues after
    the largest such number, in the order given, so that ids never collide (``a/1.jpg``, ``b/1.jpg``)."""
    numbers = [int(m.group(1)) if (m := _TRAILING_NUMBER.search(Path(p).stem)) else None for p in paths]
    counts = Counter(n for n in numbers if n is not None)
    shared = sorted(n for n, count in counts.items() if count > 1)
    if shared:
        logger.warning("%d file numbers are shared by several files (e.g. %d): those files get running ids; "
                       "give --annotations to take the ids from a caption file", len(shared), shared[0])  # fmt: skip
    next_id = max(counts, default=-1) + 1
    ids = []
    for number in numbers:
        if number is not None and counts[number] == 1:
            ids.append(number)
        else:
            ids.append(next_id)
            next_id += 1
    return ids


# ----- items that could not be read (collated by data.datasets.collate_images) ---------------------------
class Unreadable(NamedTuple):
    """Stands in for a data set item whose file could not be read. ``kind`` is a short category for counts
    (missing, corrupt or truncated, ...), ``reason`` the full one-line explanation; the collation drops it."""

    path: str
    kind: str
    reason: str


def split_unreadable(items: Sequence[Any]) -> tuple[list[Any], dict[str, Any]]:
    """The readable items, and a batch dict accounting for the others: ``skipped`` (how many),
    ``skipped_why`` (``{kind: count}``) and ``failures`` (the :class:`Unreadable` items, in order)."""
    good = [item for item in items if not isinstance(item, Unreadable)]
    bad = [item for item in items if isinstance(item, Unreadable)]
    return good, {
        "skipped": len(bad),
        "skipped_why": dict(Counter(item.kind for item in bad)),
        "failures": bad,
    }
