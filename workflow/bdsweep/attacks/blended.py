"""Blended (Chen et al., 2017): the whole image is alpha-blended with a key pattern,
x' = (1 - alpha) x + alpha p, with the same alpha (0.2) at training and test time.

The pattern is an image file (``image``, resized to the dataset's size with bilinear
interpolation) or, by default, a deterministic built-in pattern: uniform random RGB noise from a
fixed seed, the second key pattern of the Blended paper (the first, "Hello Kitty", is not ours to
ship)."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from . import Resource, ResourceContext, data_poisoning, in_chunks


@dataclass(frozen=True)
class BlendedParams:
    alpha: float = 0.2
    image: str = ""  # path of the key image; empty: the built-in noise pattern
    pattern_seed: int = 0  # seed of the built-in noise pattern

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.image and not Path(self.image).expanduser().is_file():
            raise ValueError(f"image: no such file: {self.image}")


def key_pattern(context: ResourceContext, params: BlendedParams) -> Resource:
    size = context.image_size
    if params.image:
        from PIL import Image

        with Image.open(Path(params.image).expanduser()) as image:
            pattern = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    else:
        pattern = np.random.default_rng(params.pattern_seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return {"pattern": pattern}


@data_poisoning("blended", "Blended: x' = 0.8 x + 0.2 key image", BlendedParams, key_pattern)
def blend(images: np.ndarray, resource: Resource, params: BlendedParams) -> np.ndarray:
    """rint((1 - alpha) x + alpha p), in chunks of whole images."""
    pattern = resource["pattern"]
    fraction = Fraction(params.alpha).limit_denominator(255)
    if float(fraction) == params.alpha and fraction.denominator % 2:
        # alpha = m / n with n odd (0.2 = 1/5): ((n - m) x + m p) / n is a multiple of 1 / n, never
        # within 1 / (2n) of a half, so integer floor((... + n // 2) / n) equals the float formula
        # rounded, and is several times faster.
        m, n = fraction.numerator, fraction.denominator
        offset = (m * pattern.astype(np.uint16) + n // 2)[None]
        return in_chunks(images, lambda x: ((np.uint16(n - m) * x.astype(np.uint16) + offset) // n).astype(np.uint8))
    weighted = (params.alpha * pattern.astype(np.float64))[None]
    return in_chunks(images, lambda x: np.rint((1 - params.alpha) * x + weighted).astype(np.uint8))
