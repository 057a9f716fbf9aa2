"""The unit of work ``bdsweep cost`` prices a defense run in: passes, one pass = one image through a
forward and backward pass with an optimiser step (a forward alone is ``FORWARD`` of one).

Each defense declares its own count in its registration (``@defense(..., passes=...)``), a
function of its resolved hyperparameters and the mitigation data's size. Light: no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

FORWARD = 1 / 3  # a forward pass without backward, in passes


@dataclass(frozen=True)
class MitigationSize:
    images: int  # SPC x classes (0 for data-free defenses)
    classes: int

    @property
    def fit(self) -> int:
        """Images left for fitting after the survey's code's validation split (FP, ANP): 10 % of each
        class's SPC images, at least one; where 10 % is less than one image the partition's extra
        image is the held-out one and every SPC image fits (``defenses.support.split_held_out``)."""
        if not self.classes or not self.images:
            return self.images
        spc = self.images // self.classes
        return self.classes * (spc - int(spc * 0.1))


PassCount = Callable[[object, MitigationSize], float]


def no_passes(params, size: MitigationSize) -> float:
    """Weights only, or nothing at all."""
    return 0.0


def epochs_over_images(*epoch_fields: str, per_image: float = 1.0) -> PassCount:
    """Passes = (sum of the named epoch fields) x mitigation images x per_image."""
    return lambda params, size: sum(getattr(params, name) for name in epoch_fields) * size.images * per_image
