"""The tokens the COCO scorers see: pycocoevalcap's PTB tokenizer (Stanford's, on Java), in one place.

It lowercases, splits off punctuation and drops it. BLEU, METEOR, ROUGE-L, CIDEr and the diversity figures
all read its output, so that "A dog." and "a dog" count as the same caption everywhere.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer


def one_line(caption: str) -> str:
    """``caption`` with every run of whitespace (line breaks included) as one space."""
    # The PTB tokenizer reads one caption per line; '\r' or other line breaks inside a caption would
    # shift every later caption onto the wrong image.
    return " ".join(caption.split())


def ptb_tokenize(groups: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """PTB-tokenise every caption of ``groups`` (``{key: [caption, ...]}``) in one Java run.

    Returns ``{key: [tokens joined by spaces, ...]}`` in the same order. Raises RuntimeError when the
    tokenizer returns another number of captions (pycocoevalcap ignores a failed or missing java).
    """
    tokens = PTBTokenizer().tokenize({key: [{"caption": one_line(c)} for c in caps] for key, caps in groups.items()})
    if any(len(tokens.get(key, [])) != len(caps) for key, caps in groups.items() if caps):
        raise RuntimeError("the PTB tokenizer (Java) returned a different number of captions than it was given")
    return {key: tokens.get(key, []) for key in groups}


def ptb_tokenize_list(captions: Sequence[str]) -> list[str]:
    """The PTB tokens of each caption of a list, in order (one Java run)."""
    if not captions:
        return []
    tokenized = ptb_tokenize({index: [caption] for index, caption in enumerate(captions)})
    return [tokenized[index][0] for index in range(len(captions))]
