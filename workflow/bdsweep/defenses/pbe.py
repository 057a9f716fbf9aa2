"""PBE (Mu, Niu, Wang, Wang, Miao, Jin and Hua, "Progressive Backdoor Erasing via connecting Backdoor
and Adversarial Attacks", CVPR 2023): untargeted adversarial examples of a backdoored model behave like
its triggered images (they drift to the target class), so fine-tuning on them with their true labels
erases the backdoor.

Only the paper's model-purification part runs here, in its "model repair" setting (an infected model
and a small clean set). Its progressive part, which filters poisoned samples out of the training set,
needs the poisoned training set, which a defense here never has (nor does the survey's setting).

Every epoch, as the survey's code runs it (FORK = WhoDunnett/BackdoorBenchmark @ 8613640,
``defense/pbe.py``, its loop at :317-320, following the paper's Algorithm 1):
1. an adversarial pass: each (augmented) batch is replaced by untargeted L-inf PGD examples of the
   current model (``pgd_steps`` sign-gradient ascent steps on the cross-entropy of the true label, step
   ``eps / alpha_scale``, from a random start uniform in the eps ball) and the model takes one SGD step on
   them with their TRUE labels;
2. a clean pass: one SGD step per (augmented) clean batch.
The engine runs one pass per engine epoch (2 x ``epochs`` of them); ``alternate=False`` with
``adversarial_epochs`` 3 gives the authors' own order (aft_main.py: 3 adversarial epochs, then clean).

FORK's choices, reproduced by default (each with the parameter that selects the alternative):
- ``space="normalised"``: the delta, eps (0.02) and the clamp act on the NORMALISED input
  (pbe.py:56-75): after every step ``delta = clamp(x_n + delta, 0, 1) - x_n``, so the adversarial input is
  the normalised image clamped to [0, 1] (on CIFAR-10 and Tiny every value below the channel mean becomes
  0; GTSRB's normalisation is the identity). ``"pixel"``: eps in [0, 1] pixel units, kept in [0, 1] pixels.
- ``fresh_optimiser=True``: FORK makes a new SGD (lr, momentum 0.9, weight decay 5e-4) for every
  adversarial batch and for every clean pass, so momentum never carries across them (an adversarial step
  is a plain SGD step). ``False``: one SGD for the whole run.
- ``attack_mode="train"``: FORK's model stays in training mode while it attacks (it never calls eval
  between its steps), so PGD uses batch statistics and every PGD forward moves BN's running statistics.
  ``"eval"``: the attack sees the model as it predicts, and BN statistics stay untouched.
- 20 epochs, 7 steps, eps 0.02, alpha scale 5, lr 0.01 constant, batch 256 (``config/defense/pbe``).

Too few data: nothing is held out, so SPC 1 and 2 run as is; with fewer images than ``batch_size``
every pass is one batch (noted); the engine skips a trailing batch of one image; with fewer than 2
images nothing can be trained and the model is returned unchanged (noted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import BatchHook, augment_batch, batch_count, train
from ..params import BatchSize
from ..passes import MitigationSize
from ..recipe import TrainingParams
from . import Defended, MitigationData, defense, run_seed
from .support import accuracy, batching_notes, untrainable

SPACES = ("normalised", "pixel")
ATTACK_MODES = ("train", "eval")


@dataclass(frozen=True)
class PBEParams(TrainingParams):
    OWNER = "PBE"
    SCHEDULES = ("constant", "cosine")  # the engine's "constant" or "cosine" (over the passes)

    epochs: int = 20
    batch_size: BatchSize = 256  # FORK's config/defense/pbe/default.yaml
    adversarial_epochs: int = 20  # the first ones have an adversarial pass (FORK: all 20; more than epochs: all)
    alternate: bool = True  # every epoch adversarial then clean (FORK); False: adversarial epochs, then clean ones
    schedule: str = "constant"
    pgd_steps: int = 7
    eps: float = 0.02  # L-inf bound, in the space ``space`` names
    alpha_scale: float = 5.0  # PGD step = eps / alpha_scale
    random_start: bool = True  # FORK: uniform in the eps ball (pbe.py:56-57)
    space: str = "normalised"  # where delta, eps and the [0, 1] clamp act: FORK's "normalised" or "pixel"
    fresh_optimiser: bool = True  # FORK: a new SGD per adversarial batch and per clean pass
    attack_mode: str = "train"  # the model's mode while PGD runs: FORK's "train" or "eval"
    crop_padding: int = 4

    def checks(self) -> dict[str, bool]:
        return {
            "adversarial_epochs": self.adversarial_epochs >= 0,
            "pgd_steps": self.pgd_steps >= 1,
            "eps": 0 < self.eps <= 1,
            "alpha_scale": self.alpha_scale > 0,
            "space": self.space in SPACES,
            "attack_mode": self.attack_mode in ATTACK_MODES,
        }

    def passes(self) -> tuple[bool, ...]:
        """One flag per pass, True for an adversarial one, in the order they run."""
        if self.alternate:
            return tuple(flag for epoch in range(self.epochs)
                         for flag in ((True, False) if epoch < self.adversarial_epochs else (False,)))
        return tuple(epoch < self.adversarial_epochs for epoch in range(self.epochs))


def untargeted_pgd(forward, images: torch.Tensor, labels: torch.Tensor, eps: float, step: float, steps: int,
                   start: torch.Tensor | None = None) -> torch.Tensor:
    """Inputs that raise the loss of ``labels``: ``images + delta`` with ``delta`` clamped to the eps
    ball, then the sum clamped to [0, 1], after every step (FORK pbe.py:63-75). ``start`` is the initial
    delta (zeros without one). Where ``images`` lie outside [0, 1] (normalised inputs) the clamp, not
    eps, decides the result, as in FORK."""
    delta = torch.zeros_like(images) if start is None else start
    for _ in range(steps):
        delta = delta.detach().requires_grad_(True)
        loss = F.cross_entropy(forward(images + delta).float(), labels)
        (grad,) = torch.autograd.grad(loss, delta)
        delta = (delta.detach() + step * grad.sign()).clamp(-eps, eps)
        delta = (images + delta).clamp(0, 1) - images
    return (images + delta).detach()


class AdversarialFineTuning(BatchHook):
    """One engine epoch per pass. Augments every batch itself (the PGD examples must be made on the
    exact input the model sees) and, in the adversarial passes, replaces it by PGD examples of the
    current model; drops the optimiser's momentum where FORK makes a fresh optimiser."""

    def __init__(self, model: nn.Module, data: MitigationData, params: PBEParams, generator: torch.Generator):
        self.model, self.data, self.params, self.generator = model, data, params, generator
        self.schedule = params.passes()
        self.epoch = 0  # the engine's epoch, i.e. the pass
        self.batch_in_pass = 0
        self.adversarial_batches = 0
        self.clean_batches = 0
        self.largest_perturbation = torch.zeros((), device=data.images.device)  # kept on the device: no sync
        # Predictions on the first pass's PGD examples (as the training forward saw them): how many
        # are wrong and which wrong class draws most of them, the paper's observation.
        self.first_epoch_predictions = torch.zeros(data.num_classes, dtype=torch.long, device=data.images.device)
        self.first_epoch_wrong = torch.zeros((), dtype=torch.long, device=data.images.device)

    @property
    def adversarial(self) -> bool:
        return self.schedule[self.epoch]

    def transform(self, images, labels, indices):
        if self.params.augment:
            images = augment_batch(images, self.params.crop_padding, self.data.normalisation.hflip, self.generator)
        if not self.adversarial:
            self.clean_batches += 1
            return images, labels, None
        adversarial = self.attack(images, labels)
        self.adversarial_batches += 1
        return adversarial, labels, None

    def attack(self, images01: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """PGD examples in [0, 1] pixel units (the engine normalises them; in normalised space they are
        FORK's clamped normalised inputs, mapped back to pixel units)."""
        p, normalisation = self.params, self.data.normalisation
        normalised = p.space == "normalised"
        start = None
        if p.random_start:
            draw = torch.rand(images01.shape, generator=self.generator, device=self.generator.device)
            start = draw.to(images01.device, images01.dtype) * 2 * p.eps - p.eps
        if p.attack_mode == "eval":
            self.model.eval()
        inputs = normalisation.normalise(images01) if normalised else images01
        forward = self.model if normalised else (lambda x: self.model(normalisation.normalise(x)))
        adversarial = untargeted_pgd(forward, inputs, labels, p.eps, p.eps / p.alpha_scale, p.pgd_steps, start)
        self.model.train()
        self.largest_perturbation = torch.maximum(self.largest_perturbation, (adversarial - inputs).abs().max())
        if normalised:
            mean, std = (torch.tensor(v, device=images01.device).view(1, 3, 1, 1) for v in
                         (normalisation.mean, normalisation.std))
            adversarial = adversarial * std + mean
        return adversarial

    def loss(self, inputs, labels, logits, cross_entropy):
        if self.epoch == 0 and self.adversarial:
            predicted = logits.detach().argmax(1)
            wrong = predicted != labels
            self.first_epoch_wrong += wrong.sum()
            self.first_epoch_predictions += torch.bincount(predicted[wrong], minlength=self.data.num_classes)
        return cross_entropy

    def before_step(self, optimiser):
        if self.params.fresh_optimiser and (self.adversarial or self.batch_in_pass == 0):
            optimiser.state.clear()  # FORK's new SGD: no momentum from earlier steps
        self.batch_in_pass += 1

    def end_epoch(self):
        self.epoch += 1
        self.batch_in_pass = 0


def passes_per_run(p, m: MitigationSize) -> float:
    """Passes of one run: an adversarial pass costs the PGD steps and the step; FORK: 20 of them and 20 clean
    passes."""
    adversarial = sum(p.passes())
    return adversarial * m.images * (p.pgd_steps + 1) + (len(p.passes()) - adversarial) * m.images


@defense("pbe", "PBE: every epoch a pass on untargeted PGD examples with their true labels, then a clean pass",
         PBEParams, family="fine-tuning", passes=passes_per_run, featured=True,
         smoke={"epochs": 1, "adversarial_epochs": 1, "pgd_steps": 1, "batch_size": 8})
def progressive_backdoor_erasing(model, data, params: PBEParams, device):
    model = model.to(device)
    if (unchanged := untrainable("PBE", model, data)) is not None:
        return unchanged
    notes = batching_notes(len(data), params.batch_size, unit="pass")
    seed = run_seed()
    generator = torch.Generator(device=data.images.device).manual_seed(seed)
    hook = AdversarialFineTuning(model, data, params, generator)
    passes = params.passes()
    recipe = params.recipe(epochs=len(passes), augment=False)  # the hook augments, before its attack
    curve = train(model, data.images, data.labels, recipe, data.normalisation, seed, description="PBE", hook=hook)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError("PBE fine-tuning produced non-finite weights")

    details = {"passes": ["adversarial" if flag else "clean" for flag in passes],
               "adversarial_batches": hook.adversarial_batches, "clean_batches": hook.clean_batches,
               "largest_perturbation": float(hook.largest_perturbation),
               "final_training_loss": curve[-1]["loss"], "mitigation_accuracy_after": accuracy(model, data),
               "notes": notes}
    if passes[0]:
        last_adversarial = max(i for i, flag in enumerate(passes) if flag)
        seen = min(len(data), batch_count(len(data), params.batch_size) * params.batch_size)  # the engine's batches
        wrong = int(hook.first_epoch_wrong)
        counts = hook.first_epoch_predictions
        details.update(first_epoch_adversarial_error=wrong / seen,
                       first_epoch_adversarial_loss=curve[0]["loss"],
                       last_adversarial_epoch_loss=curve[last_adversarial]["loss"],
                       adversarial_top_wrong_class=int(counts.argmax()),
                       adversarial_top_wrong_class_share=float(counts.max()) / wrong if wrong else 0.0)
    return Defended(model, details)
