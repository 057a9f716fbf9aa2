"""Blended (Chen et al., 2017): the whole image is alpha-blended with a key pattern,
x' = (1 - alpha) x + alpha p, with the same alpha (0.2) at training and test time.

The survey's toolkit truncates the blend to uint8 (FORK ``utils/bd_img_transform/blended.py:23``
through ``patch.py:39-44`` ``npClipAndToUint8``) and blends with the float pattern that
``ToPILImage -> Resize -> ToTensor`` and ``* 255`` make of the key image
(``utils/aggregate_block/bd_attack_generate.py:81-111``); ``rounding: "truncate"`` (default)
reproduces its bytes, ``"round"`` rounds to the nearest value instead.

The pattern is an image file (``image``, resized to the dataset's size with bilinear
interpolation) or, by default, a deterministic built-in pattern: uniform random RGB noise from a
fixed seed, the second key pattern of the Blended paper (the first, "Hello Kitty", is not ours to
ship)."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..params import input_file
from . import ROUNDINGS, Resource, ResourceContext, data_poisoning, in_chunks

# The survey's key image is not ours to ship (CC BY-NC 4.0); where to get it.
WHERE_TO_GET_IT = ("The survey's Blended key image is BackdoorBench's resource/blended/hello_kitty.jpeg "
                   "(https://github.com/SCLBD/BackdoorBench/blob/main/resource/blended/hello_kitty.jpeg, "
                   "CC BY-NC 4.0, not shipped with bdsweep): download it to that path, or set "
                   "attacks.blended.image to where it is (or to \"\" for the built-in noise pattern).")


@dataclass(frozen=True)
class BlendedParams:
    alpha: float = 0.2
    image: str = input_file()  # path of the key image; empty: the built-in noise pattern
    pattern_seed: int = 0  # seed of the built-in noise pattern
    rounding: str = "truncate"  # "truncate" as the toolkit, or "round" to the nearest pixel value

    def __post_init__(self):
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.image and not Path(self.image).expanduser().is_file():
            raise ValueError(f"image: no such file: {self.image} (relative paths start at the working directory). "
                             f"{WHERE_TO_GET_IT}")


def key_pattern(context: ResourceContext, params: BlendedParams) -> Resource:
    size = context.image_size
    if params.image:
        from PIL import Image

        with Image.open(Path(params.image).expanduser()) as image:
            pattern = np.asarray(image.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.uint8)
    else:
        pattern = np.random.default_rng(params.pattern_seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return {"pattern": pattern}


@data_poisoning("blended", "Blended: x' = 0.8 x + 0.2 key image", BlendedParams, key_pattern, trigger_type="static")
def blend(images: np.ndarray, resource: Resource, params: BlendedParams) -> np.ndarray:
    """trunc or rint of (1 - alpha) x + alpha p, in chunks of whole images."""
    pattern = resource["pattern"]
    if params.rounding == "truncate":
        # The toolkit's pattern is float32 p / 255 * 255 (ToTensor, then * 255); alpha * pattern stays
        # float32 (a Python float times a float32 array), (1 - alpha) * x is float64, the sum float64.
        unit = pattern.astype(np.float32) / np.float32(255)
        weighted = ((unit * np.float32(255)) * np.float32(params.alpha)).astype(np.float64)[None]
        return in_chunks(images, lambda x: np.clip((1 - params.alpha) * x + weighted, 0, 255).astype(np.uint8))
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
