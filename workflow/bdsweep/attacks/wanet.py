"""WaNet (Nguyen & Tran, 2021): the trigger is a small, smooth, fixed warp of the image.

A random k x k field of 2-D offsets (uniform in [-1, 1], normalised to mean magnitude 1) is
upsampled bicubically to the image size; the warp moves each pixel by s * field / H in
grid_sample's [-1, 1] coordinates. Per batch, a share ``ratio`` of images is warped and relabelled
to the target, and ``int(n_backdoor * cross_ratio)`` images (the "noise" or cross samples, counted
as the toolkit does: FORK ``attack/wanet.py`` train_step, ``num_cross = int(num_bd * cross_ratio)``)
are warped with the field plus random per-pixel noise and keep their label, so the model learns this
warp only.

The backdoor test set is made as the toolkit makes it (FORK ``attack/wanet.py`` stage2, the
"Evaluate Backdoor" loop): the warp of the *normalised* image, denormalised with torchvision's
two-step inverse of ``Normalize`` (``get_dataset_denormalization``) and truncated to uint8 by
``ToPILImage`` (``rounding: "truncate"``; ``"round"`` rounds to the nearest value)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..engine import Normalisation
from . import ROUNDINGS, SCHEDULES, HookContext, PostTransformHook, training_time


@dataclass(frozen=True)
class WaNetParams:
    k: int = 4  # control-grid size
    s: float = 0.5  # warping strength
    cross_ratio: float = 2.0  # noise samples per backdoor sample
    grid_rescale: float = 1.0
    rounding: str = "truncate"  # backdoor test images: "truncate" as the toolkit, or "round"
    # The toolkit's recipe: a constant learning rate (FORK config/attack/wanet/default.yaml: MultiStepLR at
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
        if self.k < 2:
            raise ValueError(f"k must be at least 2, got {self.k}")
        if self.s < 0 or self.cross_ratio < 0 or self.grid_rescale <= 0:
            raise ValueError("s and cross_ratio must be non-negative and grid_rescale positive")


def identity_grid(size: int) -> torch.Tensor:
    """(1, size, size, 2) sampling grid (x, y) of grid_sample that reproduces the image."""
    line = torch.linspace(-1, 1, size)
    rows, cols = torch.meshgrid(line, line, indexing="ij")
    return torch.stack((cols, rows), dim=-1).unsqueeze(0)


def warp_field(size: int, params: WaNetParams, generator: torch.Generator) -> torch.Tensor:
    """The fixed backdoor sampling grid, (1, size, size, 2)."""
    offsets = torch.rand(1, 2, params.k, params.k, generator=generator) * 2 - 1
    offsets = offsets / offsets.abs().mean()
    field = F.interpolate(offsets, size=size, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    return (identity_grid(size) + params.s * field / size * params.grid_rescale).clamp(-1, 1)


def warp(images: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(images, grid.expand(len(images), -1, -1, -1).to(images.dtype), align_corners=True)


def warp_normalised(images: torch.Tensor, grid: torch.Tensor, normalisation: Normalisation) -> torch.Tensor:
    """The toolkit's test-set warp of images in [0, 1]: normalise (``sub(mean).div(std)``), warp, then
    undo the normalisation as ``get_dataset_denormalization`` does, ``div(float32(1 / std)).sub(-mean)``,
    so the float result, and its truncation, are the toolkit's to the bit."""
    mean = torch.tensor(normalisation.mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(normalisation.std, device=images.device).view(1, -1, 1, 1)
    inverse_std = torch.tensor([1 / s for s in normalisation.std], device=images.device).view(1, -1, 1, 1)
    negative_mean = torch.tensor([-m for m in normalisation.mean], device=images.device).view(1, -1, 1, 1)
    warped = warp(images.sub(mean).div(std), grid)
    return warped.div(inverse_std).sub(negative_mean)


class WaNetHook(PostTransformHook):
    def __init__(self, context: HookContext, params: WaNetParams):
        super().__init__(context)
        self.params = params
        self.grid = warp_field(context.image_size, params, torch.Generator().manual_seed(context.seed))
        self.grid = self.grid.to(context.device)
        self.noise = torch.Generator(device=context.device).manual_seed(context.seed + 1)
        self.start_post_transform(context.seed)

    def poison(self, images, labels, indices):
        n_backdoor = int(self.context.ratio * len(indices))
        backdoor, cross = self.split_counts(indices, n_backdoor, int(n_backdoor * self.params.cross_ratio))
        images, labels = images.clone(), labels.clone()
        images[backdoor] = warp(images[backdoor], self.grid)
        labels[backdoor] = self.context.target
        if len(cross):
            size = self.context.image_size
            noise = torch.rand(len(cross), size, size, 2, device=images.device, generator=self.noise) * 2 - 1
            images[cross] = F.grid_sample(images[cross], (self.grid + noise / size).clamp(-1, 1).to(images.dtype),
                                          align_corners=True)
        return images, labels, None

    def trigger(self, images):
        return warp_normalised(images, self.grid, self.context.normalisation)

    def state(self):
        return {"warp_grid": self.grid.cpu().numpy()}


@training_time("wanet", "WaNet: warping-based trigger", WaNetParams, trigger_type="dynamic")
def make_hook(context: HookContext, params: WaNetParams) -> WaNetHook:
    return WaNetHook(context, params)
