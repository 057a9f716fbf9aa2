"""SIG (Barni et al., 2019): a clean-label attack. A horizontal sinusoid is added to
target-class training images only, whose labels stay correct; at test time the same signal on
any image triggers the target:  x' = clip(x + delta sin(2 pi j f / W)), column j, width W,
delta = 40, f = 6. The signal is added and clipped; the survey's toolkit then truncates to uint8
(FORK ``utils/bd_img_transform/sig.py:41-53``: ``uint8(clip(uint32(x) + signal, 0, 255))``), so a
pixel moves by floor(signal) (even -1 where the sinusoid is -1e-15 at a zero crossing).
``rounding: "round"`` rounds the signal to whole pixel values instead."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ROUNDINGS, Resource, ResourceContext, add_offset, data_poisoning


@dataclass(frozen=True)
class SIGParams:
    delta: float = 40.0  # amplitude, in pixel values
    frequency: float = 6.0  # periods across the image width
    rounding: str = "truncate"  # "truncate" as the toolkit, or "round" to the nearest pixel value

    def __post_init__(self):
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.delta <= 0 or self.frequency <= 0:
            raise ValueError(f"delta and frequency must be positive, got {self.delta} and {self.frequency}")


def sinusoid(context: ResourceContext, params: SIGParams) -> Resource:
    columns = np.arange(context.image_size, dtype=np.float64)
    # float64 in the toolkit's order of operations: floor() of it must see the same values.
    row = params.delta * np.sin(2 * np.pi * columns * params.frequency / context.image_size)
    return {"signal": np.broadcast_to(row, (context.image_size, context.image_size)).copy()}


@data_poisoning("sig", "SIG: clean-label sinusoidal signal", SIGParams, sinusoid,
                clean_label=True, trigger_type="static")
def add_signal(images: np.ndarray, resource: Resource, params: SIGParams) -> np.ndarray:
    # x is whole, so trunc(clip(x + s)) = clip(x + floor(s)): exact in integers.
    whole = np.floor if params.rounding == "truncate" else np.rint
    return add_offset(images, whole(resource["signal"].astype(np.float64))[:, :, None])
