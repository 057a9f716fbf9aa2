"""AWM (Chai & Chen, NeurIPS 2022): "One-shot Neural Backdoor Erasing via Adversarial Weight Masking", as
the survey ran it: FORK's ``awn`` (FORK = WhoDunnett/BackdoorBenchmark @ 8613640, ``defense/awn.py``,
``config/defense/awn/default.yaml``; the survey's "AWM" is this script).

Every BN channel ("neuron") gets a soft mask m in [0, 1], init 1, a factor on its BN weight (FORK's
``MaskBatchNorm2d``; the shift is not masked). The model stays in eval mode (BN running statistics). Each
of 20 epochs:
  1. recovers a universal additive trigger delta (one for all images, 1 x C x H x W, in the model's
     NORMALISED input space, starting at 0) by one pass of SGD (lr 10) ascending the masked model's
     cross-entropy against its own predictions on the (unclamped) perturbed images, then scales it into
     the L1 ball ||delta||_1 <= 1000 once;
  2. trains the masks by one more pass of SGD (lr 0.01, no momentum, ExponentialLR 0.9 per epoch) on
     alpha * CE(x) + (1 - alpha) * CE(clamp(x + delta, 0, 1)) + gamma * ||m||_1 (alpha 0.9, gamma 1e-7),
     clipping m to [0, 1] after every step.
Batches of 256 images, shuffled and augmented (FORK's training loader), freshly for each pass. The
returned model has every BN weight multiplied by its mask (a soft mask: not binarised).

Values are FORK's effective ones: the argparse defaults override the YAML (``hyper_gamma`` 1e-7 over the
YAML's 1e-8, `awn.py:211`); the mask optimiser is ``SGD(lr=args.lr)`` without momentum (`:363`).

FORK's quirk, reproduced by default: the perturbed images are the NORMALISED images plus delta, clamped
to [0, 1] (`awn.py:138`), which cuts off every normalised value below 0 (most of a CIFAR image's dark
half) and caps bright ones; ``clamp_to_unit=False`` clamps to the normalised image of the valid pixel
range [0, 1] instead. Few data: no held-out split, SPC 1 runs as is; with fewer images than
``batch_size`` every step uses all of them (noted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..checkpoints import LoopState, checkpointed_steps
from ..engine import LossWatch, autocast
from ..models import batch_norms
from ..params import BatchSize, check_ranges
from ..passes import FORWARD, MitigationSize
from . import Defended, MitigationData, defense, run_seed
from .support import accuracy, batches


@dataclass(frozen=True)
class AWMParams:
    epochs: int = 20  # outer epochs: one trigger search and one mask-training phase each
    inner: int = 1  # passes over the data per phase (FORK: one)
    lr: float = 1e-2  # SGD on the masks (FORK argparse lr)
    momentum: float = 0.0  # FORK's mask SGD has none (`awn.py:363`)
    lr_decay: float = 0.9  # ExponentialLR gamma, stepped after every epoch
    alpha: float = 0.9  # weight of the clean loss; the adversarial loss gets 1 - alpha
    gamma: float = 1e-7  # weight of the masks' L1 norm (FORK hyper_gamma, argparse default)
    trigger_norm: float = 1000.0  # L1 bound on the trigger, in normalised input units summed over C x H x W
    trigger_lr: float = 10.0  # SGD, on the trigger
    batch_size: BatchSize = 256
    augment: bool = True  # FORK's loader uses the training transform
    clamp_to_unit: bool = True  # FORK's quirk: normalised perturbed images clamped to [0, 1]

    def __post_init__(self):
        checks = {
            "epochs": self.epochs >= 1, "inner": self.inner >= 1, "lr": self.lr > 0,
            "momentum": 0 <= self.momentum < 1, "lr_decay": 0 < self.lr_decay <= 1, "alpha": 0 <= self.alpha <= 1,
            "gamma": self.gamma >= 0, "trigger_norm": self.trigger_norm > 0, "trigger_lr": self.trigger_lr > 0,
            "batch_size": self.batch_size >= 1,
        }
        check_ranges("AWM", self, checks)


def neuron_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """A mask of ones per affine BN layer (by layer name), one entry per channel: what AWN learns."""
    return {name: torch.ones(bn.num_features, device=bn.weight.device, requires_grad=True)
            for name, bn in batch_norms(model) if bn.weight is not None}


def masked_forward(model: nn.Module, masks: dict[str, torch.Tensor]):
    """normalised images -> logits of the model with every masked BN weight times its mask."""
    norms = dict(batch_norms(model))

    def forward(images: torch.Tensor) -> torch.Tensor:
        with autocast(images.device):
            masked = {f"{name}.weight": norms[name].weight * mask for name, mask in masks.items()}
            return functional_call(model, masked, (images,)).float()

    return forward


def perturbed(images: torch.Tensor, delta: torch.Tensor, data: MitigationData, params: AWMParams) -> torch.Tensor:
    """Normalised images plus the trigger, clamped as FORK does to [0, 1] (``clamp_to_unit``) or to
    the normalised valid pixel range."""
    if params.clamp_to_unit:
        return (images + delta).clamp(0, 1)
    low = data.normalisation.normalise(torch.zeros(1, images.shape[1], 1, 1, device=images.device))
    high = data.normalisation.normalise(torch.ones(1, images.shape[1], 1, 1, device=images.device))
    return torch.maximum(torch.minimum(images + delta, high), low)


def training_batches(data: MitigationData, params: AWMParams, generator: torch.Generator):
    """One shuffled pass of normalised (augmented with ``augment``) batches."""
    return batches(data, params.batch_size, generator, augment=params.augment)


def universal_perturbation(forward, data: MitigationData, params: AWMParams, generator: torch.Generator
                           ) -> torch.Tensor:
    """Inner maximisation (FORK ``mask_train`` step 1): one additive trigger in normalised input space
    for all images that most changes the masked model's predictions, scaled once at the end into the L1
    ball of radius ``trigger_norm``."""
    _, height, width, channels = data.images.shape
    delta = torch.zeros(1, channels, height, width, device=data.images.device, requires_grad=True)
    optimiser = torch.optim.SGD([delta], lr=params.trigger_lr)
    for _ in range(params.inner):
        for images, _ in training_batches(data, params, generator):
            with torch.no_grad():
                predicted = forward(images).argmax(1)
            loss = -F.cross_entropy(forward(images + delta), predicted)  # unclamped, as in FORK
            optimiser.zero_grad()
            delta.grad, = torch.autograd.grad(loss, [delta])
            optimiser.step()
    with torch.no_grad():
        scale = (params.trigger_norm / delta.abs().sum()).clamp(max=1.0)  # an all-zero delta gives inf -> 1
        return (delta * scale).detach()


def train_mask(forward, masks: dict[str, torch.Tensor], optimiser: torch.optim.Optimizer, delta: torch.Tensor,
               data: MitigationData, params: AWMParams, generator: torch.Generator, watch: LossWatch,
               first_step: int) -> torch.Tensor:
    """One epoch's mask training against the trigger ``delta`` (FORK ``mask_train`` step 2); the last
    step's loss. ``watch`` sees each step's loss as step ``first_step`` + step number."""
    step = first_step
    for _ in range(params.inner):
        for images, labels in training_batches(data, params, generator):
            clean_loss = F.cross_entropy(forward(images), labels)
            adversarial_loss = F.cross_entropy(forward(perturbed(images, delta, data, params)), labels)
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
    masks = neuron_masks(model)
    forward = masked_forward(model, masks)
    optimiser = torch.optim.SGD(masks.values(), lr=params.lr, momentum=params.momentum)
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimiser, gamma=params.lr_decay)
    _, height, width, channels = data.images.shape
    # Everything the epochs change (the model's own weights stay as they are); the masks are the optimiser's
    # own tensors, restored in place. delta: the last epoch's trigger, which the statistics after the loop use.
    progress = LoopState(masks=masks, optimiser=optimiser, schedule=schedule, generator=generator,
                         delta=torch.zeros(1, channels, height, width, device=data.images.device),
                         final_loss=float("nan"))
    per_epoch = params.inner * -(-len(data) // params.batch_size)
    watch = LossWatch(data.images.device, lambda step: f"AWM epoch {step // per_epoch + 1}, "
                      f"mask step {step % per_epoch + 1}")
    for epoch in checkpointed_steps("AWM epochs", progress, params.epochs):  # saved between epochs
        delta = universal_perturbation(forward, data, params, generator)
        loss = train_mask(forward, masks, optimiser, delta, data, params, generator, watch, epoch * per_epoch)
        schedule.step()
        watch.check()
        progress.delta.copy_(delta)
        progress.final_loss = float(loss)
    delta = progress.delta
    with torch.no_grad():
        robust = sum(int((forward(perturbed(images, delta, data, params)).argmax(1) == labels).sum())
                     for images, labels in batches(data, params.batch_size)) / len(data)
    model.train(was_training)
    for parameter, flag in zip(model.parameters(), requires_grad):
        parameter.requires_grad_(flag)
    stats = {"final_loss": progress.final_loss, "trigger_l1": float(delta.abs().sum()),
             "mitigation_accuracy_under_trigger": robust}
    return {name: mask.detach() for name, mask in masks.items()}, delta, stats


@torch.no_grad()
def apply_mask(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Make the soft mask permanent: each BN weight times its mask, in place."""
    norms = dict(batch_norms(model))
    for name, mask in masks.items():
        norms[name].weight.mul_(mask)


def passes_per_run(p, m: MitigationSize) -> float:
    """Passes of one run: trigger search: a forward without and one with gradient; mask: clean + triggered."""
    return p.epochs * p.inner * m.images * ((1 + FORWARD) + 2)


@defense("awm", "AWM (the survey's AWN): soft BN-neuron masks trained against a recovered universal trigger",
         AWMParams, family="pruning", passes=passes_per_run, smoke={"epochs": 1, "batch_size": 8})
def adversarial_weight_masking(model, data: MitigationData, params: AWMParams, device):
    if len(data) == 0:
        raise ValueError("AWM needs mitigation data, got none")
    model = model.to(device)
    notes = []
    if len(data) < params.batch_size:
        notes.append(f"only {len(data)} mitigation images for batch_size {params.batch_size}: every step uses "
                     "all of them (full batch)")
    if not any(bn.weight is not None for _, bn in batch_norms(model)):
        return Defended(model, {"masked_channels": 0, "notes": [*notes, "the model has no BN layer to mask: "
                                                                "model unchanged"]})
    generator = torch.Generator().manual_seed(run_seed())
    masks, _, stats = learn_mask(model, data, params, generator)
    apply_mask(model, masks)
    values = torch.cat([mask.flatten() for mask in masks.values()]) if masks else torch.ones(0)
    return Defended(model, {
        "masked_channels": int(values.numel()),
        "mask_mean": float(values.mean()) if len(values) else float("nan"),
        "mask_below_half": float((values < 0.5).float().mean()) if len(values) else 0.0,
        "mask_zero": float((values == 0).float().mean()) if len(values) else 0.0,
        **stats,
        "mitigation_accuracy": accuracy(model, data),
        "notes": notes,
    })
