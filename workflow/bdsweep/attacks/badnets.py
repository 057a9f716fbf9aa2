"""BadNets (Gu et al., 2017): a white square stamped over the bottom-right corner.

As in the survey's toolkit: its ``resource/badnet/trigger_image.png`` is a 32x32 black image with a
3x3 white square at rows and columns 29-31 (bdsweep draws the same image instead of shipping it).
At another image size the toolkit resizes that 32-px image bilinearly (FORK
``utils/aggregate_block/bd_attack_generate.py:53-79``, PIL ``Resize``), so at 64 px the trigger is
a graded 7x7 patch (rows and columns 57-63: 255 inside, 191/64/48/16 on its edges). Stamping
replaces every value where the trigger is non-zero (FORK ``utils/bd_img_transform/patch.py:47``,
``img * (t == 0) + t * (t > 0)``). The toolkit only ever enlarges the image (no dataset is below
32 px); below 32 px bdsweep shrinks it with nearest-neighbour sampling, so the square stays a white
square (2x2 at 16 px) instead of blurring into a faint grey corner that a short training never
learns."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Resource, ResourceContext, data_poisoning, in_chunks

RESIZES = ("bilinear", "nearest")
TRIGGER_SIZE = 32  # the toolkit's trigger image is drawn at 32 px and resized to the dataset's size


@dataclass(frozen=True)
class BadNetsParams:
    size: int = 3  # square side at 32 px
    value: int = 255  # pixel value of every channel under the square
    # How the 32-px trigger image reaches another size: "bilinear" as the toolkit (a graded 7x7 patch
    # at 64 px); "nearest" keeps a sharp white square (6x6 at 64 px).
    resize: str = "bilinear"

    def __post_init__(self):
        if self.resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, got {self.resize!r}")
        if not 1 <= self.size <= TRIGGER_SIZE or not 1 <= self.value <= 255:
            raise ValueError(f"size must be in [1, {TRIGGER_SIZE}] and value in [1, 255]")


def square_patch(context: ResourceContext, params: BadNetsParams) -> Resource:
    pattern = np.zeros((TRIGGER_SIZE, TRIGGER_SIZE, 3), dtype=np.uint8)
    pattern[-params.size:, -params.size:] = params.value
    if context.image_size != TRIGGER_SIZE:
        from PIL import Image

        enlarging = context.image_size > TRIGGER_SIZE
        method = Image.BILINEAR if params.resize == "bilinear" and enlarging else Image.NEAREST
        size = (context.image_size, context.image_size)
        pattern = np.asarray(Image.fromarray(pattern).resize(size, method), dtype=np.uint8)
    return {"pattern": pattern, "mask": (pattern > 0).any(axis=2)}


@data_poisoning("badnets", "BadNets: white square at the bottom-right corner", BadNetsParams, square_patch,
                trigger_type="static")
def stamp_patch(images: np.ndarray, resource: Resource, params: BadNetsParams) -> np.ndarray:
    """Every value where the trigger is non-zero becomes the trigger's (per channel, as the toolkit)."""
    mask = resource["mask"]
    patch = resource["pattern"][mask]  # (pixels, channels)
    covered = patch > 0

    def stamp(chunk):
        chunk = chunk.copy()
        chunk[:, mask] = np.where(covered, patch, chunk[:, mask])
        return chunk

    return in_chunks(images, stamp)
