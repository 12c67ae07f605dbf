"""CIDEr-D reward: agreement with a plain implementation of the formula, the df cache files, the scorer cache.

Text comes from the real captions in the shared predictions file; the shared folder is ``$OPG_SHARED_DIR`` or
``<repo>/../shared``.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import pickle
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED

from metrics.cider import CiderD
from metrics.cider_df import DocumentFrequency

PREDICTIONS_NAME = "opg_karpathy_test_predictions.json"
TOLERANCE = 1e-9


# A plain implementation of CIDEr-D (coco-caption's CiderD), written for readability, not speed.


def plain_ngrams(sentence: str, n: int) -> dict[tuple[str, ...], int]:
    words = sentence.split()
    counts: dict[tuple[str, ...], int] = {}
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            gram = tuple(words[i : i + k])
            counts[gram] = counts.get(gram, 0) + 1
    return counts


def plain_document_frequency(reference_sets: list[list[str]], n: int) -> tuple[dict, float]:
    df: dict[tuple[str, ...], float] = {}
    for refs in reference_sets:
        for gram in {g for ref in refs for g in plain_ngrams(ref, n)}:
            df[gram] = df.get(gram, 0.0) + 1.0
    return df, math.log(len(reference_sets))


def plain_vectors(sentence: str, df: dict, log_n: float, n: int) -> tuple[list[dict], list[float], int]:
    """Per-order tf-idf vectors, their norms, and the length used by the penalty (bigram count)."""
    vectors: list[dict] = [{} for _ in range(n)]
    length = 0
    for gram, tf in plain_ngrams(sentence, n).items():
        vectors[len(gram) - 1][gram] = tf * (log_n - math.log(max(1.0, df.get(gram, 0.0))))
        if len(gram) == 2:
            length += tf
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vectors]
    return vectors, norms, length


def plain_cider_d(candidate: str, refs: list[str], df: dict, log_n: float, n: int = 4, sigma: float = 6.0) -> float:
    cand_vecs, cand_norms, cand_len = plain_vectors(candidate, df, log_n, n)
    per_order = [0.0] * n
    for ref in refs:
        ref_vecs, ref_norms, ref_len = plain_vectors(ref, df, log_n, n)
        penalty = math.exp(-((cand_len - ref_len) ** 2) / (2 * sigma**2))
        for k in range(n):
            overlap = sum(min(v, ref_vecs[k].get(g, 0.0)) * ref_vecs[k].get(g, 0.0) for g, v in cand_vecs[k].items())
            if cand_norms[k] != 0 and ref_norms[k] != 0:
                overlap /= cand_norms[k] * ref_norms[k]
            per_order[k] += overlap * penalty
    return sum(per_order) / n / len(refs) * 10.0


# Data from the shared predictions.


@pytest.fixture(scope="module")
def captions() -> list[str]:
    """Real captions, tokenized: lower case, punctuation removed, " ." appended as the project's text does."""
    path = SHARED / PREDICTIONS_NAME
    if not path.is_file():
        pytest.fail(f"shared predictions file not found: {path} (set OPG_SHARED_DIR to the shared folder)")
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    texts = [" ".join(re.sub(r"[^a-z0-9 ]", " ", item["caption"].lower()).split()) for item in items]
    # Sorting groups captions of similar scenes ("a man riding ...") so neighbours make plausible references.
    return sorted(f"{t} ." for t in texts if t)


@pytest.fixture(scope="module")
def split(captions: list[str]) -> tuple[dict[int, list[str]], dict[int, list[str]], list[list[str]]]:
    """(gts, res, training reference sets). Evaluation items take every other window of neighbours, with
    2 to 6 references; the training sets are built from the other captions."""
    gts: dict[int, list[str]] = {}
    res: dict[int, list[str]] = {}
    training: list[list[str]] = []
    for i in range(0, len(captions) - 7, 7):
        window = captions[i : i + 7]
        if (i // 7) % 2 == 0:
            num_refs = 2 + (i // 7) % 5
            gts[i] = window[1 : 1 + num_refs]
            res[i] = [window[0]]
        else:
            training.append(window[:5])
    return gts, res, training


def plain_scores(gts: dict, res: dict, df: dict, log_n: float, n: int = 4, sigma: float = 6.0) -> np.ndarray:
    return np.array([plain_cider_d(res[k][0], gts[k], df, log_n, n, sigma) for k in res])


# Agreement with the plain implementation.


def test_corpus_mode_matches_plain_implementation(split) -> None:
    gts, res, _ = split
    mean, scores = CiderD().compute_score(gts, res)
    df, log_n = plain_document_frequency([gts[k] for k in res], 4)
    expected = plain_scores(gts, res, df, log_n)
    assert scores.shape == (len(res),)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=TOLERANCE)
    assert mean == pytest.approx(float(np.mean(expected)), abs=TOLERANCE)
    assert expected.max() > 1.0, "the data should contain real overlaps"


def test_corpus_mode_matches_installed_pycocoevalcap(split) -> None:
    """The installed pycocoevalcap Cider has the clipping and the length penalty too, with corpus df."""
    from pycocoevalcap.cider.cider import Cider

    gts, res, _ = split
    expected_mean, expected = Cider().compute_score(gts, res)
    mean, scores = CiderD().compute_score(gts, res)
    np.testing.assert_allclose(scores, expected, rtol=0, atol=TOLERANCE)
    assert mean == pytest.approx(expected_mean, abs=TOLERANCE)


@pytest.mark.parametrize(("n", "sigma"), [(4, 6.0), (3, 2.0), (2, 1.0), (1, 6.0)])
def test_precomputed_df_matches_plain_implementation(split, n: int, sigma: float) -> None:
    gts, res, training = split
    df = DocumentFrequency.from_references(training)
    plain_df, plain_log_n = plain_document_frequency(training, 4)
    assert df.counts == plain_df
    assert df.log_num_docs == pytest.approx(plain_log_n, abs=1e-15)
    _, scores = CiderD(df, n=n, sigma=sigma).compute_score(gts, res)
    np.testing.assert_allclose(scores, plain_scores(gts, res, plain_df, plain_log_n, n, sigma), rtol=0, atol=TOLERANCE)


class _CorpusOfSize(list):
    """A list that reports ``size`` as its length: pycocoevalcap's compute_cider takes its idf denominator
    from ``len(self.crefs)``, and iterates the references themselves, so this gives it the training
    corpus's document count while it scores the evaluation items."""

    def __init__(self, items: list, size: int) -> None:
        super().__init__(items)
        self.size = size

    def __len__(self) -> int:
        return self.size


def test_precomputed_df_matches_pycocoevalcap_cider_scorer(split, captions) -> None:
    """SCST mode (training document frequencies) against pycocoevalcap's own CiderScorer code, which
    computes the frequencies itself from the training references and scores with them."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    gts, res, training = split
    corpus = CiderScorer(n=4, sigma=6.0)
    for refs in training:
        corpus += (None, refs)
    corpus.compute_doc_freq()
    keys = list(res)[:60]
    candidates = [res[k][0] for k in keys] + [captions[j] for j in range(len(keys))]
    references = [gts[k] for k in keys] * 2
    oracle = CiderScorer(n=4, sigma=6.0)
    for candidate, refs in zip(candidates, references, strict=True):
        oracle += (candidate, refs)
    oracle.document_frequency = corpus.document_frequency
    oracle.crefs = _CorpusOfSize(oracle.crefs, len(training))
    expected = np.array(oracle.compute_cider())
    assert oracle.ref_len == pytest.approx(math.log(len(training)), abs=1e-15)

    df = DocumentFrequency.from_references(training)
    assert df.counts == {ngram: count for ngram, count in corpus.document_frequency.items() if count}
    np.testing.assert_allclose(CiderD(df).score_candidates(candidates, references), expected, rtol=0, atol=TOLERANCE)
    _, scores = CiderD(df).compute_score({k: gts[k] for k in keys}, {k: res[k] for k in keys})
    np.testing.assert_allclose(scores, expected[: len(keys)], rtol=0, atol=TOLERANCE)
    assert expected.max() > 1.0 and (expected == 0).sum() < len(expected) // 2, "the data should overlap"


def test_scst_batch_matches_per_item_scores(split, captions) -> None:
    """SCST layout: several candidates (with repeats) per image share one references list."""
    gts, res, training = split
    df = DocumentFrequency.from_references(training)
    keys = list(res)[:40]
    candidates, references = [], []
    for j, key in enumerate(keys):
        samples = [res[key][0], captions[j], captions[j + 1], res[key][0], gts[key][0], ""]
        candidates.extend(samples)
        references.extend([gts[key]] * len(samples))
    scores = CiderD(df).score_candidates(candidates, references)
    expected = [plain_cider_d(c, r, df.counts, df.log_num_docs) for c, r in zip(candidates, references, strict=True)]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=TOLERANCE)


# The reference cache.


def test_cache_reuse_gives_identical_scores(split) -> None:
    gts, res, training = split
    df = DocumentFrequency.from_references(training)
    candidates = [res[k][0] for k in res]
    references = [gts[k] for k in res]
    scorer = CiderD(df)
    first = scorer.score_candidates(candidates, references)
    assert scorer.num_cached == len({tuple(r) for r in references})
    second = scorer.score_candidates(candidates, [list(r) for r in references])  # equal content, new objects
    uncached = CiderD(df, cache_size=0).score_candidates(candidates, references)
    assert np.array_equal(first, second)
    assert np.array_equal(first, uncached)

    small = CiderD(df, cache_size=5)
    assert np.array_equal(small.score_candidates(candidates, references), first)
    assert small.num_cached == 5

    precomputed = CiderD(df)
    assert precomputed.precompute(gts.values()) == len({tuple(r) for r in gts.values()})
    assert precomputed.precompute(gts.values()) == 0
    assert np.array_equal(precomputed.score_candidates(candidates, references), first)


# Behaviour of the score.


def test_candidate_identical_to_references_scores_highest(split) -> None:
    gts, res, training = split
    df = DocumentFrequency.from_references(training)
    scorer = CiderD(df)
    target = "a man riding a red motorcycle down a dirt road ."
    random_caption = "a plate of food with broccoli and rice on a table ."
    scores = scorer.score_candidates([target, random_caption], [[target] * 5, [target] * 5])
    # Identical to every reference: each order's cosine is 1, so the score is exactly 10.
    assert scores[0] == pytest.approx(10.0, abs=TOLERANCE)
    assert scores[1] < 1.0
    keys = list(res)[:30]
    perfect = scorer.score_candidates([gts[k][0] for k in keys], [[gts[k][0]] for k in keys])
    np.testing.assert_allclose(perfect, 10.0, atol=TOLERANCE)


def test_edge_cases_match_plain_implementation(split) -> None:
    _, _, training = split
    df = DocumentFrequency.from_references(training)
    refs = ["a man riding a motorcycle .", "a man on a motorcycle", "man", ""]
    candidates = ["", "man", "a man", "a man riding", "zebra zebra zebra", "a man riding a motorcycle ."]
    scores = CiderD(df).score_candidates(candidates, [refs] * len(candidates))
    expected = [plain_cider_d(c, refs, df.counts, df.log_num_docs) for c in candidates]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=TOLERANCE)
    assert scores[0] == 0.0
    assert scores[4] == 0.0
    assert 0 < scores[2] < scores[3] < scores[5]


def test_corpus_mode_with_single_item() -> None:
    """One document: every reference n-gram has idf log(1) - log(1) = 0, so everything scores 0."""
    mean, scores = CiderD().compute_score({"x": ["a dog ."]}, {"x": ["a dog ."]})
    assert mean == 0.0
    assert scores.tolist() == [0.0]


def test_input_validation() -> None:
    scorer = CiderD()
    with pytest.raises(ValueError, match="keys differ"):
        scorer.compute_score({1: ["a"], 2: ["b"]}, {1: ["a"], 3: ["b"]})
    with pytest.raises(ValueError, match=r"res\[1\].*exactly one"):
        scorer.compute_score({1: ["a"]}, {1: ["a", "b"]})
    with pytest.raises(ValueError, match=r"res\[1\].*exactly one"):
        scorer.compute_score({1: ["a"]}, {1: "a"})
    with pytest.raises(ValueError, match=r"gts\[1\]"):
        scorer.compute_score({1: []}, {1: ["a"]})
    with pytest.raises(ValueError, match="2 candidates but 1"):
        scorer.score_candidates(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="up to 2"):
        CiderD(DocumentFrequency.from_references([["a b"]], n=2), n=4)
    assert scorer.score_candidates([], []).shape == (0,)


# Document-frequency files.


def test_document_frequency_round_trip(tmp_path: Path, split) -> None:
    _, _, training = split
    df = DocumentFrequency.from_references(training)
    path = tmp_path / "df.json.gz"
    df.save(path)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert [p.name for p in tmp_path.iterdir()] == ["df.json.gz"]
    loaded = DocumentFrequency.load(path)
    assert loaded.counts == df.counts
    assert loaded.log_num_docs == df.log_num_docs
    assert loaded.n == df.n
    assert CiderD(path).score_candidates(["a man ."], [training[0]])[0] == pytest.approx(
        CiderD(df).score_candidates(["a man ."], [training[0]])[0], abs=0
    )


@pytest.mark.parametrize("protocol", [2, pickle.DEFAULT_PROTOCOL])
def test_load_self_critical_pickle(tmp_path: Path, split, protocol: int) -> None:
    """A coco-train-words.p look-alike: defaultdict(float) document frequencies of '<eos>'-terminated
    references and ref_len = the raw number of images (the readers take its log)."""
    gts, res, training = split
    eos_training = [[f"{ref} <eos>" for ref in refs] for refs in training]
    frequencies: defaultdict = defaultdict(float)
    plain_df, _ = plain_document_frequency(eos_training, 4)
    frequencies.update(plain_df)
    path = tmp_path / "coco-train-words.p"
    with open(path, "wb") as f:
        pickle.dump({"document_frequency": frequencies, "ref_len": len(eos_training)}, f, protocol=protocol)

    loaded = DocumentFrequency.load(path)
    assert loaded.log_num_docs == pytest.approx(math.log(len(eos_training)), abs=1e-15)
    assert loaded.n == 4
    assert loaded.counts == plain_df
    candidates = [f"{res[k][0]} <eos>" for k in res]
    references = [[f"{ref} <eos>" for ref in gts[k]] for k in res]
    expected = [
        plain_cider_d(c, r, plain_df, math.log(len(eos_training))) for c, r in zip(candidates, references, strict=True)
    ]
    np.testing.assert_allclose(CiderD(path).score_candidates(candidates, references), expected, atol=TOLERANCE)


def test_load_idxs_pickle_with_integer_tokens(tmp_path: Path) -> None:
    path = tmp_path / "coco-train-idxs.p"
    with open(path, "wb") as f:
        pickle.dump({"document_frequency": {("3", "0"): 2.0, (7,): 1.0}, "ref_len": 2}, f, protocol=2)
    loaded = DocumentFrequency.load(path)
    assert loaded.counts == {("3", "0"): 2.0, ("7",): 1.0}
    assert loaded.n == 2


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_load_refuses_malicious_pickle(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "coco-train-words.p"
    path.write_bytes(pickle.dumps({"document_frequency": {}, "ref_len": _Exploit(marker)}))
    with pytest.raises(ValueError, match=r"coco-train-words\.p.*refusing to load global .*system"):
        DocumentFrequency.load(path)
    assert not marker.exists()


_BAD_FREQUENCY_FILES = [
    ("garbage.p", b"\x00\x01not a pickle", "not a readable document-frequency file"),
    ("empty.json", b"", "not a readable"),
    ("truncated.json.gz", gzip.compress(b'{"format": "cider-document-frequency"', mtime=0)[:-6], "not a readable"),
    ("other.json", json.dumps({"format": "something else"}).encode(), "not a 'cider-document-frequency'"),
    ("logged.p", pickle.dumps({"document_frequency": {("a",): 5.0}, "ref_len": 1.6}), "raw number"),
    ("no_ref_len.p", pickle.dumps({"document_frequency": {("a",): 1.0}}), "'ref_len'"),
    ("bad_key.p", pickle.dumps({"document_frequency": {"a": 1.0}, "ref_len": 3}), "n-gram key 'a'"),
    ("bad_count.p", pickle.dumps({"document_frequency": {("a",): "x"}, "ref_len": 3}), "non-negative"),
]


@pytest.mark.parametrize(
    ("name", "content", "message"), _BAD_FREQUENCY_FILES, ids=[case[0] for case in _BAD_FREQUENCY_FILES]
)
def test_load_errors_name_the_file(tmp_path: Path, name: str, content: bytes, message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(name) + ".*" + re.escape(message)):
        DocumentFrequency.load(path)


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.p"):
        DocumentFrequency.load(tmp_path / "absent.p")


def test_batch_without_any_shared_ngram_scores_zero():
    df = DocumentFrequency.from_references([["a red circle", "a blue square"], ["two stars here"]])
    scores = CiderD(df).score_candidates(["zebra", "quokka wombat"], [["a red circle"], ["two stars here"]])
    assert scores.dtype == np.float64 and scores.tolist() == [0.0, 0.0]


# The reference reward's sentence form: "words <eos>".


def paper_wrap(sentence: str) -> str:
    """The reference code's _wrap_sentence: strip, drop one trailing '.', append ' <eos>'."""
    r = sentence.strip()
    if r.endswith("."):
        r = r[:-1]
    return r + " <eos>"


def test_append_eos_scores_as_the_reference_reward(tmp_path: Path, split) -> None:
    gts, res, training = split
    wrapped_training = [[paper_wrap(ref) for ref in refs] for refs in training]
    plain_df, log_n = plain_document_frequency(wrapped_training, 4)
    path = tmp_path / "coco-train-words.p"
    with open(path, "wb") as f:
        pickle.dump({"document_frequency": defaultdict(float, plain_df), "ref_len": len(training)}, f, protocol=2)
    expected = [plain_cider_d(paper_wrap(res[k][0]), [paper_wrap(r) for r in gts[k]], plain_df, log_n) for k in res]
    for df in (path, DocumentFrequency.from_references(training, append_eos=True)):
        mean, scores = CiderD(df, append_eos=True).compute_score(gts, res)
        np.testing.assert_allclose(scores, expected, rtol=0, atol=TOLERANCE)
        assert mean == pytest.approx(float(np.mean(expected)), abs=TOLERANCE)
    assert DocumentFrequency.from_references(training, append_eos=True).counts == plain_df
    corpus_df, corpus_log_n = plain_document_frequency([[paper_wrap(r) for r in gts[k]] for k in res], 4)
    corpus = [
        plain_cider_d(paper_wrap(res[k][0]), [paper_wrap(r) for r in gts[k]], corpus_df, corpus_log_n) for k in res
    ]
    np.testing.assert_allclose(CiderD(append_eos=True).compute_score(gts, res)[1], corpus, rtol=0, atol=TOLERANCE)


def test_append_eos_tells_a_cut_caption_from_a_finished_one() -> None:
    references = [
        "a man riding a horse on a beach.",
        "a person rides a brown horse along the shore.",
        "a man riding a horse near the ocean.",
        "a rider on a horse at the beach.",
        "a man is riding a horse by the water.",
    ]
    training = [references, ["a dog on a couch."], ["two cats sleeping on a bed."], ["a plate of food."]]
    cider = CiderD(DocumentFrequency.from_references(training, append_eos=True), append_eos=True)
    finished, cut = cider.score_candidates(["a man riding a horse.", "a man riding a"], [references, references])
    assert cut < finished
    with pytest.raises(ValueError, match="<eos>"):
        CiderD(DocumentFrequency.from_references(training), append_eos=True)


# Precomputing the cache, and wrapped references digested once.


def test_precompute_fills_the_cache_and_warns_when_it_cannot_hold_everything(split, caplog) -> None:
    _, _, training = split
    df = DocumentFrequency.from_references(training)
    three = [["a dog ."], ["a cat ."], ["two birds ."]]
    with caplog.at_level("WARNING", logger="metrics.cider"):
        assert CiderD(df, cache_size=3).precompute(three) == 3
        assert caplog.messages == []
        small = CiderD(df, cache_size=2)
        assert small.precompute(three) == 2 and small.num_cached == 2
    assert caplog.messages == ["precomputed 3 reference sets but the cache keeps 2"]
    with pytest.raises(
        ValueError, match=r"^precompute needs precomputed document frequencies \(df=None is corpus mode\)$"
    ):
        CiderD().precompute(three)
    with pytest.raises(ValueError, match=r"^precompute item must be a non-empty list of reference strings, got \[\]$"):
        CiderD(df).precompute([["a dog ."], []])


def test_wrapped_references_shared_by_candidates_are_digested_once(split, monkeypatch) -> None:
    """With ``append_eos`` the references are rewritten; those one list object serves (an image's samples)
    stay one object, so that they are digested once per call, not once per candidate."""
    _, _, training = split
    df = DocumentFrequency.from_references(training, append_eos=True)
    digested = []
    digest = CiderD._digest
    monkeypatch.setattr(CiderD, "_digest", lambda self, refs, vocab: digested.append(refs) or digest(self, refs, vocab))
    refs_a, refs_b = ["a man riding a horse"], ["a plate of food"]
    candidates = ["a man .", "a horse .", "a man riding .", "food .", "a plate ."]
    scorer = CiderD(df, cache_size=0, append_eos=True)
    scores = scorer.score_candidates(candidates, [refs_a, refs_a, refs_a, refs_b, refs_b])
    assert digested == [["a man riding a horse <eos>"], ["a plate of food <eos>"]]
    pairs = zip(candidates, [refs_a] * 3 + [refs_b] * 2, strict=True)
    one_by_one = [scorer.score_candidates([c], [list(r)])[0] for c, r in pairs]
    assert scores.tolist() == one_by_one and min(scores) > 0
    with pytest.raises(TypeError, match=r"^candidate 1 is not a string: None$"):
        scorer.score_candidates(["a man .", None], [refs_a, refs_a])


def test_input_errors_name_what_is_wrong() -> None:
    """Whole messages: the keys only one side has (five at most each), the empty request, the bad item."""
    scorer = CiderD()
    gts = {k: ["a"] for k in range(10)}
    res = {k: ["a"] for k in range(7, 20)}
    only = r"only in res \[10, 11, 12, 13, 14\], only in gts \[0, 1, 2, 3, 4\] \(up to 5 each\)$"
    with pytest.raises(ValueError, match=r"^gts and res keys differ: " + only):
        scorer.compute_score(gts, res)
    with pytest.raises(ValueError, match=r"^res is empty: nothing to score$"):
        scorer.compute_score({}, {})
    with pytest.raises(ValueError, match=r"^res\[1\] must be a list holding exactly one caption, got \['a', 'b'\]$"):
        scorer.compute_score({1: ["a"]}, {1: ["a", "b"]})
    bad = r"^references\[1\] must be a non-empty list of reference strings, got \[\]$"
    with pytest.raises(ValueError, match=bad):
        CiderD(append_eos=True).score_candidates(["a dog", "a cat"], [["a dog"], []])
    with pytest.raises(ValueError, match=bad):
        CiderD().score_candidates(["a dog", "a cat"], [["a dog"], []])
    with pytest.raises(ValueError, match=bad):
        CiderD(DocumentFrequency.from_references([["a dog"]])).score_candidates(["a dog", "a cat"], [["a dog"], []])
    with pytest.raises(TypeError, match=r"^candidate 1 is not a string: None$"):
        CiderD().score_candidates(["a dog", None], [["a dog"], ["a cat"]])


def test_reference_ngrams_missing_from_the_frequencies_get_their_own_weight() -> None:
    """n-grams of the references that the document frequencies never counted get df 0 (weight log N), each
    under an id of its own, also next to n-grams that every document has (weight 0)."""
    # Three documents; the last n-gram counted is in every one of them.
    df = DocumentFrequency({("c",): 1.0, ("a",): 3.0, ("b",): 3.0, ("a", "b"): 3.0}, math.log(3), n=2)
    refs = ["x y a b c", "y x x"]
    candidates = ["x", "x y", "y x a b", "a b", "b c"]  # "c": the first n-gram counted, id 0
    scores = CiderD(df, n=2).score_candidates(candidates, [refs] * 5)
    expected = [plain_cider_d(c, refs, df.counts, df.log_num_docs, n=2) for c in candidates]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=TOLERANCE)
    assert min(expected[:3]) > 0


def test_the_cache_digests_each_reference_set_once_and_forgets_the_least_recently_used(split, monkeypatch) -> None:
    _, _, training = split
    df = DocumentFrequency.from_references(training)
    digested = []
    digest = CiderD._digest
    monkeypatch.setattr(
        CiderD, "_digest", lambda self, refs, vocab: digested.append(refs[0]) or digest(self, refs, vocab)
    )
    scorer = CiderD(df, cache_size=2)
    for name in ("a dog .", "a cat .", "a dog .", "a bird .", "a dog .", "a cat ."):
        scorer.score_candidates(["a dog ."], [[name]])  # a new list object each time, with equal contents
    # "a cat ." was the least recently used when "a bird ." came in, so it alone is digested again.
    assert digested == ["a dog .", "a cat .", "a bird .", "a cat ."]
    assert scorer.num_cached == 2


def test_each_reference_list_and_each_candidate_pair_is_worked_on_once(split, monkeypatch) -> None:
    """Candidates sharing one references object (SCST's samples of an image) share one digest, and a
    sample drawn twice is scored once; the scores are those of scoring each alone."""
    _, _, training = split
    df = DocumentFrequency.from_references(training)
    digested, scored = [], []
    digest, ngrams = CiderD._digest, CiderD._candidate_ngrams
    monkeypatch.setattr(
        CiderD, "_digest", lambda self, refs, vocab: digested.append(refs[0]) or digest(self, refs, vocab)
    )
    monkeypatch.setattr(
        CiderD, "_candidate_ngrams", lambda self, texts, vocab: scored.append(list(texts)) or ngrams(self, texts, vocab)
    )
    dog, cat = ["a dog on a couch ."], ["a cat on a bed ."]
    candidates = ["a dog .", "a dog on a bed .", "a dog .", "a cat .", "a dog ."]
    scorer = CiderD(df, cache_size=0)
    scores = scorer.score_candidates(candidates, [dog, dog, dog, cat, cat])
    assert digested == ["a dog on a couch .", "a cat on a bed ."] and scorer.num_cached == 0
    assert scored == [["a dog .", "a dog on a bed .", "a cat .", "a dog ."]]
    alone = [CiderD(df).score_candidates([c], [r])[0] for c, r in zip(candidates, [dog] * 3 + [cat] * 2, strict=True)]
    assert scores.tolist() == alone and scores[0] == scores[2] and scores[0] != scores[4]
    one = CiderD(df, cache_size=1)
    one.score_candidates(candidates, [dog, dog, dog, cat, cat])
    assert one.num_cached == 1


def test_corpus_mode_caches_nothing_between_calls(split) -> None:
    """Corpus mode takes its frequencies from each call's references: a second call with other references
    (one list shared with the first) scores as a fresh scorer does."""
    gts, res, _ = split
    keys = list(res)
    first = {k: gts[k] for k in keys[:20]}, {k: res[k] for k in keys[:20]}
    second = {k: gts[k] for k in keys[10:40]}, {k: res[k] for k in keys[10:40]}
    scorer = CiderD()
    scorer.compute_score(*first)
    assert scorer.num_cached == 0
    np.testing.assert_array_equal(scorer.compute_score(*second)[1], CiderD().compute_score(*second)[1])


@pytest.mark.parametrize("repeats", [255, 256, 300])
def test_an_ngram_repeated_hundreds_of_times_is_counted_in_full(split, repeats: int) -> None:
    """Term frequencies of 256 and more (beyond the cache's compact 8-bit table), and a reference set whose
    only sentence is empty (no n-gram at all)."""
    _, _, training = split
    df = DocumentFrequency.from_references(training)
    refs = [" ".join(["dog"] * repeats) + " .", "a dog ."]
    candidates = ["dog dog dog .", " ".join(["dog"] * repeats) + " ."]
    scores = CiderD(df).score_candidates(candidates, [refs, refs])
    expected = [plain_cider_d(c, refs, df.counts, df.log_num_docs) for c in candidates]
    np.testing.assert_allclose(scores, expected, rtol=0, atol=TOLERANCE)
    assert CiderD(df).score_candidates(["a dog ."], [[""]]).tolist() == [0.0]


def test_the_metric_is_named_as_pycocoevalcap_names_it() -> None:
    assert CiderD().method() == "CIDEr-D"


def test_a_batch_with_one_reference_ngram_or_none() -> None:
    """The smallest reference tables: one n-gram (a one-word reference, unigrams only) scores the identical
    candidate 10; none (an empty reference) scores 0."""
    df = DocumentFrequency({("cat",): 1.0}, math.log(2), n=1)
    assert CiderD(df, n=1).score_candidates(["dog", "cat"], [["dog"], ["dog"]]).tolist() == [10.0, 0.0]
    assert CiderD(df, n=1).score_candidates(["dog"], [[""]]).tolist() == [0.0]


def test_a_batch_of_empty_candidates_scores_zero() -> None:
    """No candidate has an n-gram (a model that stops at once): every score is 0, none is undefined."""
    refs = [["a red circle", "a blue square"], ["two stars here"]]
    scores = CiderD(DocumentFrequency.from_references(refs)).score_candidates(["", " "], refs)
    assert scores.dtype == np.float64 and scores.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    ("settings", "wrong"),
    [({"n": 0}, "n=0, sigma=6.0, cache_size=150000"), ({"sigma": 0.0}, "n=4, sigma=0.0, cache_size=150000"),
     ({"cache_size": -1}, "n=4, sigma=6.0, cache_size=-1")],
)  # fmt: skip
def test_settings_out_of_range_are_refused(settings: dict, wrong: str) -> None:
    with pytest.raises(ValueError, match=rf"^need n >= 1, sigma > 0, cache_size >= 0; got {wrong}$"):
        CiderD(**settings)


def test_small_positive_sigmas_and_no_candidates_are_accepted() -> None:
    assert CiderD(sigma=0.5).sigma == 0.5 and CiderD(n=1, cache_size=0).n == 1
    empty = CiderD().score_candidates([], [])
    assert empty.shape == (0,) and empty.dtype == np.float64
