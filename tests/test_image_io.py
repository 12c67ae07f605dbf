"""Tests for data.image_io: every format and mode is generated here with Pillow."""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data.image_io import IMAGE_EXTENSIONS, ImageLoadError, collect_images, load_image

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def two_colour(size: tuple[int, int] = (40, 20), left=RED, right=BLUE) -> Image.Image:
    """RGB image whose left half is `left` and right half is `right`."""
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


def pixel(image: Image.Image, x: int, y: int) -> np.ndarray:
    return np.asarray(image)[y, x].astype(int)


def assert_close(actual: np.ndarray, expected, tolerance: int = 12) -> None:
    assert np.abs(actual - np.asarray(expected)).max() <= tolerance, (actual, expected)


@pytest.mark.parametrize(
    "suffix, options",
    [
        (".jpg", {"quality": 95}),
        (".png", {}),
        (".webp", {"lossless": True}),
        (".bmp", {}),
        (".tiff", {}),
        (".gif", {}),
    ],
)
def test_formats_load_as_rgb(tmp_path: Path, suffix: str, options: dict) -> None:
    path = tmp_path / f"image{suffix}"
    two_colour().save(path, **options)
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (40, 20)
    assert_close(pixel(image, 5, 10), RED, tolerance=20)
    assert_close(pixel(image, 35, 10), BLUE, tolerance=20)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    two_colour((40, 20)).save(path, exif=exif.tobytes(), quality=95)
    image = load_image(path)
    assert image.size == (20, 40)
    # Clockwise rotation moves the stored left half (red) to the top.
    assert_close(pixel(image, 10, 5), RED, tolerance=20)
    assert_close(pixel(image, 10, 35), BLUE, tolerance=20)


def test_sixteen_bit_png_is_stretched_by_its_range(tmp_path: Path) -> None:
    values = np.tile(np.linspace(1000, 3000, 64), (8, 1)).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    image = load_image(path)
    gray = np.asarray(image)
    assert image.mode == "RGB"
    assert gray[0, 0].tolist() == [0, 0, 0]
    assert gray[0, -1].tolist() == [255, 255, 255]
    assert np.all(np.diff(gray[0, :, 0].astype(int)) >= 0)


def test_big_endian_16_bit_tiff(tmp_path: Path) -> None:
    values = (np.arange(12).reshape(3, 4) * 100 + 500).astype(">u2")
    path = tmp_path / "big.tiff"
    Image.frombytes("I;16B", (4, 3), values.tobytes()).save(path)
    assert Image.open(path).mode == "I;16B"
    gray = np.asarray(load_image(path))[..., 0]
    assert gray[0, 0] == 0 and gray[-1, -1] == 255
    assert np.all(np.diff(gray.ravel().astype(int)) > 0)


def test_int32_and_float_images(tmp_path: Path) -> None:
    path_i = tmp_path / "int.tiff"
    Image.fromarray(np.array([[-70000, 0], [70000, 140000]], dtype=np.int32)).save(path_i)
    assert Image.open(path_i).mode == "I"
    assert np.asarray(load_image(path_i))[..., 0].tolist() == [[0, 85], [170, 255]]

    path_f = tmp_path / "float.tiff"
    Image.fromarray(np.array([[np.nan, -1.0], [0.0, 3.0]], dtype=np.float32)).save(path_f)
    assert Image.open(path_f).mode == "F"
    # Non-finite values take the minimum; the finite range -1..3 maps to 0..255.
    assert np.asarray(load_image(path_f))[..., 0].tolist() == [[0, 0], [64, 255]]


def test_constant_high_depth_image(tmp_path: Path) -> None:
    """No range to stretch: a positive constant is white, zero (an empty mask, a dark frame) black."""
    for value, expected in ((700, 255), (0, 0)):
        path = tmp_path / f"flat{value}.png"
        Image.fromarray(np.full((4, 4), value, dtype=np.uint16)).save(path)
        assert np.unique(np.asarray(load_image(path))).tolist() == [expected]


def test_grayscale_and_cmyk(tmp_path: Path) -> None:
    gray_path = tmp_path / "gray.png"
    Image.new("L", (8, 8), 77).save(gray_path)
    assert_close(pixel(load_image(gray_path), 1, 1), (77, 77, 77), tolerance=0)

    cmyk_path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(cmyk_path, quality=95)
    assert Image.open(cmyk_path).mode == "CMYK"
    image = load_image(cmyk_path)
    assert image.mode == "RGB"
    assert_close(pixel(image, 8, 8), RED, tolerance=20)


def test_gif_first_frame_of_palette_animation(tmp_path: Path) -> None:
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (16, 16), colour).convert("P") for colour in (RED, (0, 255, 0))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as raw:
        assert raw.mode == "P" and raw.n_frames == 2
    assert_close(pixel(load_image(path), 8, 8), RED, tolerance=0)


def test_transparency_is_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (20, 10), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 128), (10, 0, 20, 10))
    rgba_path = tmp_path / "alpha.png"
    rgba.save(rgba_path)
    image = load_image(rgba_path)
    assert_close(pixel(image, 2, 5), (255, 255, 255), tolerance=0)
    assert_close(pixel(image, 15, 5), (255, 127, 127), tolerance=2)

    la_path = tmp_path / "la.png"
    Image.new("LA", (4, 4), (0, 0)).save(la_path)
    assert_close(pixel(load_image(la_path), 1, 1), (255, 255, 255), tolerance=0)

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette_path = tmp_path / "palette.png"
    palette.save(palette_path, transparency=1)
    assert_close(pixel(load_image(palette_path), 1, 1), (255, 255, 255), tolerance=0)


def test_large_jpeg_is_drafted_and_downscaled(tmp_path: Path) -> None:
    # 108 million pixels: above Pillow's default warning threshold, decoded at reduced scale.
    path = tmp_path / "huge.jpg"
    Image.new("L", (12000, 9000), 90).save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # decoded at half scale, 6000 x 4500: the whole 108 million pixels would be over this decode limit
        image = load_image(path, max_decode_pixels=6000 * 4500)
    assert 0.999 * 4096 * 4096 < image.width * image.height <= 4096 * 4096  # not decoded below the fit
    assert abs(image.width / image.height - 12000 / 9000) < 0.01
    assert_close(pixel(image, 10, 10), (90, 90, 90), tolerance=2)


def test_max_pixels_downscales_every_format(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    two_colour((400, 100)).save(path)
    image = load_image(path, max_pixels=2500)
    assert image.width * image.height <= 2500
    assert image.size == (100, 25)
    assert_close(pixel(image, 10, 10), RED, tolerance=5)


def test_pillow_bomb_limit_is_respected_locally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    jpeg = tmp_path / "big.jpg"
    png = tmp_path / "big.png"
    two_colour((300, 100)).save(jpeg)
    two_colour((300, 100)).save(png)
    # A JPEG above Pillow's error limit still loads because it is decoded at reduced size.
    assert load_image(jpeg, max_pixels=500).width * load_image(jpeg, max_pixels=500).height <= 500
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(png)
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_absurd_dimensions_are_rejected_without_decoding(tmp_path: Path) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    path = tmp_path / "bomb.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    with pytest.raises(ImageLoadError, match="bomb.png.*too large"):
        load_image(path)

    limit_path = tmp_path / "medium.png"
    Image.new("L", (200, 200)).save(limit_path)
    with pytest.raises(ImageLoadError, match="decode limit"):
        load_image(limit_path, max_decode_pixels=10_000)


def test_no_global_pillow_state_changed(tmp_path: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    filters = list(warnings.filters)
    path = tmp_path / "a.png"
    two_colour().save(path)
    load_image(path)
    assert before == Image.MAX_IMAGE_PIXELS
    assert warnings.filters == filters


@pytest.mark.parametrize(
    "name, make, reason",
    [
        ("truncated.jpg", "truncated", "truncated"),
        ("text.jpg", "text", "not a recognised image format"),
        ("empty.png", "empty", "empty file"),
        ("folder.jpg", "folder", "is a directory"),
        ("missing.jpg", "missing", "file not found"),
    ],
)
def test_bad_files_raise_with_path_and_reason(tmp_path: Path, name: str, make: str, reason: str) -> None:
    path = tmp_path / name
    if make == "truncated":
        two_colour((200, 200)).save(path, quality=95)
        path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
    elif make == "text":
        path.write_text("this is not an image\n")
    elif make == "empty":
        path.touch()
    elif make == "folder":
        path.mkdir()
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_image(path)
    assert name in str(info.value)
    assert info.value.path == path


def test_formats_outside_the_safe_list_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "drawing.jpg"
    Image.new("RGB", (8, 8)).save(path, format="EPS")
    with pytest.raises(ImageLoadError, match="not a recognised image format"):
        load_image(path)


def test_result_is_detached_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    two_colour().save(path)
    image = load_image(path)
    path.unlink()
    assert image.getpixel((5, 5)) == RED


def make_tree(root: Path) -> dict[str, Path]:
    files = {
        "a": root / "photos" / "a.jpg",
        "b": root / "photos" / "nested" / "b.PNG",
        "notes": root / "photos" / "notes.txt",
        "c": root / "other" / "c.webp",
        "odd": root / "other" / "odd.dat",
    }
    for path in files.values():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return files


def test_collect_folders_recursive_and_flat(tmp_path: Path) -> None:
    files = make_tree(tmp_path)
    paths, problems = collect_images([tmp_path / "photos"])
    assert paths == sorted([files["a"], files["b"]]) and problems == []
    flat, _ = collect_images([tmp_path / "photos"], recursive=False)
    assert flat == [files["a"]]


def test_collect_globs_explicit_files_and_duplicates(tmp_path: Path) -> None:
    files = make_tree(tmp_path)
    inputs = [str(tmp_path / "other" / "*"), files["odd"], files["a"], tmp_path / "photos", str(files["c"])]
    paths, problems = collect_images(inputs)
    # The glob ignores odd.dat but the explicitly named file is kept; duplicates collapse.
    assert paths == sorted([files["a"], files["b"], files["c"], files["odd"]])
    assert problems == []


def test_collect_list_file_resolves_relative_paths(tmp_path: Path) -> None:
    files = make_tree(tmp_path)
    list_file = tmp_path / "other" / "inputs.lst"
    list_file.write_text(f"# comment\n\nc.webp\n../photos/nested\n{files['a']}\nmissing.jpg\n")
    paths, problems = collect_images([list_file])
    assert paths == sorted([files["a"], files["b"], files["c"]])
    assert len(problems) == 1 and "inputs.lst:6" in problems[0] and "missing.jpg" in problems[0]


def test_collect_reports_inputs_that_match_nothing(tmp_path: Path) -> None:
    make_tree(tmp_path)
    paths, problems = collect_images([tmp_path / "nope.jpg", str(tmp_path / "*.gif")])
    assert paths == []
    assert len(problems) == 2
    assert "nope.jpg" in problems[0] and "no such file" in problems[0]
    assert "*.gif" in problems[1]


def test_image_extensions_cover_supported_formats() -> None:
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"} <= IMAGE_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)


def test_draft_size_decodes_jpegs_reduced_but_not_below_it(tmp_path: Path) -> None:
    from data.datasets import draft_size_for
    from data.transforms import build_transform

    photo = two_colour((640, 480))
    photo.save(tmp_path / "photo.jpg", quality=95)
    photo.save(tmp_path / "photo.png")
    assert load_image(tmp_path / "photo.jpg", draft_size=(224, 224)).size == (320, 240)
    assert load_image(tmp_path / "photo.jpg", draft_size=(161, 100)).size == (320, 240)  # 1/4 would be 160 wide
    assert load_image(tmp_path / "photo.jpg", draft_size=(400, 300)).size == (640, 480)
    assert load_image(tmp_path / "photo.png", draft_size=(224, 224)).size == (640, 480)
    assert_close(pixel(load_image(tmp_path / "photo.jpg", draft_size=(224, 224)), 300, 120), BLUE, tolerance=20)
    # only a transform that resizes the whole image to a fixed size may read a reduced decode
    assert draft_size_for(build_transform(224, train=False)) == (224, 224)
    assert draft_size_for(build_transform(224, train=True)) is None
