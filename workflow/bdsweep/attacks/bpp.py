"""BPP (Wang et al., 2022): the trigger is colour quantisation. Each channel is squeezed to
``squeeze`` levels (8: x' = round(x (q - 1)) / (q - 1)), without dithering. Per batch, a share
``ratio`` of images is quantised and relabelled to the target; a share ``negative_ratio`` become
negative samples that keep their labels: the image plus the quantisation residual of another,
random training image (clipped), so the model keys on quantisation, not on any small change.

The backdoor test set stores the quantised images as the toolkit does (FORK ``attack/bpp.py``, its
test-set loop, then ``ToPILImage``): levels k/7 * 255 truncated to uint8 (0, 36, 72, 109, 145, 182,
218, 255) with ``rounding: "truncate"``; ``"round"`` gives the nearest values (73, 146, 219 ...)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..engine import to_unit
from . import ROUNDINGS, SCHEDULES, HookContext, PostTransformHook, training_time


@dataclass(frozen=True)
class BPPParams:
    squeeze: int = 8  # colour levels per channel
    negative_ratio: float = 0.1  # share of each batch made negative samples
    rounding: str = "truncate"  # backdoor test images: "truncate" as the toolkit, or "round"
    # The toolkit's recipe: a constant learning rate (FORK config/attack/bpp/default.yaml: MultiStepLR at
    # epochs 100, 200, ... is never reached), or "training": the training section's schedule.
    schedule: str = "constant"
    # The toolkit's per-batch PostTensorTransform on normalised tensors instead of the engine's per-image
    # crop 4 + flip (its train loader uses the test transform): crop after zero padding (p 0.8),
    # rotation (p 0.5), flip where the dataset allows it (FORK: CIFAR-10 only). False: the engine's.
    post_transform: bool = True
    crop_padding: int = 5  # FORK random_crop
    rotation: float = 10.0  # FORK random_rotation, degrees

    def __post_init__(self):
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.crop_padding < 0 or self.rotation < 0:
            raise ValueError("crop_padding and rotation must be non-negative")
        if self.squeeze < 2:
            raise ValueError(f"squeeze must be at least 2 levels, got {self.squeeze}")
        if not 0 <= self.negative_ratio < 1:
            raise ValueError(f"negative_ratio must be in [0, 1), got {self.negative_ratio}")


def quantise(images: torch.Tensor, levels: int) -> torch.Tensor:
    """Float images in [0, 1] (from uint8 pixels) -> ``levels`` values per channel."""
    pixels = torch.round(images * 255)
    return torch.round(pixels / 255 * (levels - 1)) / (levels - 1)


class BPPHook(PostTransformHook):
    def __init__(self, context: HookContext, params: BPPParams):
        super().__init__(context)
        self.params = params
        self.generator = torch.Generator(device=context.device).manual_seed(context.seed)
        self.start_post_transform(context.seed)

    def poison(self, images, labels, indices):
        backdoor, negative = self.split(indices, self.context.ratio, self.params.negative_ratio)
        images, labels = images.clone(), labels.clone()
        images[backdoor] = quantise(images[backdoor], self.params.squeeze)
        labels[backdoor] = self.context.target
        if len(negative):
            donors = torch.randint(0, len(self.context.images), (len(negative),), device=images.device,
                                   generator=self.generator)
            donor = to_unit(self.context.images[donors])
            residual = quantise(donor, self.params.squeeze) - donor
            images[negative] = (images[negative] + residual).clamp(0, 1)
        return images, labels, None

    def trigger(self, images):
        return quantise(images, self.params.squeeze)


@training_time("bpp", "BPP: colour-quantisation trigger", BPPParams, trigger_type="dynamic")
def make_hook(context: HookContext, params: BPPParams) -> BPPHook:
    return BPPHook(context, params)
