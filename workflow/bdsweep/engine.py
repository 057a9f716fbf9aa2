"""The training and inference engine every stage shares.

Images stay uint8 NHWC on the device; each batch is cropped, flipped and normalised there, so no
host-side data loader or per-image Python runs in the loop. Evaluation runs once, in inference
mode, with large batches.
"""

from __future__ import annotations

import functools
import math
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class Recipe:
    """An SGD training recipe; the defaults are the survey's backdoored-model recipe."""

    epochs: int = 100
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" (per epoch, to 0) or "constant"
    crop_padding: int = 4  # random-crop padding; 0 disables cropping
    augment: bool = True

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs and batch_size must be at least 1 and lr positive")


@dataclass(frozen=True)
class Normalisation:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    hflip: bool  # horizontal flips preserve labels on this dataset

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Float NCHW images in [0, 1] -> the model's input scale."""
        mean, std = _channel_stats(self.mean, self.std, images.device)
        return (images - mean) / std

    def apply(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> normalised float NCHW."""
        return self.normalise(to_unit(batch))


def to_unit(batch: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [0, 1]."""
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float NCHW in [0, 1] -> uint8 NHWC, rounded to the nearest pixel value."""
    return images.detach().mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@functools.cache
def _channel_stats(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, 3, 1, 1) tensors, made once per device instead of copied every batch."""
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def as_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    # np.require copies read-only memory maps, which torch cannot wrap.
    return torch.from_numpy(np.require(array, requirements=["C", "W"])).to(device)


def autocast(device: torch.device):
    # bf16 keeps the fp32 exponent range, so no loss scaling is needed.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def augment_batch(batch: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip for a whole NCHW batch (any
    dtype; differentiable for float input, so a trigger generator trains through it)."""
    n, c, h, w = batch.shape
    device = batch.device
    if padding:
        # Gather whole pixels (channel vectors) through an NHWC view: far cheaper than per element.
        pixels = F.pad(batch, (padding, padding, padding, padding)).permute(0, 2, 3, 1)
        dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=device, generator=generator)
        dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), device=device, generator=generator)
        rows = dy + torch.arange(h, device=device).view(1, h, 1)
        cols = dx + torch.arange(w, device=device).view(1, 1, w)
        batch = pixels[torch.arange(n, device=device).view(n, 1, 1), rows, cols].permute(0, 3, 1, 2)
    if hflip:
        flip = torch.rand(n, device=device, generator=generator) < 0.5
        batch = torch.where(flip.view(n, 1, 1, 1), batch.flip(3), batch)
    return batch


class AttackHook:
    """How a training-time attack takes part in training; the engine's loop stays the attack's.

    Each batch is shuffled, then turned into float NCHW images in [0, 1], then handed to
    ``poison``, then augmented and normalised: triggers are applied before augmentation, as the
    training-time attacks' own code does. ``poison`` may return an extra loss term (IAB's
    diversity loss); ``step`` runs after the classifier's optimiser step (IAB's generator step)."""

    def poison(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return images, labels, None

    def step(self) -> None:
        pass

    def end_epoch(self) -> None:
        pass


def train(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    normalisation: Normalisation,
    seed: int,
    description: str = "train",
    hook: AttackHook | None = None,
    progress: bool | None = None,
) -> list[dict]:
    """Train ``model`` in place on uint8 NHWC ``images`` (already on the model's device).

    ``hook`` is a training-time attack's part in each batch (see :class:`AttackHook`).
    Returns the per-epoch curve."""
    from tqdm.auto import tqdm

    device = images.device
    generator = torch.Generator(device=device).manual_seed(seed)
    optimiser = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, recipe.epochs)
                 if recipe.schedule == "cosine" else None)
    n = len(labels)
    batches = max(1, math.ceil(n / recipe.batch_size))
    curve = []
    model.train()
    bar = tqdm(range(recipe.epochs), desc=description, disable=(not progress) if progress is not None else None)
    for epoch in bar:
        order = torch.randperm(n, device=device, generator=generator)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for b in range(batches):
            index = order[b * recipe.batch_size:(b + 1) * recipe.batch_size]
            x, y, extra_loss = images[index].permute(0, 3, 1, 2), labels[index], None
            with autocast(device):
                if hook is not None:  # poison first, then augment the float batch
                    x, y, extra_loss = hook.poison(x.float().div_(255.0), y, index)
                if recipe.augment:
                    x = augment_batch(x, recipe.crop_padding, normalisation.hflip, generator)
                if hook is None:  # augmenting uint8 is cheaper; convert afterwards
                    x = x.float().div_(255.0)
                logits = model(normalisation.normalise(x))
                loss = F.cross_entropy(logits, y)
                objective = loss if extra_loss is None else loss + extra_loss
            optimiser.zero_grad(set_to_none=True)
            objective.backward()
            optimiser.step()
            if hook is not None:
                hook.step()
            loss_sum += loss.detach() * len(y)
            correct += (logits.argmax(1) == y).sum()
        lr = optimiser.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()
        if hook is not None:
            hook.end_epoch()
        # One host sync per epoch, not per batch.
        row = {"epoch": epoch + 1, "loss": loss_sum.item() / n, "accuracy": correct.item() / n, "lr": lr}
        curve.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}")
    model.eval()
    return curve


@torch.inference_mode()
def predict(model: nn.Module, images: np.ndarray | torch.Tensor, normalisation: Normalisation,
            device: torch.device, batch_size: int = 1024) -> np.ndarray:
    """Predicted labels for uint8 NHWC ``images`` (host or device), in large inference batches."""
    model.eval()
    predictions = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        chunk = chunk.to(device) if isinstance(chunk, torch.Tensor) else as_tensor(chunk, device)
        with autocast(device):
            predictions.append(model(normalisation.apply(chunk)).argmax(1))
    if not predictions:
        return np.zeros(0, dtype=np.int64)
    return torch.cat(predictions).cpu().numpy().astype(np.int64)
