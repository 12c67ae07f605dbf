"""Caption normalisation shared by training, evaluation and the SCST reward."""

from __future__ import annotations

import re

_DROPPED = re.compile(r"[,.'!?\"()*#:;~]")
_SPACED = re.compile(r"[-/]")
_SPACES = re.compile(r"\s+")

STOP_TEXT = "."
IGNORE_INDEX = -100  # the label of padding positions, which the loss skips (F.cross_entropy's default)


def clean_caption(text: str, max_words: int = 30) -> str:
    """Normalise a caption the way the model is trained on it.

    Lowercase, drop ``, . ' ! ? " ( ) * # : ; ~``, turn ``-`` and ``/`` into spaces, collapse spaces,
    keep at most ``max_words`` words and end with ``.``, the stop token.
    Example: ``"A man-made Lake, at dusk!"`` -> ``"a man made lake at dusk."``
    """
    text = _DROPPED.sub("", text.lower())
    text = _SPACED.sub(" ", text)
    words = _SPACES.sub(" ", text).strip().split(" ")
    words = [w for w in words if w][:max_words]
    return " ".join(words) + STOP_TEXT


def strip_stop(caption: str) -> str:
    """Caption text without the final stop token, as the CIDEr-D reward and COCO metrics read it."""
    caption = caption.strip()
    if caption.endswith(STOP_TEXT):
        caption = caption[: -len(STOP_TEXT)]
    return caption.strip()
