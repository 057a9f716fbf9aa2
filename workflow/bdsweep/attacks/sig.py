"""SIG (Barni et al., 2019): a clean-label attack. A horizontal sinusoid is added to
target-class training images only, whose labels stay correct; at test time the same signal on
any image triggers the target:  x' = clip(x + delta sin(2 pi j f / W)), column j, width W,
delta = 40, f = 6. The signal is rounded to whole pixel values, then added and clipped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import Resource, ResourceContext, add_offset, data_poisoning


@dataclass(frozen=True)
class SIGParams:
    delta: float = 40.0  # amplitude, in pixel values
    frequency: float = 6.0  # periods across the image width

    def __post_init__(self):
        if self.delta <= 0 or self.frequency <= 0:
            raise ValueError(f"delta and frequency must be positive, got {self.delta} and {self.frequency}")


def sinusoid(context: ResourceContext, params: SIGParams) -> Resource:
    columns = np.arange(context.image_size, dtype=np.float64)
    row = params.delta * np.sin(2 * np.pi * columns * params.frequency / context.image_size)
    return {"signal": np.broadcast_to(row, (context.image_size, context.image_size)).astype(np.float32)}


@data_poisoning("sig", "SIG: clean-label sinusoidal signal", SIGParams, sinusoid, clean_label=True)
def add_signal(images: np.ndarray, resource: Resource, params: SIGParams) -> np.ndarray:
    return add_offset(images, np.rint(resource["signal"])[:, :, None])
