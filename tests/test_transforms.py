"""X-VLM's RandomAugment as the reference recipe applies it, checked against PIL and against geometry."""

from __future__ import annotations

import cmath
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from data.transforms import (
    RandomAugment,
    autocontrast,
    brightness,
    build_transform,
    equalize,
    rotation_matrix,
    sharpness,
)

BICUBIC = InterpolationMode.BICUBIC


def _photo(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """A smooth colour image with texture: no channel spans the full 0..255 range."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([60 + 2 * x, 40 + 3 * y, 120 + x + y], axis=-1).astype(np.float64)
    pixels = (base + rng.normal(0, 6, base.shape)).clip(10, 230).astype(np.uint8)
    return Image.fromarray(pixels)


def _blob(center: tuple[float, float], size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A bright Gaussian spot at ``center`` (x, y) on the grey of the fill."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    spot = 128 + 127 * np.exp(-((x - center[0]) ** 2 + (y - center[1]) ** 2) / (2 * 2.0**2))
    return Image.fromarray(np.repeat(spot[..., None], 3, axis=2).round().astype(np.uint8))


def _centroid(image: Image.Image) -> np.ndarray:
    """Centre (x, y) of the brightness above the grey background."""
    pixels = np.asarray(image)[..., 0].astype(np.float64)
    weights = pixels - 128.0
    y, x = np.mgrid[0 : pixels.shape[0], 0 : pixels.shape[1]]
    return np.array([(weights * x).sum(), (weights * y).sum()]) / weights.sum()


def test_autocontrast_and_equalize_equal_pil():
    pixels = np.asarray(_photo())
    assert np.array_equal(autocontrast(pixels), np.asarray(ImageOps.autocontrast(_photo())))
    assert np.array_equal(equalize(pixels), np.asarray(ImageOps.equalize(_photo())))


def test_brightness_and_sharpness_at_magnitude_7():
    pixels = np.asarray(_photo())
    factor = 7 / 10 * 1.8 + 0.1  # 1.36: always brighter and sharper
    assert np.array_equal(brightness(pixels, factor), np.floor(np.minimum(pixels * np.float32(factor), 255)))
    ours = sharpness(pixels, factor).astype(int)
    pil = np.asarray(ImageEnhance.Sharpness(_photo()).enhance(factor)).astype(int)
    assert np.abs(ours[1:-1, 1:-1] - pil[1:-1, 1:-1]).max() <= 1  # PIL uses the same 3 x 3 kernel
    assert np.array_equal(ours[0], pixels[0]) and np.array_equal(ours[:, -1], pixels[:, -1])


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_translations_move_7_pixels_and_fill_grey(sign):
    augment, image = RandomAugment(), _photo()
    pixels = np.asarray(image)
    moved = np.asarray(augment.apply(image, "TranslateX", sign))
    if sign > 0:  # the reference's offset +7 shows the source 7 pixels further right
        assert np.array_equal(moved[:, :-7], pixels[:, 7:]) and (moved[:, -7:] == 128).all()
    else:
        assert np.array_equal(moved[:, 7:], pixels[:, :-7]) and (moved[:, :7] == 128).all()
    moved_y = np.asarray(augment.apply(image, "TranslateY", sign))
    assert np.array_equal(moved_y[:-7] if sign > 0 else moved_y[7:], pixels[7:] if sign > 0 else pixels[:-7])
    assert ((moved_y[-7:] if sign > 0 else moved_y[:7]) == 128).all()


@pytest.mark.parametrize(("op", "sign"), [("Rotate", 1.0), ("Rotate", -1.0), ("ShearX", 1.0), ("ShearY", -1.0)])
def test_geometric_ops_follow_opencv_geometry(op, sign):
    """A spot lands where OpenCV's warpAffine puts it at magnitude 7: rotated 21 degrees counter-clockwise on
    screen about the image centre (32, 32), or sheared by 0.21 (x += 0.21 y, or y -= 0.21 x)."""
    source = (40.0, 22.0)
    moved = RandomAugment().apply(_blob(source), op, sign)
    if op == "Rotate":  # on screen (y down) counter-clockwise is the complex rotation of (x - cx) - i (y - cy)
        turned = complex(source[0] - 32, -(source[1] - 32)) * cmath.exp(1j * math.radians(sign * 21.0))
        expected = (32 + turned.real, 32 - turned.imag)
    elif op == "ShearX":
        expected = (source[0] + sign * 0.21 * source[1], source[1])
    else:
        expected = (source[0], source[1] + sign * 0.21 * source[0])
    np.testing.assert_allclose(_centroid(moved), expected, atol=0.05)


def test_rotation_matrix_is_opencvs():
    """getRotationMatrix2D((32, 32), 21, 1) as OpenCV documents it: [[a, b, (1-a) cx - b cy], [-b, a, b cx + (1-a) cy]]
    with a = cos 21 deg, b = sin 21 deg; values written out."""
    expected = [[0.9335804, 0.3583679, -9.3423480], [-0.3583679, 0.9335804, 13.5932007]]
    np.testing.assert_allclose(rotation_matrix((64, 64), 21.0), expected, atol=1e-6)
    # An 80 x 40 image (width, height) turns about (40, 20).
    expected = [[0.9335804, 0.3583679, -4.5105761], [-0.3583679, 0.9335804, 15.6631095]]
    np.testing.assert_allclose(rotation_matrix((80, 40), 21.0), expected, atol=1e-6)


def test_two_ops_each_applied_with_probability_one_half():
    """P(image unchanged) = (1/2 + 1/2 * 1/10)^2 = 0.3025: each of the 2 ops is skipped half the time and
    is the identity once in 10 otherwise (every other op changes this image)."""
    torch.manual_seed(0)
    augment, image = RandomAugment(), _photo(size=(24, 20))
    pixels = np.asarray(image)
    trials = 2000
    unchanged = sum(np.array_equal(np.asarray(augment(image)), pixels) for _ in range(trials))
    assert abs(unchanged / trials - 0.3025) < 4 * (0.3025 * 0.6975 / trials) ** 0.5
    for op in RandomAugment.OPS[1:]:
        assert not np.array_equal(np.asarray(augment.apply(image, op)), pixels), op


def test_apply_uses_factor_1_36_at_magnitude_7_and_pils_tone_operations():
    augment, image = RandomAugment(), _photo()
    pixels = np.asarray(image)
    assert augment.apply(image, "Identity") is image
    assert np.array_equal(np.asarray(augment.apply(image, "Brightness")), brightness(pixels, 1.36))
    assert np.array_equal(np.asarray(augment.apply(image, "Sharpness")), sharpness(pixels, 1.36))
    assert np.array_equal(np.asarray(augment.apply(image, "AutoContrast")), np.asarray(ImageOps.autocontrast(image)))
    assert np.array_equal(np.asarray(augment.apply(image, "Equalize")), np.asarray(ImageOps.equalize(image)))
    with pytest.raises(ValueError, match=r"unknown augmentation 'Solarize'; known: \('Identity', 'AutoContrast'"):
        augment.apply(image, "Solarize")


def test_a_constant_channel_is_kept_as_pil_keeps_it():
    """A channel with one value: nothing to stretch (autocontrast) and one histogram bin (equalize)."""
    pixels = np.asarray(_photo()).copy()
    pixels[..., 1] = 77
    image = Image.fromarray(pixels)
    assert np.array_equal(autocontrast(pixels), np.asarray(ImageOps.autocontrast(image)))
    assert np.array_equal(equalize(pixels), np.asarray(ImageOps.equalize(image)))
    assert (autocontrast(pixels)[..., 1] == 77).all() and (equalize(pixels)[..., 1] == 77).all()


def test_each_call_draws_two_ops_uniformly_with_random_signs():
    """Over many calls: 0, 1 or 2 ops applied with probabilities 1/4, 1/2, 1/4; every op equally likely;
    the geometric ones turned either way, each half the time."""

    class Recorded(RandomAugment):
        def apply(self, image, op, sign=1.0):
            calls[-1].append((op, sign))
            return image

    torch.manual_seed(1)
    augment, image, calls = Recorded(), _photo(size=(8, 8)), []
    trials = 4000
    for _ in range(trials):
        calls.append([])
        augment(image)
    counts = np.bincount([len(c) for c in calls], minlength=3) / trials
    np.testing.assert_allclose(counts, [0.25, 0.5, 0.25], atol=0.03)
    applied = [call for c in calls for call in c]
    ops = np.array([RandomAugment.OPS.index(op) for op, _ in applied])
    np.testing.assert_allclose(np.bincount(ops, minlength=10) / len(ops), [0.1] * 10, atol=0.02)
    signs = np.array([sign for _, sign in applied])
    assert set(signs.tolist()) == {-1.0, 1.0} and abs((signs > 0).mean() - 0.5) < 0.03


def test_the_transforms_are_the_recipes():
    """Test: bicubic resize to R x R, then CLIP's mean and std (the numbers written out). Train: random
    resized crop (scale 0.5-1, bicubic), horizontal flip, RandomAugment(2 ops, magnitude 7, probability 0.5)."""
    image = _photo(size=(40, 30))
    tensor = build_transform(16)(image)
    resized = np.asarray(image.resize((16, 16), Image.Resampling.BICUBIC)).astype(np.float32) / 255
    mean, std = np.array([0.48145466, 0.4578275, 0.40821073]), np.array([0.26862954, 0.26130258, 0.27577711])
    np.testing.assert_allclose(tensor.numpy(), ((resized - mean) / std).transpose(2, 0, 1), atol=1e-5)
    crop, flip, augment, to_tensor, normalise = build_transform(16, train=True).transforms
    assert (crop.size, crop.scale, crop.ratio, crop.interpolation) == ((16, 16), (0.5, 1.0), (3 / 4, 4 / 3), BICUBIC)
    assert isinstance(flip, transforms.RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(augment, RandomAugment) and (augment.num_ops, augment.magnitude, augment.prob) == (2, 7, 0.5)
    assert isinstance(to_tensor, transforms.ToTensor)
    assert normalise.mean == tuple(mean) and normalise.std == tuple(std)


def test_brightness_and_sharpness_in_float32_as_the_reference_with_black_kept_black():
    """The reference computes both in float32; values worked out by hand where float64 would differ."""
    # 50 x 1.18 (magnitude 6): 1.18 in float32 is 1.17999995, so 58.99999 -> 58 (float64 rounds to 59.0).
    assert brightness(np.array([[[0, 50, 255]]], dtype=np.uint8), 1.18).tolist() == [[[0, 58, 255]]]
    # Centre 90 among eight 212s: smooth = round((5 x 90 + 8 x 212) / 13) = round(165.08) = 165, and
    # 165 + 1.36 x (90 - 165) = 63 (float32 gives 63.0; float64 62.99999..., truncated to 62).
    patch = np.full((3, 3, 3), 212, dtype=np.uint8)
    patch[1, 1] = 90
    assert sharpness(patch, 1.36)[1, 1].tolist() == [63, 63, 63]


def test_sharpening_a_checkerboard_saturates_it_without_wrapping():
    """Black and white squares of one pixel: sharpening overshoots below 0 and above 255; the values are
    clipped (as PIL does), never wrapped around by the cast to uint8."""
    checker = (np.indices((8, 8)).sum(axis=0) % 2 * 255).astype(np.uint8)
    pixels = np.repeat(checker[..., None], 3, axis=2)
    ours = sharpness(pixels, 1.36)
    assert np.array_equal(ours, pixels)
    pil = np.asarray(ImageEnhance.Sharpness(Image.fromarray(pixels)).enhance(1.36))
    assert np.array_equal(ours[1:-1, 1:-1], pil[1:-1, 1:-1])


def test_equalize_equals_pil_where_the_rounding_of_its_step_matters():
    """A histogram chosen so that PIL's step (pixels outside the last bin // 255) is odd, differs from
    // 256 and from leaving out one more bin: 45 levels with 1..119 pixels each, then 81 pixels at 250."""
    rng = np.random.default_rng(9)
    counts = rng.integers(1, 120, size=45)
    below_last = int(counts.sum())
    assert (below_last // 255, below_last // 256, (below_last - counts[-1]) // 255) == (13, 12, 12)
    levels = np.concatenate([np.repeat(np.arange(0, 225, 5), counts), np.full(81, 250)]).astype(np.uint8)
    pixels = np.stack([rng.permutation(levels).reshape(40, 85) for _ in range(3)], axis=-1)
    expected = np.asarray(ImageOps.equalize(Image.fromarray(pixels)))
    assert np.array_equal(equalize(pixels), expected) and not np.array_equal(expected, pixels)


def test_shear_interpolates_bilinearly_and_any_mode_comes_out_rgb():
    """A horizontal ramp 10 x + 5 sheared by 0.21 (magnitude 7): each pixel takes the source at
    x - 0.21 y, where a bilinear sample of a ramp is the ramp itself (a nearest one is up to 5 off). Images
    of other modes come out RGB; the geometric ops turn the positive way by default."""
    ramp = np.tile((10 * np.arange(24) + 5).astype(np.uint8), (20, 1))
    image = Image.fromarray(np.repeat(ramp[..., None], 3, axis=2))
    augment = RandomAugment()
    sheared = np.asarray(augment.apply(image, "ShearX"))
    y, x = np.mgrid[0:20, 0:24]
    source = x - 0.21 * y
    inside = (source >= 1) & (source <= 22)
    # PIL's 8-bit bilinear sampling truncates: at most 1 below the ramp
    np.testing.assert_allclose(sheared[..., 0][inside], (10 * source + 5)[inside], atol=1.0)
    assert np.array_equal(np.asarray(augment.apply(image, "ShearX", 1.0)), sheared)
    for op in ("Equalize", "Brightness", "Rotate", "TranslateY"):
        assert augment.apply(image.convert("L"), op).mode == "RGB", op
