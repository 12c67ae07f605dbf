"""How diverse captions are: distinct captions, vocabulary, novelty, distinct-n and mBLEU-4.

Every figure is computed on the tokens the COCO scorers see (``metrics.tokenize``: PTB tokens, lowercase, no
punctuation); the functions here take captions already tokenised that way (tokens joined by spaces).

One caption per image (:func:`caption_diversity`):

- distinct captions: distinct captions / images; vocabulary: distinct tokens over all captions;
- novel: share of captions that are not among the training captions;
- distinct-n (Li et al., NAACL 2016, on n-grams): distinct n-grams / all n-grams, over all captions.

Several captions per image (:func:`set_diversity`, e.g. ``predict.py --num_captions K``):

- mBLEU-4 (Shetty et al., ICCV 2017): each caption's BLEU-4 (pycocoevalcap's ``Bleu``, per caption) against
  the other captions of its image, averaged over all captions; lower is more diverse;
- distinct-n within each image's set of captions, averaged over images.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pycocoevalcap.bleu.bleu import Bleu

from metrics.tokenize import ptb_tokenize


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The ``n``-grams of one caption's tokens, in order (none when it is shorter than ``n``)."""
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(captions: Iterable[str], n: int) -> float:
    """Distinct ``n``-grams / all ``n``-grams over ``captions`` (n-grams never span two captions);
    0.0 when the captions hold no ``n``-gram."""
    counts: Counter[tuple[str, ...]] = Counter()
    for caption in captions:
        counts.update(ngrams(caption.split(), n))
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


@dataclass
class Diversity:
    """Diversity of one caption per image. ``novel`` is None without training captions."""

    images: int
    distinct: int  # distinct captions
    distinct_captions: float  # distinct / images
    vocabulary: int
    distinct_1: float
    distinct_2: float
    most_repeated: str
    most_repeated_count: int
    novel: float | None = None

    def scalars(self) -> dict[str, float]:
        """The figures a metrics log or dashboard plots (``distinct_captions``, ``vocabulary``, ...)."""
        values = {"distinct_captions": self.distinct_captions, "vocabulary": float(self.vocabulary),
                  "distinct-1": self.distinct_1, "distinct-2": self.distinct_2}  # fmt: skip
        if self.novel is not None:
            values["novel"] = self.novel
        return values

    def format_lines(self) -> list[str]:
        lines = [
            f"{'distinct captions':<22}{self.distinct_captions * 100:8.2f}%  ({self.distinct} of {self.images})",
            f"{'vocabulary':<22}{self.vocabulary:8d}   words",
            f"{'distinct-1':<22}{self.distinct_1 * 100:8.2f}%",
            f"{'distinct-2':<22}{self.distinct_2 * 100:8.2f}%",
        ]
        if self.novel is not None:
            lines.append(f"{'novel captions':<22}{self.novel * 100:8.2f}%  (not among the training captions)")
        lines.append(f"{'most repeated':<22}{self.most_repeated_count:8d}x  '{self.most_repeated}'")
        return lines


def caption_diversity(captions: Sequence[str], training: Collection[str] | None = None) -> Diversity:
    """Diversity of ``captions`` (one per image, PTB-tokenised); ``training``: the training captions,
    tokenised the same way, for the novel share."""
    if not captions:
        raise ValueError("no captions to measure")
    counts = Counter(captions)
    most_repeated, count = counts.most_common(1)[0]
    novel = None
    if training is not None:
        known = training if isinstance(training, set | frozenset) else set(training)
        novel = sum(caption not in known for caption in captions) / len(captions)
    return Diversity(
        images=len(captions),
        distinct=len(counts),
        distinct_captions=len(counts) / len(captions),
        vocabulary=len({token for caption in counts for token in caption.split()}),
        distinct_1=distinct_n(captions, 1),
        distinct_2=distinct_n(captions, 2),
        most_repeated=most_repeated,
        most_repeated_count=count,
        novel=novel,
    )


@dataclass
class SetDiversity:
    """Diversity within each image's set of captions, averaged over images (mBLEU-4 over all captions)."""

    images: int
    captions: int  # captions in all sets
    mbleu_4: float
    distinct_1: float
    distinct_2: float

    def format_lines(self) -> list[str]:
        per_image = self.captions / self.images
        return [
            f"{'mBLEU-4':<22}{self.mbleu_4 * 100:8.2f}   ({per_image:g} captions per image; lower: more diverse)",
            f"{'distinct-1 per image':<22}{self.distinct_1 * 100:8.2f}%",
            f"{'distinct-2 per image':<22}{self.distinct_2 * 100:8.2f}%",
        ]


def mbleu_4(sets: Mapping[Hashable, Sequence[str]]) -> float:
    """Mean over all captions of its BLEU-4 against the other captions of its set (pycocoevalcap's
    per-caption BLEU-4, brevity penalty from the closest reference length)."""
    gts: dict[tuple[Hashable, int], list[str]] = {}
    res: dict[tuple[Hashable, int], list[str]] = {}
    for key, captions in sets.items():
        for index, caption in enumerate(captions):
            gts[key, index] = [other for j, other in enumerate(captions) if j != index]
            res[key, index] = [caption]
    _, per_caption = Bleu(4).compute_score(gts, res, verbose=0)
    return sum(per_caption[3]) / len(per_caption[3])


def set_diversity(sets: Mapping[Hashable, Sequence[str]]) -> SetDiversity:
    """mBLEU-4 and distinct-1/2 within sets of PTB-tokenised captions (``{image: [caption, ...]}``, at least
    two captions per image)."""
    if not sets:
        raise ValueError("no caption sets to measure")
    small = [key for key, captions in sets.items() if len(captions) < 2]
    if small:
        raise ValueError(f"{len(small)} images have fewer than 2 captions (first: {small[0]!r}); mBLEU-4 needs 2")
    return SetDiversity(
        images=len(sets),
        captions=sum(len(captions) for captions in sets.values()),
        mbleu_4=mbleu_4(sets),
        distinct_1=sum(distinct_n(c, 1) for c in sets.values()) / len(sets),
        distinct_2=sum(distinct_n(c, 2) for c in sets.values()) / len(sets),
    )


def measure(
    captions: Sequence[str],
    sets: Mapping[Hashable, Sequence[str]] | None = None,
    training: Sequence[str] | None = None,
) -> tuple[Diversity, SetDiversity | None]:
    """PTB-tokenise raw ``captions`` (one per image), the optional caption ``sets`` (``{image: [caption,
    ...]}``) and ``training`` captions in one Java run, then measure them."""
    groups: dict[Hashable, Sequence[str]] = {("caption", i): [c] for i, c in enumerate(captions)}
    groups.update({("set", key): list(members) for key, members in (sets or {}).items()})
    if training is not None:
        groups["training"] = list(training)
    tokens = ptb_tokenize(groups)
    known = set(tokens["training"]) if training is not None else None
    single = caption_diversity([tokens["caption", i][0] for i in range(len(captions))], known)
    multi = set_diversity({key: tokens["set", key] for key in sets}) if sets else None
    return single, multi
