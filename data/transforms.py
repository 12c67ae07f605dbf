"""Image transforms of the reference recipe (CLIP normalisation, X-VLM's RandomAugment for training)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_transform(image_res: int, train: bool = False) -> transforms.Compose:
    """PIL RGB image -> normalised tensor 3 x R x R.

    Test: resize to R x R (bicubic, aspect not kept). Train: random resized crop (scale 0.5-1, bicubic),
    horizontal flip and X-VLM's RandomAugment (2 ops, magnitude 7 of 10, each applied with probability 0.5).
    """
    normalise = [transforms.ToTensor(), transforms.Normalize(CLIP_MEAN, CLIP_STD)]
    if not train:
        return transforms.Compose(
            [transforms.Resize((image_res, image_res), interpolation=InterpolationMode.BICUBIC), *normalise]
        )
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(image_res, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            RandomAugment(),
            *normalise,
        ]
    )


class RandomAugment:
    """X-VLM's RandomAugment, the reference recipe's augmentation (not torchvision's RandAugment).

    Draws ``num_ops`` operations with replacement from :attr:`OPS` and applies each with probability 0.5.
    ``magnitude`` is on a 0-10 scale; at 7: brightness and sharpness factor 1.36 (never below 1), shears
    of +-0.21, translations of +-7 pixels, rotations of +-21 degrees, empty areas filled with grey 128.
    Geometry follows OpenCV's ``warpAffine`` (pixel centres at integer coordinates, bilinear), as the
    reference. Random numbers come from torch, which DataLoader seeds per worker.
    """

    OPS = (
        "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
        "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
    )  # fmt: skip
    MAX_LEVEL = 10.0
    TRANSLATE_PIXELS = 10.0
    FILL = (128, 128, 128)

    def __init__(self, num_ops: int = 2, magnitude: float = 7, prob: float = 0.5) -> None:
        self.num_ops, self.magnitude, self.prob = num_ops, magnitude, prob

    def __call__(self, image: Image.Image) -> Image.Image:
        picks = torch.randint(len(self.OPS), (self.num_ops,)).tolist()
        for index in picks:
            if torch.rand(()).item() > self.prob:
                continue
            image = self.apply(image, self.OPS[index], _random_sign())
        return image

    def apply(self, image: Image.Image, op: str, sign: float = 1.0) -> Image.Image:
        """``image`` (RGB) after operation ``op`` at this magnitude; ``sign`` (+-1) orients the geometric ones."""
        level = self.magnitude / self.MAX_LEVEL
        factor = level * 1.8 + 0.1
        if op == "Identity":
            return image
        if op in ("AutoContrast", "Equalize", "Brightness", "Sharpness"):
            pixels = np.asarray(image.convert("RGB"))
            func = {
                "AutoContrast": autocontrast,
                "Equalize": equalize,
                "Brightness": brightness,
                "Sharpness": sharpness,
            }
            return Image.fromarray(func[op](pixels, factor) if op in ("Brightness", "Sharpness") else func[op](pixels))
        if op == "ShearX":
            return _warp(image, np.array([[1.0, sign * level * 0.3, 0.0], [0.0, 1.0, 0.0]]), self.FILL)
        if op == "ShearY":
            return _warp(image, np.array([[1.0, 0.0, 0.0], [sign * level * 0.3, 1.0, 0.0]]), self.FILL)
        if op == "TranslateX":
            return _warp(
                image, np.array([[1.0, 0.0, -sign * level * self.TRANSLATE_PIXELS], [0.0, 1.0, 0.0]]), self.FILL
            )
        if op == "TranslateY":
            return _warp(
                image, np.array([[1.0, 0.0, 0.0], [0.0, 1.0, -sign * level * self.TRANSLATE_PIXELS]]), self.FILL
            )
        if op == "Rotate":
            return _warp(image, rotation_matrix(image.size, sign * level * 30.0), self.FILL)
        raise ValueError(f"unknown augmentation {op!r}; known: {self.OPS}")


def _random_sign() -> float:
    return -1.0 if torch.rand(()).item() < 0.5 else 1.0


def autocontrast(pixels: np.ndarray) -> np.ndarray:
    """Stretch each channel of H x W x 3 uint8 pixels to 0..255 (values truncated, as the reference)."""
    out = np.empty_like(pixels)
    for c in range(pixels.shape[2]):
        channel = pixels[..., c]
        low, high = int(channel.min()), int(channel.max())
        table = np.arange(256, dtype=np.float64)
        if high > low:
            scale = 255.0 / (high - low)
            table = table * scale - low * scale
        out[..., c] = table.clip(0, 255).astype(np.uint8)[channel]
    return out


def equalize(pixels: np.ndarray) -> np.ndarray:
    """Histogram equalisation of each channel, computed as PIL's ``ImageOps.equalize``."""
    out = np.empty_like(pixels)
    for c in range(pixels.shape[2]):
        channel = pixels[..., c]
        hist = np.bincount(channel.ravel(), minlength=256).astype(np.float64)
        nonzero = hist[hist != 0]
        step = np.sum(nonzero[:-1]) // 255
        if step == 0:
            out[..., c] = channel
            continue
        shifted = np.concatenate([[step // 2], hist[:-1]])
        out[..., c] = np.minimum(np.cumsum(shifted) // step, 255).astype(np.uint8)[channel]
    return out


def brightness(pixels: np.ndarray, factor: float) -> np.ndarray:
    return np.minimum(np.arange(256, dtype=np.float32) * factor, 255).astype(np.uint8)[pixels]


def sharpness(pixels: np.ndarray, factor: float) -> np.ndarray:
    """Blend the interior pixels away from their 3 x 3 smoothing (centre weight 5 of 13) by ``factor``; the
    one-pixel border is kept. Values are clipped to 0..255 (the reference casts without clipping, so its
    over- and undershoots wrap around)."""
    image = pixels.astype(np.float32)
    smooth = np.zeros_like(image[1:-1, 1:-1])
    for dy in range(3):
        for dx in range(3):
            smooth += image[dy : dy + image.shape[0] - 2, dx : dx + image.shape[1] - 2] * (5 if dy == dx == 1 else 1)
    smooth = (smooth / 13.0).round()  # OpenCV's filter2D on uint8 rounds its output
    out = image.copy()
    out[1:-1, 1:-1] = smooth + factor * (image[1:-1, 1:-1] - smooth)
    return out.clip(0, 255).astype(np.uint8)


def rotation_matrix(size: tuple[int, int], degrees: float) -> np.ndarray:
    """OpenCV's ``getRotationMatrix2D`` about (W/2, H/2): 2 x 3, counter-clockwise for positive degrees."""
    cx, cy = size[0] / 2, size[1] / 2
    a, b = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return np.array([[a, b, (1 - a) * cx - b * cy], [-b, a, b * cx + (1 - a) * cy]])


def _warp(image: Image.Image, forward: np.ndarray, fill: tuple[int, int, int]) -> Image.Image:
    """Image moved by the 2 x 3 affine map ``forward`` (source -> destination pixel coordinates, OpenCV's
    convention), bilinear, with ``fill`` outside the source."""
    inverse = np.linalg.inv(np.vstack([forward, [0.0, 0.0, 1.0]]))[:2]
    # PIL samples at pixel centres (x + 0.5, y + 0.5); shift so that integer coordinates map as in OpenCV.
    linear, offset = inverse[:, :2], inverse[:, 2]
    offset = offset - linear.sum(axis=1) * 0.5 + 0.5
    data = (linear[0, 0], linear[0, 1], offset[0], linear[1, 0], linear[1, 1], offset[1])
    return image.convert("RGB").transform(
        image.size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR, fillcolor=fill
    )
