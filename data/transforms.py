"""Image transforms of the reference recipe (CLIP normalisation)."""

from __future__ import annotations

from torchvision import transforms
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_transform(image_res: int, train: bool = False) -> transforms.Compose:
    """PIL RGB image -> normalised tensor 3 x R x R.

    Test: resize to R x R (bicubic, aspect not kept). Train: random resized crop (scale 0.5-1, bicubic),
    horizontal flip and RandAugment (2 ops, magnitude 7). The reference restricts RandAugment to
    identity, auto-contrast, equalize, brightness, sharpness, shears, translations and rotation;
    torchvision's RandAugment also draws colour, contrast, posterize and solarize, so the op list is
    narrowed to match.
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
            ReferenceRandAugment(num_ops=2, magnitude=7),
            *normalise,
        ]
    )


class ReferenceRandAugment(transforms.RandAugment):
    """RandAugment restricted to the reference recipe's operations."""

    OPS = (
        "Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
        "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
    )  # fmt: skip

    def _augmentation_space(self, num_bins: int, image_size: tuple[int, int]) -> dict:
        space = super()._augmentation_space(num_bins, image_size)
        return {name: space[name] for name in self.OPS}
