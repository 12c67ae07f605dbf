"""Benchmark the CIDEr-D reward: metrics.cider.CiderD against a plain per-step scorer.

The workload is one SCST step: B images x (S samples + 1 greedy) candidates, each image with R references,
built from the real captions in the shared predictions file. The baseline is the usual SCST code path: a
scorer built from scratch every step, with the training document frequencies precomputed, that digests each
(candidate, references) pair on its own. Both run in this process on the same inputs.

    python benchmarks/bench_cider.py [--images 64 --samples 16 --refs 5 --repeats 5]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import sys
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from metrics.cider import CiderD  # noqa: E402
from metrics.cider_df import DocumentFrequency  # noqa: E402

COCO_TRAIN_IMAGES = 113_287
PREDICTIONS_NAME = "opg_karpathy_test_predictions.json"


class PlainCiderD:
    """Straightforward CIDEr-D in the structure of pycocoevalcap's CiderScorer: every pair is cooked and
    every reference vector rebuilt for each candidate."""

    def __init__(self, df: DocumentFrequency, n: int = 4, sigma: float = 6.0) -> None:
        self.df, self.n, self.sigma = df, n, sigma
        self.pairs: list[tuple[dict, list[dict]]] = []

    def add(self, candidate: str, refs: Sequence[str]) -> None:
        self.pairs.append((self._cook(candidate), [self._cook(ref) for ref in refs]))

    def _cook(self, sentence: str) -> dict:
        words = sentence.split()
        counts: dict = defaultdict(int)
        for k in range(1, self.n + 1):
            for i in range(len(words) - k + 1):
                counts[tuple(words[i : i + k])] += 1
        return counts

    def _vector(self, counts: dict) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [defaultdict(float) for _ in range(self.n)]
        norm = [0.0] * self.n
        length = 0
        for ngram, tf in counts.items():
            order = len(ngram) - 1
            vec[order][ngram] = tf * (self.df.log_num_docs - np.log(max(1.0, self.df.counts.get(ngram, 0.0))))
            norm[order] += vec[order][ngram] ** 2
            if order == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def _similarity(self, hyp: tuple, ref: tuple) -> np.ndarray:
        (vec_h, norm_h, len_h), (vec_r, norm_r, len_r) = hyp, ref
        val = np.zeros(self.n)
        for order in range(self.n):
            for ngram, weight in vec_h[order].items():
                val[order] += min(weight, vec_r[order][ngram]) * vec_r[order][ngram]
            if norm_h[order] != 0 and norm_r[order] != 0:
                val[order] /= norm_h[order] * norm_r[order]
            val[order] *= np.e ** (-((len_h - len_r) ** 2) / (2 * self.sigma**2))
        return val

    def compute(self) -> np.ndarray:
        scores = []
        for test, refs in self.pairs:
            hyp = self._vector(test)
            total = sum(self._similarity(hyp, self._vector(ref)) for ref in refs)
            scores.append(np.mean(total) / len(refs) * 10.0)
        return np.array(scores)


def shared_dir() -> Path:
    return Path(os.environ.get("OPG_SHARED_DIR", REPO_ROOT.parent / "shared"))


def load_captions(path: Path) -> list[str]:
    """Lower-cased, punctuation-free captions (whitespace-tokenized text)."""
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    captions = [" ".join(re.sub(r"[^a-z0-9 ]", " ", item["caption"].lower()).split()) for item in items]
    return [c for c in captions if c]


def perturb(caption: str, pool: list[str], vocabulary: list[str], rng: random.Random) -> str:
    """A plausible sampled caption: a real caption with one or two edits, or two captions spliced."""
    words = caption.split()
    for _ in range(rng.randint(1, 2)):
        edit = rng.choice(("drop", "replace", "repeat", "truncate", "splice"))
        i = rng.randrange(len(words))
        if edit == "drop" and len(words) > 3:
            del words[i]
        elif edit == "replace":
            words[i] = rng.choice(vocabulary)
        elif edit == "repeat":
            words.insert(i, words[i])
        elif edit == "truncate" and len(words) > 4:
            words = words[: rng.randint(3, len(words) - 1)]
        else:
            other = rng.choice(pool).split()
            words = words[: len(words) // 2] + other[len(other) // 2 :]
    return " ".join(words)


def build_workload(
    captions: list[str], images: int, samples: int, refs: int, seed: int
) -> tuple[list[str], list[list[str]], list[list[str]]]:
    """Candidates, per-candidate references (one shared list per image) and the training reference sets.

    Captions sharing their second word ("man", "kitchen", ...) form an image's reference set, so that
    references agree with each other as real ones do; everything left over is the training corpus.
    """
    rng = random.Random(seed)
    groups: dict[str, list[str]] = defaultdict(list)
    for caption in captions:
        groups[caption.split()[min(1, len(caption.split()) - 1)]].append(caption)
    vocabulary = sorted({w for c in captions for w in c.split()})
    pools = [g for _, g in sorted(groups.items()) if len(g) >= refs + 1]
    rng.shuffle(pools)
    used: set[str] = set()
    candidates: list[str] = []
    references: list[list[str]] = []
    for i in range(images):
        pool = pools[i % len(pools)]
        chosen = rng.sample(pool, refs + 1)
        image_refs, seed_caption = chosen[:refs], chosen[refs]
        used.update(chosen)
        for s in range(samples + 1):
            # Index 0 plays the greedy caption: one light edit of an unseen caption of the same group.
            base = seed_caption if s == 0 else rng.choice(chosen)
            candidates.append(perturb(base, pool, vocabulary, rng))
            references.append(image_refs)
    rest = [c for c in captions if c not in used]
    training = [rest[i : i + refs] for i in range(0, len(rest) - refs + 1, refs)]
    return candidates, references, training


def measure(rounds: int, methods: dict[str, Callable[[], np.ndarray]]) -> dict[str, tuple[float, np.ndarray]]:
    """Median wall time and last result of each method, run in interleaved rounds so that load from other
    processes on the machine affects all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, np.ndarray] = {}
    for _ in range(rounds):
        for name, fn in methods.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in methods}


def cache_bytes_per_set(df: DocumentFrequency, reference_sets: list[list[str]]) -> float:
    scorer = CiderD(df, cache_size=len(reference_sets))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    scorer.precompute(reference_sets)
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return (after - before) / scorer.num_cached


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--predictions", type=Path, default=None, help=f"default: <shared>/{PREDICTIONS_NAME}")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16, help="sampled captions per image (plus 1 greedy)")
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    path = args.predictions or shared_dir() / PREDICTIONS_NAME
    if not path.is_file():
        print(f"predictions file not found: {path} (set OPG_SHARED_DIR or pass --predictions)", file=sys.stderr)
        return 1
    captions = load_captions(path)
    candidates, references, training = build_workload(captions, args.images, args.samples, args.refs, args.seed)
    df = DocumentFrequency.from_references(training)
    num = len(candidates)

    def baseline() -> np.ndarray:
        scorer = PlainCiderD(df)
        for candidate, refs in zip(candidates, references, strict=True):
            scorer.add(candidate, refs)
        return scorer.compute()

    fresh: list[CiderD] = []

    def cold() -> np.ndarray:
        return fresh.pop().score_candidates(candidates, references)

    build_start = time.perf_counter()
    warm = CiderD(df)
    build_s = time.perf_counter() - build_start
    fresh.extend(CiderD(df) for _ in range(args.repeats))
    warm.score_candidates(candidates, references)
    figures = measure(
        args.repeats,
        {
            "plain CiderD, rebuilt every step": baseline,
            "CiderD, cold cache (first call)": cold,
            "CiderD, warm cache": lambda: warm.score_candidates(candidates, references),
        },
    )
    per_set = cache_bytes_per_set(df, [captions[i : i + args.refs] for i in range(0, len(captions), args.refs)])

    distinct = len(set(zip(candidates, map(id, references), strict=True)))
    print(
        f"CIDEr-D reward: {args.images} images x ({args.samples} samples + 1 greedy) = {num} candidates "
        f"({distinct} distinct), {args.refs} references each; "
        f"df from {len(training)} training reference sets; median of {args.repeats} rounds"
    )
    print(f"{'scorer':<36}{'ms/step':>10}{'cand/s':>10}{'speed-up':>10}{'max |diff|':>12}")
    t_base, base_scores = figures["plain CiderD, rebuilt every step"]
    worst = 0.0
    for name, (seconds, scores) in figures.items():
        diff = float(np.max(np.abs(scores - base_scores)))
        worst = max(worst, diff)
        print(f"{name:<36}{seconds * 1e3:>10.1f}{num / seconds:>10.0f}{t_base / seconds:>9.1f}x{diff:>12.1e}")
    print(f"mean reward {float(np.mean(base_scores)):.4f}")
    print(f"scorer set-up (df -> n-gram ids, once per run): {build_s * 1e3:.1f} ms, not in the cold figure")
    print(
        f"reference cache: {per_set / 1024:.2f} KiB per {args.refs}-reference set -> "
        f"{per_set * COCO_TRAIN_IMAGES / 2**20:.0f} MiB for {COCO_TRAIN_IMAGES} COCO train images"
    )
    if worst > 1e-9:
        print(f"MISMATCH: scores differ from the plain scorer by up to {worst:.3g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
