"""AWM (Chai & Chen, NeurIPS 2022): "One-shot Neural Backdoor Erasing via Adversarial Weight Masking".

A soft mask m in [0, 1], one entry per weight of every convolution, starts at all ones. Each outer epoch
  1. recovers a universal additive trigger delta (pixel scale, one for all images) by gradient ascent on
     the masked model's cross-entropy against its own predictions, then rescales it into the L1 ball
     ||delta||_1 <= trigger_norm;
  2. trains the mask with Adam on alpha * CE(x) + (1 - alpha) * CE(clip(x + delta)) + gamma * ||m||_1,
     clipping m to [0, 1] after every step; the mask's learning rate decays by ``lr_decay`` per epoch.
The returned model has every convolution weight multiplied by its mask, permanently (a soft mask: AWM
does not binarise it).

Interpretation, following the authors' code (github.com/jinghuichen/AWM) where the paper leaves room:
masks cover convolution weights only (not BN or the classifier); the trigger is an additive perturbation
(no separate trigger mask), restarted from zero each epoch and optimised by SGD (lr 10) for ``inner``
passes; alpha weights the clean loss, 1 - alpha the adversarial one; the optional "shrink" warm-up is
left out (its default is zero steps); the model stays in eval mode, so BN uses its running statistics.
Deviation: each phase makes ``inner`` full passes over the data; the reference runs int(N / batch_size)
* inner steps, which is zero (no defense at all) when N < batch_size.
Few data: AWM needs no held-out split, so SPC 1 runs as is; with fewer images than ``batch_size`` every
step uses all of them, which ``details["notes"]`` records.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..engine import LossWatch, autocast
from ..params import check_ranges
from ..resume import loop_checkpoint
from . import Defended, MitigationData, defense, run_seed
from .support import accuracy, batches


@dataclass(frozen=True)
class AWMParams:
    epochs: int = 20  # outer epochs: one trigger search and one mask-training phase each
    inner: int = 5  # passes over the data per phase
    lr: float = 1e-2  # Adam, on the mask
    lr_decay: float = 0.9  # the mask's learning rate is multiplied by this after every epoch
    alpha: float = 0.9  # weight of the clean loss; the adversarial loss gets 1 - alpha
    gamma: float = 1e-8  # weight of the mask's L1 norm (sparsity)
    trigger_norm: float = 1000.0  # L1 bound on the trigger, in [0, 1] pixel units summed over C x H x W
    trigger_lr: float = 10.0  # SGD, on the trigger
    batch_size: int = 128

    def __post_init__(self):
        checks = {
            "epochs": self.epochs >= 1, "inner": self.inner >= 1, "lr": self.lr > 0,
            "lr_decay": 0 < self.lr_decay <= 1, "alpha": 0 <= self.alpha <= 1, "gamma": self.gamma >= 0,
            "trigger_norm": self.trigger_norm > 0, "trigger_lr": self.trigger_lr > 0,
            "batch_size": self.batch_size >= 1,
        }
        check_ranges("AWM", self, checks)


def conv_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every convolution's weight by parameter name: what AWM masks."""
    return {f"{name}.weight": module.weight for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}


def masked_forward(model: nn.Module, masks: dict[str, torch.Tensor], data: MitigationData):
    """images in [0, 1] -> logits of the model with its convolution weights times the masks."""
    weights = conv_weights(model)

    def forward(images: torch.Tensor) -> torch.Tensor:
        with autocast(images.device):
            masked = {name: weights[name] * mask for name, mask in masks.items()}
            return functional_call(model, masked, (data.normalisation.normalise(images),)).float()

    return forward


def universal_perturbation(forward, data: MitigationData, params: AWMParams, generator: torch.Generator
                           ) -> torch.Tensor:
    """Inner maximisation: one additive trigger for all images that most changes the masked model's
    predictions, scaled back into the L1 ball of radius ``trigger_norm`` (as the authors do, once, at
    the end of the search)."""
    _, height, width, channels = data.images.shape
    delta = torch.zeros(1, channels, height, width, device=data.images.device, requires_grad=True)
    optimiser = torch.optim.SGD([delta], lr=params.trigger_lr)
    for _ in range(params.inner):
        for images, _ in batches(data, params.batch_size, generator, normalise=False):
            with torch.no_grad():
                predicted = forward(images).argmax(1)
            loss = -F.cross_entropy(forward(images + delta), predicted)  # unclipped here, as in the reference
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        scale = (params.trigger_norm / delta.abs().sum()).clamp(max=1.0)  # an all-zero delta gives inf -> 1
        return (delta * scale).detach()


class Progress:
    """Everything the epochs change (the model's own weights stay as they are): what a checkpoint
    between epochs holds. The masks are the optimiser's own tensors, restored in place."""

    def __init__(self, masks: dict[str, torch.Tensor], optimiser: torch.optim.Optimizer,
                 schedule: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator, delta: torch.Tensor):
        self.masks, self.optimiser, self.schedule, self.generator = masks, optimiser, schedule, generator
        self.delta = delta  # the last epoch's trigger, which the statistics after the loop use
        self.epoch, self.final_loss = 0, float("nan")


def train_mask(forward, masks: dict[str, torch.Tensor], optimiser: torch.optim.Optimizer, delta: torch.Tensor,
               data: MitigationData, params: AWMParams, generator: torch.Generator, watch: LossWatch,
               first_step: int) -> torch.Tensor:
    """One epoch's mask training against the trigger ``delta``; the last step's loss. ``watch``
    sees each step's loss as step ``first_step`` + step number."""
    step = first_step
    for _ in range(params.inner):
        for images, labels in batches(data, params.batch_size, generator, normalise=False):
            clean_loss = F.cross_entropy(forward(images), labels)
            adversarial_loss = F.cross_entropy(forward((images + delta).clamp(0, 1)), labels)
            sparsity = sum(mask.abs().sum() for mask in masks.values())
            loss = params.alpha * clean_loss + (1 - params.alpha) * adversarial_loss + params.gamma * sparsity
            watch.observe(loss, step)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                for mask in masks.values():
                    mask.clamp_(0.0, 1.0)
            step += 1
    return loss.detach()


def learn_mask(model: nn.Module, data: MitigationData, params: AWMParams, generator: torch.Generator
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict]:
    """The min-max optimisation; leaves the model's own weights untouched. (masks, last trigger, stats)."""
    was_training, requires_grad = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)  # only the masks and the trigger are optimised
    masks = {name: torch.ones_like(weight, requires_grad=True) for name, weight in conv_weights(model).items()}
    forward = masked_forward(model, masks, data)
    optimiser = torch.optim.Adam(masks.values(), lr=params.lr)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=params.lr_decay)
    _, height, width, channels = data.images.shape
    progress = Progress(masks, optimiser, schedule, generator,
                        torch.zeros(1, channels, height, width, device=data.images.device))
    per_epoch = params.inner * -(-len(data) // params.batch_size)
    watch = LossWatch(data.images.device, lambda step: f"AWM epoch {step // per_epoch + 1}, "
                      f"mask step {step % per_epoch + 1}")
    with loop_checkpoint("AWM epochs", progress) as checkpoint:  # saved between epochs
        while progress.epoch < params.epochs:
            delta = universal_perturbation(forward, data, params, generator)
            loss = train_mask(forward, masks, optimiser, delta, data, params, generator, watch,
                              progress.epoch * per_epoch)
            schedule.step()
            watch.check()
            progress.delta.copy_(delta)
            progress.final_loss = float(loss)
            progress.epoch += 1
            checkpoint.boundary(finished=progress.epoch == params.epochs)
    delta = progress.delta
    with torch.no_grad():
        robust = sum(int((forward((images + delta).clamp(0, 1)).argmax(1) == labels).sum())
                     for images, labels in batches(data, params.batch_size, generator, normalise=False)) / len(data)
    model.train(was_training)
    for parameter, flag in zip(model.parameters(), requires_grad):
        parameter.requires_grad_(flag)
    stats = {"final_loss": progress.final_loss, "trigger_l1": float(delta.abs().sum()),
             "mitigation_accuracy_under_trigger": robust}
    return {name: mask.detach() for name, mask in masks.items()}, delta, stats


@torch.no_grad()
def apply_mask(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Make the soft mask permanent: each convolution weight times its mask, in place."""
    weights = conv_weights(model)
    for name, mask in masks.items():
        weights[name].mul_(mask)


@defense("awm", "AWM: adversarial weight masking (soft mask of conv weights against a recovered universal trigger)",
         AWMParams, family="pruning")
def adversarial_weight_masking(model, data: MitigationData, params: AWMParams, device):
    if len(data) == 0:
        raise ValueError("AWM needs mitigation data, got none")
    model = model.to(device)
    notes = []
    if len(data) < params.batch_size:
        notes.append(f"only {len(data)} mitigation images for batch_size {params.batch_size}: every step uses "
                     "all of them (full batch)")
    generator = torch.Generator().manual_seed(run_seed())
    masks, _, stats = learn_mask(model, data, params, generator)
    apply_mask(model, masks)
    values = torch.cat([mask.flatten() for mask in masks.values()])
    return Defended(model, {
        "masked_weights": int(values.numel()),
        "mask_mean": float(values.mean()),
        "mask_below_half": float((values < 0.5).float().mean()),
        "mask_zero": float((values == 0).float().mean()),
        **stats,
        "mitigation_accuracy": accuracy(model, data),
        "notes": notes,
    })
