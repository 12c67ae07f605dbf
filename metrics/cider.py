"""CIDEr-D, exact and fast enough to be the SCST reward.

The score is the CiderD of the coco-caption forks used for SCST (self-critical.pytorch, Oscar). For one
candidate c and references r_1..r_m, with g_k(s) the tf-idf vector of the k-grams of sentence s
(term frequency x (log N - log max(1, df)), df from a reference corpus of N reference sets):

    CIDEr-D(c, r) = 10 / m * sum_j mean_{k=1..n} [ exp(-(l_c - l_j)^2 / (2 sigma^2))
                                  * sum_g min(g_k(c)[g], g_k(r_j)[g]) * g_k(r_j)[g] / (|g_k(c)| |g_k(r_j)|) ]

where the division is skipped when either norm is zero. The length l of a sentence is its number of
bigrams, as in the reference code; that is the word count minus one, so the length difference equals the
word-count difference whenever the score can be non-zero. Sentences are tokenized text: split on
whitespace, nothing removed (a trailing "." is the caller's business).

Speed: each reference set's n-gram ids, term frequencies, norms and lengths are computed once and kept in
an LRU cache keyed by the tuple of reference strings (about 3 KiB per image with 5 references, ~320 MiB for
the 113k Karpathy train images, measured by benchmarks/bench_cider.py), so SCST's many candidates per image,
step and epoch reuse them; a batch of candidates is then scored with a handful of vectorised numpy
operations.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat

import numpy as np

from metrics.cider_df import EOS, DocumentFrequency, Ngram, ngram_counts, wrap_eos

logger = logging.getLogger(__name__)


class _Vocabulary:
    """Integer ids and idf weights (log N - log max(1, df)) of the n-grams of one document-frequency table.

    Reference n-grams missing from the table are added on first sight with df = 0.
    """

    def __init__(self, df: DocumentFrequency) -> None:
        self.log_num_docs = df.log_num_docs
        self.ids: dict[Ngram, int] = {ngram: i for i, ngram in enumerate(df.counts)}
        freqs = np.fromiter(df.counts.values(), dtype=np.float64, count=len(df.counts))
        self._idf = df.log_num_docs - np.log(np.maximum(1.0, freqs))
        self.size = len(self.ids)

    @property
    def idf(self) -> np.ndarray:
        """(size,) float64 idf weight per n-gram id."""
        return self._idf[: self.size]

    def intern(self, ngrams: Sequence[Ngram]) -> list[int]:
        """Ids of the given n-grams, registering unseen ones."""
        out = list(map(self.ids.get, ngrams))
        for i, index in enumerate(out):
            if index is None:
                # Look again: an unseen n-gram occurring twice was registered at its first occurrence.
                index = self.ids.get(ngrams[i])
                out[i] = self.ids[ngrams[i]] = self._append_unseen() if index is None else index
        return out

    def _append_unseen(self) -> int:
        if self.size == len(self._idf):
            grown = np.empty(max(1024, 2 * self.size))
            grown[: self.size] = self._idf[: self.size]
            self._idf = grown
        self._idf[self.size] = self.log_num_docs
        self.size += 1
        return self.size - 1


@dataclass(frozen=True)
class _RefSet:
    """One image's references, pre-digested for scoring.

    ids: (k,) sorted unique n-gram ids over all m references; tf: (k, m) term frequency of each in each
    reference; norms: (m, n) tf-idf vector norm per reference and order; lengths: (m,) penalty lengths.
    """

    ids: np.ndarray
    tf: np.ndarray
    norms: np.ndarray
    lengths: np.ndarray


class CiderD:
    """CIDEr-D scorer (pycocoevalcap-style ``compute_score`` plus a batched ``score_candidates``).

    Args:
        df: document frequencies: a ``DocumentFrequency``, a path to a file ``DocumentFrequency.load``
            reads (e.g. ``coco-train-words.p``), or None for "corpus" mode, where each call takes them from
            the references it is given (one document per scored item), as pyciderevalcap's CiderD(df="corpus") does.
        n: longest n-gram order.
        sigma: standard deviation of the Gaussian length penalty.
        cache_size: reference sets kept in the LRU cache (precomputed df only). SCST visits every image
            once per epoch, so the cache only pays off across epochs when it holds the whole training set;
            0 disables it.
        append_eos: score every candidate and reference as :func:`wrap_eos` writes it ("words <eos>"), as
            the reference SCST reward does; its document frequencies must count ``<eos>`` too (those of
            ``coco-train-words.p`` and of ``data.prepare_coco`` do).
    """

    def __init__(
        self,
        df: DocumentFrequency | str | os.PathLike | None = None,
        n: int = 4,
        sigma: float = 6.0,
        cache_size: int = 150_000,
        append_eos: bool = False,
    ) -> None:
        if n < 1 or not sigma > 0 or cache_size < 0:
            raise ValueError(f"need n >= 1, sigma > 0, cache_size >= 0; got {n=}, {sigma=}, {cache_size=}")
        if isinstance(df, (str, os.PathLike)):
            df = DocumentFrequency.load(df)
        if df is not None and df.n < n:
            raise ValueError(f"document frequencies count n-grams up to {df.n}, but n={n} was requested")
        self.n = n
        self.sigma = sigma
        self.cache_size = cache_size
        self.append_eos = append_eos
        if append_eos and df is not None and not df.counts_eos:
            raise ValueError(f"append_eos needs document frequencies that count {EOS!r}; these count none")
        self._vocab = _Vocabulary(df) if df is not None else None
        self._cache: OrderedDict[tuple[str, ...], _RefSet] = OrderedDict()

    def method(self) -> str:
        """Metric name, as pycocoevalcap scorers report it."""
        return "CIDEr-D"

    @property
    def num_cached(self) -> int:
        """Number of reference sets currently cached."""
        return len(self._cache)

    def precompute(self, references: Iterable[Sequence[str]]) -> int:
        """Digest reference sets ahead of time (e.g. ``refs_by_id.values()``); returns how many were new."""
        if self._vocab is None:
            raise ValueError("precompute needs precomputed document frequencies (df=None is corpus mode)")
        before = len(self._cache)
        added = 0
        for refs in references:
            self._cached_refset(_checked_refs(refs, "precompute item"), self._vocab)
            added += 1
        if added > self.cache_size:
            logger.warning("precomputed %d reference sets but the cache keeps %d", added, self.cache_size)
        return len(self._cache) - before

    def compute_score(
        self, gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]]
    ) -> tuple[float, np.ndarray]:
        """Score one candidate per key.

        Args:
            gts: key -> non-empty list of reference strings.
            res: key -> list holding exactly one candidate string; same keys as ``gts``.

        Returns:
            (mean score, (len(res),) float64 per-item scores in the order of ``res``'s keys).
        """
        _check_keys(gts, res)
        candidates = []
        for key, value in res.items():
            if isinstance(value, str) or len(value) != 1 or not isinstance(value[0], str):
                raise ValueError(f"res[{key!r}] must be a list holding exactly one caption, got {value!r}")
            candidates.append(value[0])
        references = [_checked_refs(gts[key], f"gts[{key!r}]") for key in res]
        scores = self.score_candidates(candidates, references)
        return float(np.mean(scores)), scores

    def score_candidates(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """Score candidate i against references[i]; pass the same list object for candidates that share
        references (SCST's samples of one image) so that it is digested once.

        Returns:
            (len(candidates),) float64 CIDEr-D scores.
        """
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
        if not candidates:
            return np.zeros(0)
        if self.append_eos:
            candidates, references = _wrapped(candidates, references)
        vocab = self._vocab
        if vocab is None:
            for i, refs in enumerate(references):
                _checked_refs(refs, f"references[{i}]")
            vocab = _Vocabulary(DocumentFrequency.from_references(references, self.n))
        texts, slots, refsets, inverse = self._deduplicate(candidates, references, vocab)
        return self._score(texts, refsets, slots, vocab)[inverse]

    def _deduplicate(
        self, candidates: Sequence[str], references: Sequence[Sequence[str]], vocab: _Vocabulary
    ) -> tuple[list[str], np.ndarray, list[_RefSet], np.ndarray]:
        """Digest each distinct references object once and keep each distinct (text, references) pair once
        (SCST samples repeat themselves).

        Returns:
            texts: (U,) distinct candidates; slots: (U,) their reference set index into refsets;
            refsets: digested reference sets; inverse: (len(candidates),) index into texts.
        """
        slot_by_object: dict[int, int] = {}
        pair_index: dict[tuple[str, int], int] = {}
        refsets: list[_RefSet] = []
        texts: list[str] = []
        slots: list[int] = []
        inverse = np.empty(len(candidates), dtype=np.int64)
        for i, text in enumerate(candidates):
            refs = references[i]
            if not isinstance(text, str):
                raise TypeError(f"candidate {i} is not a string: {text!r}")
            slot = slot_by_object.get(id(refs))
            if slot is None:
                slot = slot_by_object[id(refs)] = len(refsets)
                refsets.append(self._refset(_checked_refs(refs, f"references[{i}]"), vocab))
            index = pair_index.get((text, slot))
            if index is None:
                index = pair_index[(text, slot)] = len(texts)
                texts.append(text)
                slots.append(slot)
            inverse[i] = index
        return texts, np.array(slots, dtype=np.int64), refsets, inverse

    def _refset(self, refs: Sequence[str], vocab: _Vocabulary) -> _RefSet:
        if vocab is not self._vocab or self.cache_size == 0:
            return self._digest(refs, vocab)
        return self._cached_refset(refs, vocab)

    def _cached_refset(self, refs: Sequence[str], vocab: _Vocabulary) -> _RefSet:
        key = tuple(refs)
        refset = self._cache.get(key)
        if refset is not None:
            self._cache.move_to_end(key)
            return refset
        refset = self._cache[key] = self._digest(refs, vocab)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return refset

    def _digest(self, refs: Sequence[str], vocab: _Vocabulary) -> _RefSet:
        tokens = [ref.split() for ref in refs]
        counts = [ngram_counts(words, self.n) for words in tokens]
        ids = np.array(vocab.intern(list(chain.from_iterable(counts))), dtype=np.int64)
        orders = np.fromiter(map(len, chain.from_iterable(counts)), dtype=np.int64, count=len(ids)) - 1
        tf = np.fromiter(chain.from_iterable(c.values() for c in counts), dtype=np.float64, count=len(ids))
        column = np.repeat(np.arange(len(refs)), [len(c) for c in counts])
        weights = tf * vocab.idf[ids]
        norms = np.sqrt(np.bincount(column * self.n + orders, weights**2, minlength=len(refs) * self.n))
        unique_ids, row = np.unique(ids, return_inverse=True)
        # Small integer types keep a COCO-sized cache compact; the table is widened again per batch.
        tf_type = np.uint8 if tf.max(initial=0) < 256 else np.int32
        tf_table = np.zeros((len(unique_ids), len(refs)), dtype=tf_type)
        tf_table[row, column] = tf
        lengths = np.array([self._penalty_length(len(words)) for words in tokens])
        return _RefSet(unique_ids.astype(np.int32), tf_table, norms.reshape(len(refs), self.n), lengths)

    def _penalty_length(self, num_tokens: int) -> int:
        # The reference code counts bigram occurrences as the length (none exist when n == 1).
        return max(num_tokens - 1, 0) if self.n >= 2 else 0

    def _score(
        self, candidates: Sequence[str], refsets: list[_RefSet], slots: np.ndarray, vocab: _Vocabulary
    ) -> np.ndarray:
        """(C,) scores of candidates[i] against refsets[slots[i]]."""
        n, num_cands = self.n, len(candidates)
        grams = self._candidate_ngrams(candidates, vocab)
        cand_norms = np.sqrt(np.bincount(grams.bucket, grams.weights**2, minlength=num_cands * n))
        cand_norms = cand_norms.reshape(num_cands, n, 1)

        table = _RefTable(refsets, n, vocab.size)
        rows, positions = table.match(slots[grams.row_to_cand[grams.known]], grams.ids[grams.known])
        rows = np.flatnonzero(grams.known)[rows]
        ref_values = table.tf[positions] * vocab.idf[table.ids[positions]][:, None]
        clipped = np.minimum(grams.weights[rows][:, None], ref_values) * ref_values
        buckets = grams.bucket[rows]
        per_ref = [np.bincount(buckets, clipped[:, j], minlength=num_cands * n) for j in range(table.width)]
        # bincount of an empty selection (no shared n-gram in the batch) comes back as integers.
        overlap = np.stack(per_ref, axis=1).astype(np.float64, copy=False).reshape(num_cands, n, table.width)

        ref_norms = table.norms[slots].transpose(0, 2, 1)
        divide = (cand_norms != 0) & (ref_norms != 0)
        similarity = np.divide(overlap, cand_norms * ref_norms, out=overlap.copy(), where=divide)
        delta = grams.lengths[:, None] - table.lengths[slots]
        similarity *= np.exp(-(delta**2) / (2 * self.sigma**2))[:, None, :]
        return similarity.sum(axis=2).mean(axis=1) / table.num_refs[slots] * 10.0

    def _candidate_ngrams(self, candidates: Sequence[str], vocab: _Vocabulary) -> _CandidateNgrams:
        n = self.n
        ids: list[int] = []
        orders: list[int] = []
        tfs: list[int] = []
        sizes: list[int] = []
        lengths = np.empty(len(candidates))
        lookup = vocab.ids.get
        for i, text in enumerate(candidates):
            words = text.split()
            counts = ngram_counts(words, n)
            # Candidate n-grams are looked up, never registered: unseen ones have df = 0 and match nothing.
            ids.extend(map(lookup, counts, repeat(-1)))
            orders.extend(map(len, counts))
            tfs.extend(counts.values())
            sizes.append(len(counts))
            lengths[i] = self._penalty_length(len(words))
        row_to_cand = np.repeat(np.arange(len(candidates)), sizes)
        ids_arr = np.array(ids, dtype=np.int64)
        known = ids_arr >= 0
        idf = np.full(len(ids_arr), vocab.log_num_docs)
        idf[known] = vocab.idf[ids_arr[known]]
        bucket = row_to_cand * n + np.array(orders, dtype=np.int64) - 1
        weights = np.array(tfs) * idf
        return _CandidateNgrams(row_to_cand, ids_arr, known, bucket, weights, lengths)


@dataclass(frozen=True)
class _CandidateNgrams:
    """Distinct n-grams of a batch of C candidates, one row each (G rows in all).

    row_to_cand: (G,) owning candidate; ids: (G,) vocabulary id or -1; known: (G,) ids >= 0;
    bucket: (G,) candidate * n + order - 1; weights: (G,) tf-idf; lengths: (C,) penalty lengths.
    """

    row_to_cand: np.ndarray
    ids: np.ndarray
    known: np.ndarray
    bucket: np.ndarray
    weights: np.ndarray
    lengths: np.ndarray


class _RefTable:
    """The reference sets of one batch, concatenated and padded to a common reference count."""

    def __init__(self, refsets: list[_RefSet], n: int, vocab_size: int) -> None:
        self.width = max(r.tf.shape[1] for r in refsets)
        self.num_refs = np.array([r.tf.shape[1] for r in refsets])
        self.ids = np.concatenate([r.ids for r in refsets]).astype(np.int64)
        num_rows = [len(r.ids) for r in refsets]
        # Slot-major keys are sorted because each reference set's ids are sorted.
        self._keys = np.repeat(np.arange(len(refsets), dtype=np.int64), num_rows) * vocab_size + self.ids
        self._vocab_size = vocab_size
        self.tf = np.zeros((len(self.ids), self.width))
        self.norms = np.zeros((len(refsets), self.width, n))
        self.lengths = np.zeros((len(refsets), self.width))
        start = 0
        for slot, refset in enumerate(refsets):
            m = refset.tf.shape[1]
            self.tf[start : start + len(refset.ids), :m] = refset.tf
            self.norms[slot, :m] = refset.norms
            self.lengths[slot, :m] = refset.lengths
            start += len(refset.ids)

    def match(self, slots: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For query n-grams (slot, id): indices of those present in their slot's references, and their rows
        in this table."""
        if len(self._keys) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        keys = slots * self._vocab_size + ids
        positions = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        hit = np.flatnonzero(self._keys[positions] == keys)
        return hit, positions[hit]


def _wrapped(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list[str], list[Sequence[str]]]:
    """Candidates and references through :func:`wrap_eos`; references shared by several candidates stay
    one (wrapped) list object, so they are still digested once."""
    for i, text in enumerate(candidates):
        if not isinstance(text, str):
            raise TypeError(f"candidate {i} is not a string: {text!r}")
    by_object: dict[int, list[str]] = {}
    wrapped_refs: list[Sequence[str]] = []
    for i, refs in enumerate(references):
        wrapped = by_object.get(id(refs))
        if wrapped is None:
            wrapped = by_object[id(refs)] = [wrap_eos(r) for r in _checked_refs(refs, f"references[{i}]")]
        wrapped_refs.append(wrapped)
    return [wrap_eos(c) for c in candidates], wrapped_refs


def _check_keys(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str]]) -> None:
    if not res:
        raise ValueError("res is empty: nothing to score")
    if gts.keys() != res.keys():
        missing = [k for k in res if k not in gts][:5]
        extra = [k for k in gts if k not in res][:5]
        raise ValueError(f"gts and res keys differ: only in res {missing}, only in gts {extra} (up to 5 each)")


def _checked_refs(refs: Sequence[str], where: str) -> Sequence[str]:
    if isinstance(refs, str) or len(refs) == 0 or not all(isinstance(r, str) for r in refs):
        raise ValueError(f"{where} must be a non-empty list of reference strings, got {refs!r}")
    return refs
