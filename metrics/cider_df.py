"""Document frequencies for CIDEr-D: n-gram counting, the frequency table, and its cache files.

A document is the set of reference captions of one image. ``counts[ngram]`` is the number of documents
whose references contain ``ngram`` at least once; ``log_num_docs`` is the log of the number of documents.

Cache files: ``save`` writes gzip-compressed JSON. ``load`` reads that and also the pickles made by
self-critical.pytorch's ``scripts/prepro_ngrams.py`` (``coco-train-words.p`` / ``coco-train-idxs.p``, also
used by Oscar-style SCST code): a dict ``{'document_frequency': {ngram tuple: float}, 'ref_len': number}``.
In those files ``ref_len`` is the raw number of reference sets, not its log: ``prepro_ngrams.py`` stores
``len(crefs)`` (the image count), and the CiderD scorers that read the file compute
``np.log(float(pkl_file['ref_len']))`` themselves. A count can never be below a document frequency, so a
file whose ``ref_len`` is smaller than its largest frequency is rejected as malformed rather than guessed at.
Pickles are read with an unpickler that resolves only ``collections.defaultdict`` and the builtin number and
dict types, so a crafted file cannot run code.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import math
import os
import pickle
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.io import atomic_write

logger = logging.getLogger(__name__)

Ngram = tuple[str, ...]

EOS = "<eos>"  # the end token of the reference SCST reward's sentences (see ``metrics.cider.wrap_eos``)

_FORMAT_NAME = "cider-document-frequency"
_FORMAT_VERSION = 1
_GZIP_MAGIC = b"\x1f\x8b"

# Everything a document-frequency pickle legitimately references; Python 2 pickles name the builtins module
# "__builtin__".
_ALLOWED_PICKLE_GLOBALS = frozenset(
    (module, name) for module in ("builtins", "__builtin__") for name in ("float", "int", "dict")
) | {("collections", "defaultdict")}


def wrap_eos(sentence: str) -> str:
    """The reference SCST reward's form of a caption: stripped, one trailing "." dropped, " <eos>" appended."""
    text = sentence.strip()
    if text.endswith("."):
        text = text[:-1]
    return f"{text} {EOS}"


def ngram_counts(tokens: Sequence[str], n: int) -> Counter[Ngram]:
    """Count the 1..n-grams of a token sequence (term frequencies), keyed by token tuples."""
    shifted = [tokens[i:] for i in range(n)]
    grams: list[Ngram] = []
    for k in range(1, n + 1):
        # The shifted copies differ in length: zip stops at the shortest, i.e. after the last k-gram.
        grams.extend(zip(*shifted[:k], strict=False))
    return Counter(grams)


@dataclass
class DocumentFrequency:
    """N-gram document frequencies of a reference corpus.

    Attributes:
        counts: n-gram tuple -> number of reference sets containing it (floats, as the reference scorer).
        log_num_docs: natural log of the number of reference sets.
        n: longest n-gram order counted.
    """

    counts: dict[Ngram, float]
    log_num_docs: float
    n: int = 4

    @property
    def counts_eos(self) -> bool:
        """Whether the references were counted with the end token appended (``"... <eos>"``)."""
        return (EOS,) in self.counts

    @classmethod
    def from_references(
        cls, references: Iterable[Sequence[str]], n: int = 4, append_eos: bool = False
    ) -> DocumentFrequency:
        """Count document frequencies; ``references`` holds one entry per image: its reference strings
        (already tokenized, split on whitespace). ``append_eos`` counts them as :func:`wrap_eos` writes them,
        as ``coco-train-words.p`` does."""
        counter: Counter[Ngram] = Counter()
        num_docs = 0
        for refs in references:
            if isinstance(refs, str):
                raise TypeError(f"each item must be one image's list of references, got the string {refs!r}")
            seen: set[Ngram] = set()
            for ref in refs:
                seen.update(ngram_counts((wrap_eos(ref) if append_eos else ref).split(), n))
            counter.update(seen)
            num_docs += 1
        if num_docs == 0:
            raise ValueError("cannot compute document frequencies from an empty set of references")
        return cls({ngram: float(c) for ngram, c in counter.items()}, math.log(float(num_docs)), n)

    def save(self, path: str | os.PathLike) -> None:
        """Write gzip-compressed JSON atomically (:func:`utils.io.atomic_write`)."""
        payload = {
            "format": _FORMAT_NAME,
            "version": _FORMAT_VERSION,
            "n": self.n,
            "log_num_docs": self.log_num_docs,
            "document_frequency": {" ".join(ngram): c for ngram, c in self.counts.items()},
        }
        # Level 1: several times faster than the default 9 on a COCO-sized table, ~20% larger file.
        with (
            atomic_write(path, binary=True, what="document frequencies") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1, mtime=0) as gz,
        ):
            gz.write(json.dumps(payload).encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> DocumentFrequency:
        """Read a file written by ``save`` or a self-critical style ``coco-train-*.p`` pickle.

        Raises:
            OSError: the file cannot be opened.
            ValueError: the content is not a document-frequency table (the message names the file).
        """
        path = Path(path)
        with open(path, "rb") as raw:
            stream: io.BufferedReader | gzip.GzipFile = raw
            try:
                if raw.peek(2)[:2] == _GZIP_MAGIC:
                    stream = gzip.GzipFile(fileobj=raw, mode="rb")
                if stream.peek(1)[:1].lstrip() in (b"{", b""):
                    table = _from_json(json.load(stream))
                else:
                    table = _from_pickle(_RestrictedUnpickler(stream, encoding="latin1").load())
            # Corrupt files surface as many exception types (zlib.error, OverflowError, AttributeError, ...);
            # every one of them means the file is not what it should be.
            except Exception as err:
                raise ValueError(f"{path}: not a readable document-frequency file: {err!r}") from err
        logger.info("loaded %d n-gram document frequencies from %s", len(table.counts), path)
        return table


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the few globals a document-frequency pickle contains; refuses anything else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not a plain data type)")
        return super().find_class(module, name)


def _from_json(payload: Any) -> DocumentFrequency:
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT_NAME:
        raise ValueError(f"JSON content is not a {_FORMAT_NAME!r} table")
    if payload.get("version") != _FORMAT_VERSION:
        raise ValueError(f"unsupported version {payload.get('version')!r} (expected {_FORMAT_VERSION})")
    raw_counts = payload["document_frequency"]
    if not isinstance(raw_counts, dict):
        raise ValueError("'document_frequency' is not an object")
    counts = {tuple(key.split(" ")): _as_count(value, key) for key, value in raw_counts.items()}
    log_num_docs = payload["log_num_docs"]
    if isinstance(log_num_docs, bool) or not isinstance(log_num_docs, (int, float)) or log_num_docs < 0:
        raise ValueError(f"'log_num_docs' must be a non-negative number, got {log_num_docs!r}")
    return DocumentFrequency(counts, float(log_num_docs), int(payload["n"]))


def _from_pickle(payload: Any) -> DocumentFrequency:
    if not isinstance(payload, dict) or "document_frequency" not in payload or "ref_len" not in payload:
        raise ValueError("expected a dict with keys 'document_frequency' and 'ref_len'")
    raw_counts, ref_len = payload["document_frequency"], payload["ref_len"]
    if not isinstance(raw_counts, dict):
        raise ValueError("'document_frequency' is not a dict")
    if isinstance(ref_len, bool) or not isinstance(ref_len, (int, float)) or not ref_len >= 1:
        raise ValueError(f"'ref_len' must be a number of reference sets >= 1, got {ref_len!r}")
    counts = {_as_ngram(key): _as_count(value, key) for key, value in raw_counts.items()}
    largest = max(counts.values(), default=0.0)
    if largest > ref_len:
        raise ValueError(
            f"'ref_len' ({ref_len!r}) is below the largest document frequency ({largest:g}); it should be "
            "the raw number of reference sets (a log-transformed value is not supported)"
        )
    n = max((len(ngram) for ngram in counts), default=0)
    return DocumentFrequency(counts, math.log(float(ref_len)), n)


def _as_ngram(key: Any) -> Ngram:
    # self-critical's -idxs.p stores word ids as digit strings; plain ints are accepted as the same tokens.
    if isinstance(key, tuple) and key and all(isinstance(t, (str, int)) for t in key):
        return key if all(isinstance(t, str) for t in key) else tuple(str(t) for t in key)
    raise ValueError(f"n-gram key {key!r} is not a non-empty tuple of tokens")


def _as_count(value: Any, key: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"document frequency of {key!r} must be a non-negative number, got {value!r}")
    return float(value)
