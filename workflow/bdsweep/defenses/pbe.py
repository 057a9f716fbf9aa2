"""PBE (Mu, Niu, Wang, Wang, Miao, Jin and Hua, "Progressive Backdoor Erasing via connecting Backdoor
and Adversarial Attacks", CVPR 2023): untargeted adversarial examples of a backdoored model behave like
its triggered images (they drift to the target class), so fine-tuning on them with their true labels
erases the backdoor.

Only the paper's model-purification part runs here, in its "model repair" setting (an infected model
and a small clean set). Its progressive part, which filters poisoned samples out of the training set,
needs the poisoned training set, which a defense here never has (nor does the survey's setting).

1. Each batch is augmented (random crop, flip where the dataset allows) and, in the first
   ``adversarial_epochs`` epochs, replaced by untargeted L-inf PGD examples of the current model
   (eval mode): ``pgd_steps`` sign-gradient ascent steps on the cross-entropy of the true label, step
   ``eps / alpha_scale``, no random start, projected on the ``eps`` ball and on the pixel range [0, 1].
2. The model (train mode) takes one SGD step on the cross-entropy of the batch with its TRUE labels:
   adversarial images only during the adversarial epochs (the authors' code puts no clean images in
   that loss), clean images in the remaining epochs, i.e. the clean/adversarial alternation of the
   survey's eq. (29) as the authors' script orders it.

Interpretations, from the authors' code (aft_main.py / aft_train.py of their repository): 20 epochs of
which the first 3 are adversarial; PGD on the already augmented batch; "alpha scale 5" is their
``alpha = eps / 5``; the learning rate stays constant (their MultiStepLR milestones lie beyond the
20 epochs). Their norm is L-inf (sign steps, box projection) although the survey's table lists L2; we
follow the code. Their eps (6/255) is applied to normalised CIFAR-10 inputs; here eps is in [0, 1]
pixel units (SPEC: 0.02) and the adversarial images are clamped to the valid range (their code is
not). SGD lr 0.01, momentum 0.9, weight decay 5e-4, batch 128 are SPEC's (their default lr is 1e-3).

Too few data: nothing is held out, so SPC 1 and 2 run as is; with fewer images than ``batch_size``
every epoch is one batch (noted); the engine skips a trailing batch of one image; with fewer than 2
images nothing can be trained and the model is returned unchanged (noted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import BatchHook, Recipe, augment_batch, batch_count, train
from ..params import check_ranges
from . import Defended, MitigationData, defense, run_seed
from .support import accuracy, batching_notes, untrainable


@dataclass(frozen=True)
class PBEParams:
    epochs: int = 20
    adversarial_epochs: int = 3  # the first ones fine-tune on PGD examples, the rest on clean images
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "constant"  # the engine's "constant" or "cosine"
    pgd_steps: int = 7
    eps: float = 0.02  # L-inf bound in [0, 1] pixel units
    alpha_scale: float = 5.0  # PGD step = eps / alpha_scale
    augment: bool = True  # random crop (padding 4) and flip where the dataset allows
    crop_padding: int = 4

    def __post_init__(self):
        check_ranges("PBE", self, {
            "epochs": self.epochs >= 1,
            "adversarial_epochs": 0 <= self.adversarial_epochs <= self.epochs,
            "lr": self.lr > 0,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "batch_size": self.batch_size >= 1,
            "schedule": self.schedule in ("constant", "cosine"),
            "pgd_steps": self.pgd_steps >= 1,
            "eps": 0 < self.eps <= 1,
            "alpha_scale": self.alpha_scale > 0,
            "crop_padding": self.crop_padding >= 0,
        })


def untargeted_pgd(forward, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float, steps: int
                   ) -> torch.Tensor:
    """Images in [0, 1], each within ``eps`` (L-inf) of ``images``, that raise the loss of ``labels``."""
    delta = torch.zeros_like(images)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(forward(images + delta).float(), labels)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
        delta = (images + delta).clamp(0, 1) - images  # stay a valid image
    return (images + delta).detach()


class AdversarialFineTuning(BatchHook):
    """Augments every batch itself (the PGD examples must be made on the exact input the model sees)
    and, during the adversarial epochs, replaces it by PGD examples of the current model."""

    def __init__(self, model: nn.Module, data: MitigationData, params: PBEParams, generator: torch.Generator):
        self.model, self.data, self.params, self.generator = model, data, params, generator
        self.epoch = 0
        self.adversarial_batches = 0
        self.largest_perturbation = torch.zeros((), device=data.images.device)  # kept on the device: no sync
        # Predictions on the first epoch's PGD examples (as the training forward saw them): how many
        # are wrong and which wrong class draws most of them, the paper's observation.
        self.first_epoch_predictions = torch.zeros(data.num_classes, dtype=torch.long, device=data.images.device)
        self.first_epoch_wrong = torch.zeros((), dtype=torch.long, device=data.images.device)

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.model(self.data.normalisation.normalise(images01))

    def transform(self, images, labels, indices):
        if self.params.augment:
            images = augment_batch(images, self.params.crop_padding, self.data.normalisation.hflip, self.generator)
        if self.epoch >= self.params.adversarial_epochs:
            return images, labels, None
        self.model.eval()  # the attack sees the model as it predicts; BN statistics stay untouched
        adversarial = untargeted_pgd(self.forward, images, labels, self.params.eps,
                                     self.params.eps / self.params.alpha_scale, self.params.pgd_steps)
        self.model.train()
        self.adversarial_batches += 1
        self.largest_perturbation = torch.maximum(self.largest_perturbation, (adversarial - images).abs().max())
        return adversarial, labels, None

    def loss(self, inputs, labels, logits, cross_entropy):
        if self.epoch == 0 and self.params.adversarial_epochs > 0:
            predicted = logits.detach().argmax(1)
            wrong = predicted != labels
            self.first_epoch_wrong += wrong.sum()
            self.first_epoch_predictions += torch.bincount(predicted[wrong], minlength=self.data.num_classes)
        return cross_entropy

    def end_epoch(self):
        self.epoch += 1


@defense("pbe", "PBE: fine-tune on untargeted PGD examples with their true labels, then on clean data",
         PBEParams, family="fine-tuning")
def progressive_backdoor_erasing(model, data, params: PBEParams, device):
    model = model.to(device)
    if (unchanged := untrainable("PBE", model, data)) is not None:
        return unchanged
    notes = batching_notes(len(data), params.batch_size)
    seed = run_seed()
    generator = torch.Generator(device=data.images.device).manual_seed(seed)
    hook = AdversarialFineTuning(model, data, params, generator)
    recipe = Recipe(epochs=params.epochs, batch_size=params.batch_size, lr=params.lr, momentum=params.momentum,
                    weight_decay=params.weight_decay, schedule=params.schedule, crop_padding=params.crop_padding,
                    augment=False)  # the hook augments, before its attack
    curve = train(model, data.images, data.labels, recipe, data.normalisation, seed, description="PBE", hook=hook)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError("PBE fine-tuning produced non-finite weights")

    details = {"adversarial_batches": hook.adversarial_batches,
               "largest_perturbation": float(hook.largest_perturbation),
               "final_training_loss": curve[-1]["loss"], "mitigation_accuracy_after": accuracy(model, data),
               "notes": notes}
    if params.adversarial_epochs:
        seen = min(len(data), batch_count(len(data), params.batch_size) * params.batch_size)  # the engine's batches
        wrong = int(hook.first_epoch_wrong)
        counts = hook.first_epoch_predictions
        details.update(first_epoch_adversarial_error=wrong / seen,
                       first_epoch_adversarial_loss=curve[0]["loss"],
                       last_adversarial_epoch_loss=curve[params.adversarial_epochs - 1]["loss"],
                       adversarial_top_wrong_class=int(counts.argmax()),
                       adversarial_top_wrong_class_share=float(counts.max()) / wrong if wrong else 0.0)
    return Defended(model, details)
