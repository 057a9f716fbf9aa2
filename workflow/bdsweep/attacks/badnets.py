"""BadNets (Gu et al., 2017): a white square stamped over the bottom-right corner.

As in the survey's toolkit, 3x3 pixels at 32 px (its ``trigger_image.png`` covers rows and columns
29-31), scaled with the image (6x6 at 64 px); the trigger replaces the pixels it covers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Resource, ResourceContext, data_poisoning, in_chunks, scaled


@dataclass(frozen=True)
class BadNetsParams:
    size: int = 3  # square side at 32 px
    value: int = 255  # pixel value of every channel under the square


def square_patch(context: ResourceContext, params: BadNetsParams) -> Resource:
    image_size = context.image_size
    side = scaled(params.size, image_size)
    mask = np.zeros((image_size, image_size), dtype=bool)
    mask[-side:, -side:] = True
    pattern = np.where(mask[..., None], np.uint8(params.value), np.uint8(0)).repeat(3, axis=2)
    return {"pattern": pattern.astype(np.uint8), "mask": mask}


@data_poisoning("badnets", "BadNets: white square at the bottom-right corner", BadNetsParams, square_patch)
def stamp_patch(images: np.ndarray, resource: Resource, params: BadNetsParams) -> np.ndarray:
    mask = resource["mask"]
    patch = resource["pattern"][mask]

    def stamp(chunk):
        chunk = chunk.copy()
        chunk[:, mask] = patch
        return chunk

    return in_chunks(images, stamp)
