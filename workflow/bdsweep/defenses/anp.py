"""ANP (Wu and Wang, NeurIPS 2021): adversarial neuron pruning.

Every BN channel ("neuron") k gets a mask m_k in [0, 1] (init 1) and perturbations d_k, e_k in
[-eps, eps] that turn its scale and shift into gamma_k (m_k + d_k) and beta_k (1 + e_k). Per batch
of mitigation data: the perturbations start uniform in [-eps, eps] and take ``steps`` signed
gradient steps of size eps / steps that raise the loss; then one SGD step on the masks lowers
alpha * L(mask) + (1 - alpha) * L(mask, perturbed), and the masks are clipped to [0, 1]. Neurons
whose mask is at most a threshold are pruned (BN scale and shift set to 0).

Interpretations and deviations:
- The threshold is not fixed (the paper's 0.2) nor chosen on test ASR (the reference toolkit's
  leak): over the reference's grid 0, 0.05, ..., 0.9 we keep the largest threshold whose accuracy
  on held-out mitigation data (one image per class, ``split_held_out``) is at least
  (1 - max_accuracy_drop) times the unpruned model's, a relative drop of at most 10 %, as for FP.
  The masks are learnt on the rest.
- As in the reference, BN layers use batch statistics while the masks are learnt; here they do so
  on copies of the running statistics, so the returned model keeps its own. Dropout stays off.
- Too little data degrades instead of failing: at SPC 1 the held-out images are also fitted on;
  with fewer than 2 images to fit on, BN uses running statistics (batch statistics of one image
  are undefined); a trailing batch of one image is skipped. ``details["notes"]`` says which.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from ..engine import LossWatch, autocast
from ..models import batch_norms
from ..params import check_ranges
from ..resume import loop_checkpoint
from . import Defended, defense, run_seed
from .support import accuracy, batches, split_held_out


@dataclass(frozen=True)
class ANPParams:
    eps: float = 0.4  # perturbation budget of every neuron's scale and shift
    steps: int = 1  # PGD steps per batch
    alpha: float = 0.2  # weight of the unperturbed loss
    iterations: int = 2000  # mask updates (batches)
    lr: float = 0.2  # mask SGD learning rate
    momentum: float = 0.9  # mask SGD momentum (the reference code's)
    batch_size: int = 128
    pruning_step: float = 0.05  # threshold grid step
    pruning_max: float = 0.9  # largest threshold tried
    max_accuracy_drop: float = 0.1  # relative held-out accuracy drop allowed

    def __post_init__(self):
        checks = {"eps": self.eps >= 0, "steps": self.steps >= 1, "alpha": 0 <= self.alpha <= 1,
                  "iterations": self.iterations >= 1, "lr": self.lr > 0, "momentum": 0 <= self.momentum < 1,
                  "batch_size": self.batch_size >= 2, "pruning_step": self.pruning_step > 0,
                  "pruning_max": 0 <= self.pruning_max < 1, "max_accuracy_drop": 0 <= self.max_accuracy_drop <= 1}
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


class Progress:
    """Everything the mask optimisation changes (the model's weights stay as they are): what a
    checkpoint between passes holds. The tensors are the masks' own, restored in place."""

    def __init__(self, masks: NeuronMasks, optimiser: torch.optim.Optimizer, generator: torch.Generator):
        self.mask, self.noise_scale, self.noise_shift = masks.mask, masks.noise_scale, masks.noise_shift
        self.optimiser, self.generator = optimiser, generator
        self.updates = 0


def learn_masks(masks: NeuronMasks, fit, params: ANPParams, generator, batch_statistics: bool) -> int:
    """The ANP min-max optimisation; returns the number of mask updates made."""
    model = masks.model
    model.eval()
    bns = [bn for _, bn in masks.layers]
    if batch_statistics:
        for bn in bns:
            bn.train()
    # Batch statistics update running statistics in place: point them at copies.
    running_stats = {f"{name}.{buffer}": getattr(bn, buffer).clone() for name, bn in masks.layers
                     for buffer in ("running_mean", "running_var", "num_batches_tracked")
                     if getattr(bn, buffer) is not None}
    optimiser = torch.optim.SGD([masks.mask], lr=params.lr, momentum=params.momentum)
    progress = Progress(masks, optimiser, generator)
    watch = LossWatch(masks.mask.device, lambda step: f"ANP mask update {step + 1}")
    with loop_checkpoint("ANP masks", progress) as checkpoint:  # saved between passes over the data
        while progress.updates < params.iterations:
            for x, y in batches(fit, params.batch_size, generator):
                if progress.updates == params.iterations:
                    break
                if len(y) < 2 and batch_statistics:
                    continue
                noise = (masks.noise_scale, masks.noise_shift)
                if params.eps > 0:
                    with torch.no_grad():
                        for n in noise:  # drawn on the CPU generator, so runs repeat on any device
                            n.copy_(torch.rand(n.shape, generator=generator).mul_(2 * params.eps).sub_(params.eps))
                    for _ in range(params.steps):
                        loss = F.cross_entropy(masks.forward(x, masks.mask.detach(), noise, running_stats), y)
                        grads = torch.autograd.grad(loss, noise)
                        with torch.no_grad():
                            for n, g in zip(noise, grads):
                                n.add_(g.sign(), alpha=params.eps / params.steps).clamp_(-params.eps, params.eps)
                loss = params.alpha * F.cross_entropy(masks.forward(x, masks.mask, None, running_stats), y)
                if params.eps > 0:
                    perturbed = masks.forward(x, masks.mask, tuple(n.detach() for n in noise), running_stats)
                    loss = loss + (1 - params.alpha) * F.cross_entropy(perturbed, y)
                watch.observe(loss, progress.updates)
                optimiser.zero_grad()
                masks.mask.grad, = torch.autograd.grad(loss, [masks.mask])
                optimiser.step()
                with torch.no_grad():
                    masks.mask.clamp_(0, 1)
                progress.updates += 1
            watch.check()
            checkpoint.boundary(finished=progress.updates == params.iterations)
    model.eval()
    return progress.updates


@torch.no_grad()
def prune(masks: NeuronMasks, originals, threshold: float | None) -> int:
    """Set BN scale and shift of neurons with mask <= threshold to 0 (None: restore all)."""
    keep = torch.ones_like(masks.mask) if threshold is None else (masks.mask > threshold).float()
    for (_, bn), (weight, bias), k in zip(masks.layers, originals, keep.split(masks.sizes)):
        bn.weight.copy_(weight * k)
        bn.bias.copy_(bias * k)
    return int((keep == 0).sum())


def choose_threshold(masks: NeuronMasks, held_out, params: ANPParams):
    """The largest threshold on the grid whose held-out accuracy drops at most max_accuracy_drop
    (relative) from the unpruned model's; None when no threshold qualifies. Returns (threshold,
    accuracy before, accuracy after, {threshold: accuracy}) and leaves the model pruned at it."""
    originals = [(bn.weight.detach().clone(), bn.bias.detach().clone()) for _, bn in masks.layers]
    base = accuracy(masks.model, held_out)
    grid = torch.arange(0, params.pruning_max + params.pruning_step / 2, params.pruning_step).tolist()
    accuracies, chosen, after = {}, None, base
    for threshold in grid:
        prune(masks, originals, threshold)
        accuracies[round(threshold, 6)] = held = accuracy(masks.model, held_out)
        if held >= (1 - params.max_accuracy_drop) * base - 1e-9:  # 1e-9: float rounding of the ratio
            chosen, after = round(threshold, 6), held
    prune(masks, originals, chosen)
    return chosen, base, after, accuracies


@defense("anp", "ANP: adversarial neuron perturbation + mask pruning", ANPParams, family="pruning")
def adversarial_neuron_pruning(model, data, params: ANPParams, device):
    model = model.to(device)
    generator = torch.Generator(device="cpu").manual_seed(run_seed())
    fit, held_out, note = split_held_out(data, generator)
    notes = [note] if note else []
    batch_statistics = len(fit) >= 2
    if not batch_statistics:
        notes.append(f"only {len(fit)} image(s) to learn masks on: BN used running statistics, not batch ones")
    elif len(fit) % params.batch_size == 1:
        notes.append("a trailing batch of one image is skipped in every pass (no batch statistics for it)")
    masks = NeuronMasks(model, device)
    updates = learn_masks(masks, fit, params, generator, batch_statistics) if len(fit) else 0
    threshold, before, after, accuracies = choose_threshold(masks, held_out, params)
    if threshold is None:
        notes.append("no threshold kept held-out accuracy within the allowed drop: nothing pruned")
    mask = masks.mask.detach().float().cpu()
    return Defended(model, {
        "pruned_channels": int((mask <= threshold).sum()) if threshold is not None else 0,
        "neurons": len(mask), "threshold": threshold, "mask_updates": updates,
        "held_out_accuracy_before": before, "held_out_accuracy_after": after,
        "held_out_accuracy_by_threshold": accuracies,
        "mask_quantiles": torch.quantile(mask, torch.tensor([0.0, 0.1, 0.5, 1.0])).tolist() if len(mask) else [],
        "notes": notes})
