"""Robust image reading and input collection for training data and prediction.

`load_image` turns any common still-image file into an 8-bit RGB image and reports every failure as an
`ImageLoadError` that names the file and the reason. Size policy: images above `max_pixels` are
downscaled (JPEGs are decoded directly at a reduced scale, so even huge JPEGs cost little memory);
other formats must be decoded in full, so those above `max_decode_pixels` are rejected. Pillow's own
global decompression-bomb limit is left untouched: its warning is silenced locally and its error is
worked around for JPEG only, where the reduced-scale decode makes the size harmless.
"""

from __future__ import annotations

import glob
import io
import logging
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
)
LIST_EXTENSIONS: frozenset[str] = frozenset({".txt", ".lst"})
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_DECODE_PIXELS = 1 << 27
# Formats decoded in-process by Pillow itself; others (EPS would start Ghostscript) are refused.
_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "DIB", "GIF", "TIFF")
_JPEG_SIGNATURE = b"\xff\xd8\xff"
_GLOB_CHARS = frozenset("*?[")
_WHITE = (255, 255, 255, 255)


class ImageLoadError(Exception):
    """An image file could not be read; the message names the path and the reason. ``kind`` is a short
    category for counting failures: missing, not a file, empty, no permission, not an image, too large,
    corrupt or truncated."""

    def __init__(self, path: str | os.PathLike, reason: str, kind: str = "corrupt or truncated") -> None:
        super().__init__(f"cannot load image {os.fspath(path)!r}: {reason}")
        self.path = Path(path)
        self.reason = reason
        self.kind = kind


def load_image(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Read an image file as 8-bit RGB with its EXIF orientation applied.

    Args:
        path: image file (JPEG, PNG, WebP, BMP, GIF and TIFF; the first frame of animations).
        max_pixels: the result has at most this many pixels; larger images are downscaled, aspect kept.
        max_decode_pixels: non-JPEG images with more pixels than this are rejected, since they would
            have to be decoded in full before they could be downscaled.
        draft_size: (width, height) the caller will resize to: a JPEG is then decoded at 1/2, 1/4 or 1/8
            scale where both sides stay at or above it (several times faster; other formats unchanged).

    Returns:
        A loaded RGB image (H x W x 3, uint8) not tied to the file.

    Raises:
        ImageLoadError: missing, empty, unreadable, truncated, non-image or absurdly large files.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    _check_file(path)
    return _decode(path, path, max_pixels, max_decode_pixels, draft_size)


def load_image_bytes(
    data: bytes,
    name: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    max_decode_pixels: int = DEFAULT_MAX_DECODE_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """:func:`load_image` for an image held in memory (a member of a WebDataset shard); ``name`` stands
    for the file in errors (``"shards/00003.tar:000030012"``)."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be positive, got {max_pixels}")
    if not data:
        raise ImageLoadError(name, "empty file (0 bytes)", "empty")
    return _decode(io.BytesIO(data), name, max_pixels, max_decode_pixels, draft_size)


def _decode(
    source: str | os.PathLike | io.BytesIO,
    path: str | os.PathLike,
    max_pixels: int,
    max_decode_pixels: int,
    draft_size: tuple[int, int] | None,
) -> Image.Image:
    """Decode ``source`` (a file or bytes) to RGB; ``path`` names it in errors."""
    try:
        with warnings.catch_warnings():
            # Our own limits below replace Pillow's warning; its global threshold stays as the user set it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with _open(source) as image:
                _draft_jpeg(image, max_pixels, draft_size)
                _check_decode_size(path, image, max_decode_pixels)
                image.load()
                _apply_exif_orientation(path, image)
                rgb = to_rgb(image)
                if rgb is image:
                    rgb = image.copy()
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        formats = ", ".join(_FORMATS)
        raise ImageLoadError(path, f"not a recognised image format (supported: {formats})", "not an image") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"image too large to decode safely ({exc})", "too large") from None
    except PermissionError as exc:
        raise ImageLoadError(path, f"no permission to read it ({exc.strerror})", "no permission") from None
    except Exception as exc:  # any decoder failure on a bad file must name the file, not end the run
        raise ImageLoadError(path, f"corrupt or truncated image data ({type(exc).__name__}: {exc})") from None
    return _downscale(rgb, max_pixels)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a loaded image of any Pillow mode to 8-bit RGB.

    Transparent images are composited on white; 16-bit, 32-bit integer and float images are stretched
    linearly from their actual minimum..maximum to 0..255, since their nominal range says little
    about the values a file really uses. Returns the same object when it is already RGB.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if (mode == "P" and "transparency" in image.info) or mode in ("PA", "LA", "La", "RGBA", "RGBa"):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE), rgba).convert("RGB")
    if mode in ("F", "I") or mode.startswith("I;16"):
        return _stretch_to_rgb(image)
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ValueError(f"unsupported image mode {mode!r}: {exc}") from None


def _stretch_to_rgb(image: Image.Image) -> Image.Image:
    """Map a single-band high-depth image to 8-bit by its finite value range (constant -> 0 or 255)."""
    values = np.asarray(image, dtype=np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        gray = np.zeros(values.shape, dtype=np.uint8)
    else:
        low, high = float(values[finite].min()), float(values[finite].max())
        if high > low:
            scaled = (np.where(finite, values, low) - low) * (255.0 / (high - low))
            gray = np.rint(scaled).astype(np.uint8)
        else:
            gray = np.full(values.shape, 255 if high > 0 else 0, dtype=np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _check_file(path: str | os.PathLike) -> None:
    file = Path(path)
    if not file.exists():
        kind = "dangling symbolic link" if file.is_symlink() else "missing"
        raise ImageLoadError(path, "file not found" if kind == "missing" else "broken symbolic link", kind)
    if file.is_dir():
        raise ImageLoadError(path, "is a directory, not an image file", "not a file")
    if not file.is_file():
        raise ImageLoadError(path, "not a regular file", "not a file")
    if file.stat().st_size == 0:
        raise ImageLoadError(path, "empty file (0 bytes)", "empty")


def _open(source: str | os.PathLike | io.BytesIO) -> ImageFile.ImageFile:
    """Open lazily; JPEGs above Pillow's global bomb limit are opened anyway as they decode reduced."""
    try:
        return Image.open(source, formats=_FORMATS)
    except Image.DecompressionBombError:
        if isinstance(source, io.BytesIO):
            is_jpeg = source.getvalue()[:3] == _JPEG_SIGNATURE
            source.seek(0)
            if not is_jpeg:
                raise
            return JpegImagePlugin.JpegImageFile(source)
        with open(source, "rb") as file:
            is_jpeg = file.read(3) == _JPEG_SIGNATURE
        if not is_jpeg:
            raise
        return JpegImagePlugin.JpegImageFile(os.fspath(source))


def _draft_jpeg(image: ImageFile.ImageFile, max_pixels: int, draft_size: tuple[int, int] | None) -> None:
    """Let the JPEG decoder scale by 1/2, 1/4 or 1/8 while staying at or above the target size: the size
    that fits ``max_pixels``, and ``draft_size`` when given."""
    if not isinstance(image, JpegImagePlugin.JpegImageFile):
        return
    target = draft_size
    if image.width * image.height > max_pixels:
        factor = math.sqrt(max_pixels / (image.width * image.height))
        fit = (max(1, math.ceil(image.width * factor)), max(1, math.ceil(image.height * factor)))
        target = fit if draft_size is None else (max(fit[0], draft_size[0]), max(fit[1], draft_size[1]))
    if target is not None:
        image.draft(None, target)


def _check_decode_size(path: str | os.PathLike, image: Image.Image, max_decode_pixels: int) -> None:
    pixels = image.width * image.height
    if pixels > max_decode_pixels:
        raise ImageLoadError(
            path,
            f"{image.width}x{image.height} = {pixels} pixels exceeds the decode limit {max_decode_pixels}",
            "too large",
        )


def _apply_exif_orientation(path: str | os.PathLike, image: Image.Image) -> None:
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except (SyntaxError, ValueError, TypeError, KeyError, OSError) as exc:
        # A broken EXIF block should not cost us the pixels; keep the stored orientation.
        logger.warning("ignoring unreadable EXIF orientation in %s: %s", path, exc)


def _downscale(image: Image.Image, max_pixels: int) -> Image.Image:
    pixels = image.width * image.height
    if pixels <= max_pixels:
        return image
    factor = math.sqrt(max_pixels / pixels)
    size = (max(1, math.floor(image.width * factor)), max(1, math.floor(image.height * factor)))
    image.thumbnail(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


def collect_images(inputs: Sequence[str | os.PathLike], recursive: bool = True) -> tuple[list[Path], list[str]]:
    """Expand files, folders, glob patterns and list files into image paths.

    Folders (recursively unless `recursive` is false) and glob patterns contribute only files with an
    image extension; files named explicitly are kept whatever their extension so that `load_image`
    can report them. A `.txt` / `.lst` file is a list of paths, one per line (blank lines and lines
    starting with '#' skipped, relative paths taken from the list file's folder).

    Returns:
        (sorted unique absolute image paths, messages about inputs that matched nothing)
    """
    found: set[Path] = set()
    problems: list[str] = []
    for item in inputs:
        text = os.path.expanduser(os.fspath(item))
        path = Path(text)
        if path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
            found.update(_read_list_file(path, recursive, problems))
        elif path.is_file() or path.is_dir():
            found.update(_expand_path(path, recursive))
        elif path.is_symlink():
            problems.append(f"{text}: broken symbolic link (its target {os.readlink(path)!r} does not exist)")
        elif _GLOB_CHARS & set(text):
            matches = _expand_glob(text, recursive)
            if not matches:
                problems.append(f"{text}: pattern matched no image files")
            found.update(matches)
        else:
            problems.append(f"{text}: no such file or folder")
    return sorted(found), problems


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _expand_path(path: Path, recursive: bool) -> list[Path]:
    if path.is_file():
        return [_absolute(path)]
    files = path.rglob("*") if recursive else path.iterdir()
    return _image_files(files)


def _image_files(paths: Iterable[Path]) -> list[Path]:
    """Files with an image extension; broken symbolic links are kept so that loading reports them."""
    return [_absolute(p) for p in paths if p.suffix.lower() in IMAGE_EXTENSIONS and (p.is_file() or p.is_symlink())]


def _expand_glob(pattern: str, recursive: bool) -> list[Path]:
    matches: list[Path] = []
    for match in glob.glob(pattern, recursive=True):
        path = Path(match)
        matches.extend(_expand_path(path, recursive) if path.is_dir() else _image_files([path]))
    return matches


def _read_list_file(list_file: Path, recursive: bool, problems: list[str]) -> list[Path]:
    """Paths named in a list file; each line is a file or a folder (no globs, no nested lists)."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(f"{list_file}: cannot read list file ({exc})")
        return []
    paths: list[Path] = []
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(os.path.expanduser(entry))
        if not path.is_absolute():
            path = list_file.parent / path
        if path.is_file() or path.is_dir():
            paths.extend(_expand_path(path, recursive))
        else:
            problems.append(f"{list_file}:{number}: listed path {entry!r} not found")
    return paths
