"""ANP (Wu and Wang, NeurIPS 2021): adversarial neuron pruning, as the survey's code ran it
(FORK = WhoDunnett/BackdoorBenchmark @ 8613640, ``defense/anp.py`` and ``config/defense/anp/default.yaml``).

Every BN channel ("neuron") k gets a mask m_k in [0, 1] (init 1) and perturbations d_k, e_k that turn
its scale and shift into gamma_k (m_k + d_k) and beta_k (1 + e_k). Per batch of mitigation data: the
perturbations start uniform in [-eps, eps] and take ``steps`` signed gradient steps of size eps / steps
that raise the loss; then one SGD step (momentum 0.9) on the masks lowers
alpha * L(mask) + (1 - alpha) * L(mask, perturbed), and the masks are clipped to [0, 1].

As FORK runs it:
- mask lr = FORK's ``lr`` 0.01 (the mask optimiser takes ``args.lr``, `anp.py:758`; yaml lr 0.01);
- 2,000 batches of 256 images, drawn WITH replacement from the fitting images and augmented (FORK's
  ``RandomSampler(replacement=True, num_samples=print_every * batch_size)`` over the train transform,
  `anp.py:729-730`, four passes of ``print_every`` = 500 batches, `:763`): a batch holds 256 images even
  when there are fewer to fit on;
- the perturbation is not clipped back into [-eps, eps] after its signed step (FORK steps an SGD
  optimiser on the gradient's sign and never clamps, `anp.py:145-155`); ``clamp_noise`` clamps it;
- mask scores are rounded to 4 decimals (FORK writes them with ``{:.4f}`` and reads them back, `:206`,
  `:228`); ``round_scores=False`` compares the raw masks;
- pruning zeroes the BN weight only (FORK's ``pruning`` sets ``weight[idx] = 0``, `:274-278`);
  ``prune_bias`` zeroes the shift too;
- threshold rule: thresholds ``np.arange(0, pruning_max + pruning_step, pruning_step)`` (0 .. 0.9 by
  0.05); a neuron is pruned at every threshold >= its score; the returned model is the one at the LAST
  threshold whose accuracy passes ``abs(acc - acc_ori) / acc_ori < acc_ratio`` (two-sided, strict;
  `:654`), or the unpruned model when none passes.

The one deviation (kind a): FORK's ``acc_ori`` is the unpruned model's clean TEST accuracy (`:790`,
`:801`); here it is the unpruned model's accuracy on the held-out mitigation images
(``support.split_held_out``), on which every threshold is also judged. An unpruned model with held-out
accuracy 0 leaves the relative rule undefined (FORK would divide by zero): nothing is pruned (noted).

FORK learns the masks on a copy built with ``NoisyBatchNorm2d`` (BN eps 1e-5; MobileNetV3's own is
1e-3) and prunes the original architecture: ``learning_bn_eps`` (0 keeps the model's own eps).

FORK's held-out (validation) loader applies the training transform, so held-out accuracy is measured on
freshly augmented images at every threshold (``augment_held_out=False`` measures on the plain images).

As in FORK the model is in training mode while masks are learnt (BN uses batch statistics, dropout is
on); BN does so on copies of the running statistics, so the returned model keeps its own. With fewer
than 2 images to fit on, BN uses running statistics (noted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..checkpoints import LoopState, checkpointed_steps
from ..engine import LossWatch, augment_batch, autocast
from ..models import batch_norms
from ..params import BatchSize, check_ranges
from ..passes import FORWARD, MitigationSize
from . import Defended, MitigationData, defense, run_seed
from .support import accuracy, batches, split_held_out


@dataclass(frozen=True)
class ANPParams:
    eps: float = 0.4  # perturbation budget of every neuron's scale and shift (FORK anp_eps)
    steps: int = 1  # PGD steps per batch (FORK anp_steps)
    alpha: float = 0.2  # weight of the unperturbed loss (FORK anp_alpha)
    iterations: int = 2000  # mask updates = batches (FORK nb_iter)
    lr: float = 0.01  # mask SGD learning rate (FORK lr, `anp.py:758`)
    momentum: float = 0.9  # mask SGD momentum (FORK `anp.py:758`)
    batch_size: BatchSize = 256  # images per batch, drawn with replacement (FORK batch_size)
    updates_per_pass: int = 500  # batches per pass of FORK's sampler (FORK print_every); a checkpoint each
    augment: bool = True  # random crop and flip, as FORK's train transform
    pruning_step: float = 0.05  # threshold grid step
    pruning_max: float = 0.9  # largest threshold tried
    max_accuracy_drop: float = 0.1  # FORK acc_ratio: relative held-out accuracy change allowed (strict, two-sided)
    round_scores: bool = True  # FORK's quirk: scores rounded to 4 decimals before thresholding
    clamp_noise: bool = False  # FORK's quirk is False: the perturbation may leave [-eps, eps] after its step
    prune_bias: bool = False  # FORK zeroes the BN weight only
    augment_held_out: bool = True  # FORK's quirk: held-out images are augmented (its validation loader's transform)
    learning_bn_eps: float = 1e-5  # FORK learns masks on a copy with BN eps 1e-5 (MobileNetV3: 1e-3); 0 keeps own

    def __post_init__(self):
        checks = {"eps": self.eps >= 0, "steps": self.steps >= 1, "alpha": 0 <= self.alpha <= 1,
                  "iterations": self.iterations >= 1, "lr": self.lr > 0, "momentum": 0 <= self.momentum < 1,
                  "batch_size": self.batch_size >= 2, "updates_per_pass": self.updates_per_pass >= 1,
                  "pruning_step": self.pruning_step > 0, "pruning_max": 0 <= self.pruning_max < 1,
                  "max_accuracy_drop": 0 <= self.max_accuracy_drop <= 1, "learning_bn_eps": self.learning_bn_eps >= 0}
        check_ranges("ANP", self, checks)


class NeuronMasks:
    """Masks and perturbations of every affine BN channel, applied through ``functional_call`` so
    the model's modules and parameters are never replaced or changed while they are learnt."""

    def __init__(self, model, device):
        self.model = model
        self.layers = [(name, bn) for name, bn in batch_norms(model) if bn.affine]
        self.sizes = [bn.num_features for _, bn in self.layers]
        total = sum(self.sizes)
        self.mask = torch.ones(total, device=device, requires_grad=True)
        self.noise_scale = torch.zeros(total, device=device, requires_grad=True)
        self.noise_shift = torch.zeros(total, device=device, requires_grad=True)

    def forward(self, x, mask, noise=None, running_stats=None):
        """Logits with BN scales gamma (mask + noise_scale) and shifts beta (1 + noise_shift)."""
        scales = mask if noise is None else mask + noise[0]
        shifts = torch.ones_like(mask) if noise is None else 1 + noise[1]
        overrides = dict(running_stats or {})
        for (name, bn), scale, shift in zip(self.layers, scales.split(self.sizes), shifts.split(self.sizes)):
            overrides[f"{name}.weight"] = bn.weight.detach() * scale
            overrides[f"{name}.bias"] = bn.bias.detach() * shift
        with autocast(x.device):
            return functional_call(self.model, overrides, (x,)).float()


def sampled_batch(data: MitigationData, batch_size: int, generator: torch.Generator, augment: bool):
    """One batch of ``batch_size`` images drawn uniformly WITH replacement (FORK's RandomSampler with
    replacement=True, `anp.py:729`), augmented as FORK's train transform, normalised."""
    index = torch.randint(len(data), (batch_size,), generator=generator).to(data.images.device)
    x = data.images[index].permute(0, 3, 1, 2)
    if augment:
        x = augment_batch(x, 4, data.normalisation.hflip, generator)
    return data.normalisation.normalise(x.float().div_(255.0)), data.labels[index]


def perturb(masks: NeuronMasks, x, y, params: ANPParams, generator, running_stats):
    """FORK's neuron perturbation (`anp.py:145-155`): uniform start in [-eps, eps], then ``steps``
    signed ascent steps of size eps / steps, not clamped afterwards unless ``clamp_noise``."""
    noise = (masks.noise_scale, masks.noise_shift)
    with torch.no_grad():
        for n in noise:  # drawn on the CPU generator, so runs repeat on any device
            n.copy_(torch.rand(n.shape, generator=generator).mul_(2 * params.eps).sub_(params.eps))
    for _ in range(params.steps):
        loss = F.cross_entropy(masks.forward(x, masks.mask.detach(), noise, running_stats), y)
        grads = torch.autograd.grad(loss, noise)
        with torch.no_grad():
            for n, g in zip(noise, grads):
                n.add_(g.sign(), alpha=params.eps / params.steps)
                if params.clamp_noise:
                    n.clamp_(-params.eps, params.eps)
    return tuple(n.detach() for n in noise)


def learn_masks(masks: NeuronMasks, fit, params: ANPParams, generator, batch_statistics: bool) -> int:
    """The ANP min-max optimisation; returns the number of mask updates made."""
    model = masks.model
    model.train()  # as FORK's mask_train: BN batch statistics, dropout on
    if not batch_statistics:
        for _, bn in masks.layers:
            bn.eval()
    # Batch statistics update running statistics in place: point them at copies.
    running_stats = {f"{name}.{buffer}": getattr(bn, buffer).clone() for name, bn in masks.layers
                     for buffer in ("running_mean", "running_var", "num_batches_tracked")
                     if getattr(bn, buffer) is not None}
    eps = [bn.eps for _, bn in masks.layers]
    if params.learning_bn_eps > 0:  # FORK's noisy copy is built with NoisyBatchNorm2d's eps 1e-5
        for _, bn in masks.layers:
            bn.eps = params.learning_bn_eps
    optimiser = torch.optim.SGD([masks.mask], lr=params.lr, momentum=params.momentum)
    # Everything the mask optimisation changes (the model's weights stay as they are), the masks' own
    # tensors, restored in place; saved between passes of FORK's sampler.
    progress = LoopState(mask=masks.mask, noise_scale=masks.noise_scale, noise_shift=masks.noise_shift,
                         optimiser=optimiser, generator=generator)
    watch = LossWatch(masks.mask.device, lambda step: f"ANP mask update {step + 1}")
    sampler_passes = -(-params.iterations // params.updates_per_pass)
    for sampler_pass in checkpointed_steps("ANP masks", progress, sampler_passes):
        first = sampler_pass * params.updates_per_pass
        for update in range(first, min(first + params.updates_per_pass, params.iterations)):
            x, y = sampled_batch(fit, params.batch_size, generator, params.augment)
            noise = perturb(masks, x, y, params, generator, running_stats) if params.eps > 0 else None
            loss = params.alpha * F.cross_entropy(masks.forward(x, masks.mask, None, running_stats), y)
            if noise is not None:
                perturbed = masks.forward(x, masks.mask, noise, running_stats)
                loss = loss + (1 - params.alpha) * F.cross_entropy(perturbed, y)
            watch.observe(loss, update)
            optimiser.zero_grad()
            masks.mask.grad, = torch.autograd.grad(loss, [masks.mask])
            optimiser.step()
            with torch.no_grad():
                masks.mask.clamp_(0, 1)
        watch.check()
    for (_, bn), own in zip(masks.layers, eps):
        bn.eps = own  # the pruned model is the original architecture (FORK's net_prune)
    model.eval()
    return min(progress.step * params.updates_per_pass, params.iterations)


def mask_scores(masks: NeuronMasks, params: ANPParams) -> torch.Tensor:
    """The scores FORK thresholds (float64): each mask written with ``{:.4f}`` and read back
    (`anp.py:206`), or the raw masks without ``round_scores``."""
    values = masks.mask.detach().double().cpu()
    if not params.round_scores:
        return values
    return torch.tensor([float(f"{value:.4f}") for value in values.tolist()], dtype=torch.float64)


def thresholds(params: ANPParams) -> list[float]:
    """FORK's grid, ``np.arange(0, pruning_max + pruning_step, pruning_step)`` (19 values at 0.9 / 0.05)."""
    return np.arange(0, params.pruning_max + params.pruning_step, params.pruning_step).tolist()


def passes(accuracy_after: float, accuracy_before: float, params: ANPParams) -> bool:
    """FORK's rule, ``abs(val_acc - acc_ori) / acc_ori < acc_ratio`` (`anp.py:654`): two-sided, strict."""
    return accuracy_before > 0 and abs(accuracy_after - accuracy_before) / accuracy_before < params.max_accuracy_drop


@torch.no_grad()
def prune(masks: NeuronMasks, originals, scores: torch.Tensor, threshold: float | None, prune_bias: bool) -> int:
    """Zero the BN weight (and with ``prune_bias`` the shift) of neurons scoring <= threshold (None: restore all)."""
    keep = torch.ones(len(scores)) if threshold is None else (scores > threshold).float()
    keep = keep.to(masks.mask.device)
    for (_, bn), (weight, bias), k in zip(masks.layers, originals, keep.split(masks.sizes)):
        bn.weight.copy_(weight * k)
        bn.bias.copy_(bias * k if prune_bias else bias)
    return int((keep == 0).sum())


def held_out_accuracy(model, held_out: MitigationData, params: ANPParams, generator) -> float:
    """Eval-mode accuracy on the held-out images; augmented with ``augment_held_out`` (FORK's
    validation loader uses the training transform, so each evaluation sees fresh crops and flips)."""
    if not params.augment_held_out or generator is None:
        return accuracy(model, held_out)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum())
                      for x, y in batches(held_out, 512, generator, augment=True))
    model.train(was_training)
    return correct / len(held_out)


def choose_threshold(masks: NeuronMasks, held_out, params: ANPParams, scores: torch.Tensor | None = None,
                     generator: torch.Generator | None = None):
    """The LAST threshold on FORK's grid whose held-out accuracy passes FORK's rule against the
    unpruned model's held-out accuracy; None when none does. Returns (threshold, accuracy before,
    accuracy after, {threshold: accuracy}) and leaves the model pruned at it."""
    scores = mask_scores(masks, params) if scores is None else scores
    originals = [(bn.weight.detach().clone(), bn.bias.detach().clone()) for _, bn in masks.layers]
    base = held_out_accuracy(masks.model, held_out, params, generator)
    accuracies, chosen, after = {}, None, base
    for threshold in thresholds(params):
        prune(masks, originals, scores, threshold, params.prune_bias)
        accuracies[round(threshold, 6)] = held = held_out_accuracy(masks.model, held_out, params, generator)
        if passes(held, base, params):
            chosen, after = threshold, held
    prune(masks, originals, scores, chosen, params.prune_bias)
    return (None if chosen is None else round(chosen, 6)), base, after, accuracies


def passes_per_run(p, m: MitigationSize) -> float:
    """Passes of one run: every batch holds batch_size images, drawn with replacement, whatever the data's size."""
    thresholds = int(p.pruning_max / p.pruning_step) + 1
    return p.iterations * p.batch_size * (p.steps + 2) + thresholds * m.classes * FORWARD


@defense("anp", "ANP: adversarial neuron perturbation + mask pruning", ANPParams,
         family="pruning", passes=passes_per_run, featured=True,
         smoke={"iterations": 1, "updates_per_pass": 1, "batch_size": 4, "pruning_step": 0.45})
def adversarial_neuron_pruning(model, data, params: ANPParams, device):
    model = model.to(device)
    generator = torch.Generator(device="cpu").manual_seed(run_seed())
    fit, held_out, note = split_held_out(data, generator)
    notes = [note] if note else []
    batch_statistics = len(fit) >= 2
    if not batch_statistics:
        notes.append(f"only {len(fit)} image(s) to learn masks on: BN used running statistics, not batch ones")
    masks = NeuronMasks(model, device)
    updates = learn_masks(masks, fit, params, generator, batch_statistics) if len(fit) else 0
    scores = mask_scores(masks, params)
    threshold, before, after, accuracies = choose_threshold(masks, held_out, params, scores, generator)
    if before == 0:
        notes.append("the unpruned model classifies no held-out image correctly: the relative accuracy rule is "
                     "undefined, nothing pruned")
    elif threshold is None:
        notes.append("no threshold kept held-out accuracy within the allowed change: nothing pruned")
    mask = masks.mask.detach().float().cpu()
    return Defended(model, {
        "pruned_channels": int((scores <= threshold).sum()) if threshold is not None else 0,
        "neurons": len(mask), "threshold": threshold, "mask_updates": updates,
        "held_out_accuracy_before": before, "held_out_accuracy_after": after,
        "held_out_accuracy_by_threshold": accuracies,
        "mask_quantiles": torch.quantile(mask, torch.tensor([0.0, 0.1, 0.5, 1.0])).tolist() if len(mask) else [],
        "notes": notes})
