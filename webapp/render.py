"""Results as the page shows them: HTML cards of captions with scores, and of the sparse mask's kept grid
cells over the image as the encoder sees it. Images are inlined (data: URLs), so the page requests nothing."""

from __future__ import annotations

import base64
import io
from html import escape

from PIL import Image

from webapp.service import ImageResult

THUMBNAIL = 160  # longest side of the photo beside its captions, in pixels


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail(image: Image.Image) -> Image.Image:
    small = image.copy()
    small.thumbnail((THUMBNAIL, THUMBNAIL))
    return small


def captions_html(results: list[ImageResult]) -> str:
    """One card per file: its photo and captions (best first, with scores), or its error message."""
    cards = []
    for result in results:
        name = escape(result.name)
        if result.error is not None:
            body = f'<p class="error">{escape(result.error)}</p>'
        else:
            rows = "".join(
                f'<li><span class="caption">{escape(c.text)}</span> <span class="score">{c.score:.4f}</span></li>'
                for c in result.captions
            )
            body = f'<img src="{_data_url(_thumbnail(result.image))}" alt="{name}"><ol>{rows}</ol>'
        cards.append(f'<div class="card" data-name="{name}"><h4>{name}</h4>{body}</div>')
    return f'<div class="cards">{"".join(cards)}</div>'


def mask_html(results: list[ImageResult], grid: int | None, image_size: int) -> str:
    """Per readable file, the image resized as the encoder sees it (square) under its G x G grid, dropped
    cells shaded, and whether position 0 (the mean token, the whole image) was kept."""
    readable = [r for r in results if r.error is None]
    if not readable:
        return ""
    if readable[0].kept is None:
        return '<p class="note">This model has no sparse mask: GPT-2 reads every prefix position.</p>'
    if grid is None:
        return ('<p class="note">This model maps the image with the transformer mapper: its prefix positions are '
                "learned queries, not image regions, so they have no place in the image.</p>")  # fmt: skip
    cards = []
    for result in readable:
        kept = result.kept
        square = result.image.resize((image_size, image_size), Image.Resampling.BICUBIC)
        cells = "".join(f'<div class="cell {"kept" if k else "dropped"}"></div>' for k in kept[1:])
        badge = "kept" if kept[0] else "dropped"
        name = escape(result.name)
        cards.append(
            f'<div class="card" data-name="{name}"><h4>{name}</h4>'
            f'<div class="masked" style="background-image:url({_data_url(square)})">'
            f'<div class="grid" style="grid-template-columns:repeat({grid},1fr)">{cells}</div></div>'
            f'<p>Mean token (whole image): <span class="badge {badge}">{badge}</span></p>'
            f'<p class="kept-count">GPT-2 reads {sum(kept)} of {len(kept)} prefix positions.</p></div>'
        )
    return f'<div class="cards">{"".join(cards)}</div>'
