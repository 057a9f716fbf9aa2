"""FST (Min, Qin, Shen and Cheng, NeurIPS 2023): "Towards Stable Backdoor Purification through Feature
Shift Tuning".

Plain fine-tuning barely moves the backdoored features, because the old classifier head keeps rewarding
them. FST therefore
1. re-initialises the classifier head ``model.parts.classifier`` (weight and bias uniform in
   +-1/sqrt(fan_in), as a fresh ``nn.Linear``) and keeps a frozen copy w_ori of the original weight;
2. fine-tunes the WHOLE model on CE + alpha * <w, w_ori> (the sum of the element-wise product of the new
   and the original head weight), which pushes the new head, and with it the features, away from the
   backdoored ones;
3. after every optimiser step rescales the new weight to the original's Frobenius norm, ||w|| = ||w_ori||,
   so the regulariser cannot be lowered by shrinking or inflating w.

Interpretations (from the authors' code, which the survey ran): the regulariser and the norm constraint
cover the head's weight only, not its bias; SGD momentum 0.9 with cosine decay over the epochs, batch 128,
random crop (padding 4) and flip where the dataset allows. Their optimiser has no weight decay, so the
default here is 0 (``weight_decay`` sets one; on the head it would be undone by the projection anyway).
The fresh head is not rescaled before the first step, as in the authors' code.

Few data: nothing is held out, so SPC 1 runs as is. With fewer images than ``batch_size`` every epoch is
one batch of all of them (noted); the engine skips a trailing batch of one image (noted); with fewer than
2 images nothing can be trained (BN needs 2) and the model is returned unchanged, head included (noted),
since a re-initialised but untrained head would leave a model that guesses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..engine import BatchHook, Recipe, train
from ..params import check_ranges
from . import Defended, defense, run_seed
from .support import batching_notes, untrainable


@dataclass(frozen=True)
class FSTParams:
    epochs: int = 10
    lr: float = 0.01
    alpha: float = 0.2  # weight of the inner product <w, w_ori>
    momentum: float = 0.9
    weight_decay: float = 0.0  # the authors' optimiser has none
    batch_size: int = 128
    schedule: str = "cosine"  # "cosine" (the authors') or "constant"
    augment: bool = True  # random crop (padding 4) and flip where the dataset allows

    def __post_init__(self):
        check_ranges("FST", self, {
            "epochs": self.epochs >= 1,
            "lr": self.lr > 0,
            "alpha": self.alpha >= 0,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "batch_size": self.batch_size >= 1,
            "schedule": self.schedule in ("cosine", "constant"),
        })

    def recipe(self) -> Recipe:
        return Recipe(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=self.momentum,
                      weight_decay=self.weight_decay, schedule=self.schedule, augment=self.augment)


@torch.no_grad()
def reinitialise_head(head: nn.Linear, generator: torch.Generator) -> torch.Tensor:
    """Draw fresh weight and bias uniform in +-1/sqrt(fan_in) (drawn on ``generator``'s device, CPU
    by default, so a seed gives the same head on any device); returns a detached copy of the old weight."""
    original = head.weight.detach().clone()
    bound = 1 / math.sqrt(head.in_features)
    for parameter in (head.weight, head.bias):
        if parameter is not None:
            fresh = torch.empty(parameter.shape, device=generator.device).uniform_(-bound, bound, generator=generator)
            parameter.copy_(fresh)
    return original


@torch.no_grad()
def project_to_norm(weight: torch.Tensor, norm: torch.Tensor) -> None:
    weight.mul_(norm / weight.norm().clamp_min(1e-12))


def head_alignment(weight: torch.Tensor, original: torch.Tensor) -> tuple[float, float]:
    """(inner product, cosine) between the new and the original head weight."""
    inner = float((weight.detach() * original).sum())
    return inner, inner / max(float(weight.detach().norm() * original.norm()), 1e-12)


class FeatureShift(BatchHook):
    """Adds alpha * <w, w_ori> to the cross-entropy; after each step restores ||w|| = ||w_ori||."""

    def __init__(self, head: nn.Linear, original: torch.Tensor, alpha: float):
        self.head, self.original, self.alpha = head, original, alpha
        self.original_norm = original.norm()
        self.epoch_inner_product = []

    def loss(self, inputs, labels, logits, cross_entropy):
        return cross_entropy + self.alpha * (self.head.weight * self.original).sum()

    def step(self):
        project_to_norm(self.head.weight, self.original_norm)

    def end_epoch(self):  # one host sync per epoch
        self.epoch_inner_product.append(head_alignment(self.head.weight, self.original)[0])


@defense("fst", "FST: re-initialise the head, fine-tune all weights away from the original head (norm-tied)",
         FSTParams, family="fine-tuning")
def feature_shift_tuning(model, data, params: FSTParams, device):
    model = model.to(device)
    if (unchanged := untrainable("FST", model, data)) is not None:
        return unchanged  # head not re-initialised: an untrained random head would only guess
    notes = batching_notes(len(data), params.batch_size)
    head = model.get_submodule(model.parts.classifier)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"FST needs the classifier {model.parts.classifier!r} to be nn.Linear, got {type(head)}")
    seed = run_seed()

    original = reinitialise_head(head, torch.Generator().manual_seed(seed))
    inner_at_init, cosine_at_init = head_alignment(head.weight, original)
    model.requires_grad_(True)  # the whole model is tuned
    hook = FeatureShift(head, original, params.alpha)
    curve = train(model, data.images, data.labels, params.recipe(), data.normalisation, seed + 1,
                  description="FST", hook=hook)
    inner, cosine = head_alignment(head.weight, original)
    return Defended(model, {
        "original_head_norm": float(original.norm()),
        "final_head_norm": float(head.weight.detach().norm()),
        "head_inner_product_at_init": inner_at_init,
        "head_cosine_at_init": cosine_at_init,
        "head_inner_product_final": inner,
        "head_cosine_final": cosine,
        "head_inner_product_per_epoch": hook.epoch_inner_product,
        "final_cross_entropy": curve[-1]["loss"],
        "final_accuracy": curve[-1]["accuracy"],
        "notes": notes,
    })
