"""RNP (Li, Lyu, Ma, Koren, Lyu, Li and Jiang, "Reconstructive Neuron Pruning for Backdoor Defense",
ICML 2023): unlearn the clean task, learn which neurons recover it, prune the rest.

1. Unlearn: a copy of the model is trained by gradient *ascent* on the clean mitigation data (SGD
   lr 0.01, momentum 0.9, weight decay 5e-4, lr x0.1 at epochs 10 and 20) and stops after the first
   epoch whose training accuracy is <= ``clean_threshold`` (0.2), or after ``unlearn_epochs`` (20).
2. Recover: with the unlearned weights frozen, a mask in [0, 1] per BN channel (init 1, a factor on
   that channel's BN weight) is learned by gradient *descent* on ``alpha`` x the clean cross-entropy
   (SGD lr 0.2, momentum 0.9, 20 epochs), clipped to [0, 1] after every step.
3. Prune: on the ORIGINAL model, every channel whose mask is <= ``prune_threshold`` (0.7) gets its BN
   weight zeroed; the unlearned copy is discarded.

Interpretations (from the authors' code and the BackdoorBench port the survey used):
- ``alpha`` only scales the recovery loss (the toolkit's ``loss = alpha * loss``), i.e. with plain SGD
  it is a factor on the mask's step size; there is no mask penalty or loss mix.
- Pruning zeroes the BN weight only, as the toolkit does: the mask was learned as a factor on that
  weight, so a pruned channel keeps its BN shift. ``prune_bias=True`` zeroes the shift too.
- The toolkit sweeps thresholds against test ASR/ACC; we apply only its fixed default threshold.
- Gradients are clipped to norm 20 after the backward pass (the toolkit clips before it, a no-op),
  so the ascent cannot diverge to non-finite weights.
- Both stages augment batches (random crop, flip where the dataset allows), as the toolkit's loader does.

Few data: RNP needs no held-out split. With fewer images than ``batch_size`` every epoch is a single
batch of all of them; a trailing batch of one image is skipped (BN cannot train on it); with fewer
than 2 images nothing can be trained and the model is returned unpruned. Each case, and unlearning
that never reaches ``clean_threshold``, is recorded in ``details["notes"]``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..engine import LossWatch, autocast
from ..models import batch_norms
from ..params import check_ranges
from ..resume import loop_checkpoint
from . import Defended, MitigationData, defense, run_seed
from .support import accuracy, batches

GRADIENT_CLIP = 20.0  # the toolkit's max gradient norm during unlearning


@dataclass(frozen=True)
class RNPParams:
    unlearn_lr: float = 0.01
    unlearn_epochs: int = 20  # at most: unlearning stops once training accuracy <= clean_threshold
    unlearn_milestones: tuple[int, ...] = (10, 20)  # epochs where the unlearning lr drops x0.1
    clean_threshold: float = 0.2
    momentum: float = 0.9  # both stages
    weight_decay: float = 5e-4  # unlearning only; the mask has none
    recover_lr: float = 0.2
    recover_epochs: int = 20
    alpha: float = 0.2  # scale of the recovery loss
    prune_threshold: float = 0.7  # prune channels whose mask is <= this
    prune_bias: bool = False  # also zero the pruned channels' BN shift (the toolkit does not)
    batch_size: int = 128
    augment: bool = True

    def __post_init__(self):
        checks = {
            "unlearn_lr": self.unlearn_lr > 0,
            "unlearn_epochs": self.unlearn_epochs >= 1,
            "unlearn_milestones": all(isinstance(m, int) and m >= 1 for m in self.unlearn_milestones),
            "clean_threshold": 0 <= self.clean_threshold <= 1,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "recover_lr": self.recover_lr > 0,
            "recover_epochs": self.recover_epochs >= 1,
            "alpha": self.alpha > 0,
            "prune_threshold": 0 <= self.prune_threshold < 1,
            "batch_size": self.batch_size >= 1,
        }
        check_ranges("RNP", self, checks)


def training_batches(data: MitigationData, params: RNPParams, generator: torch.Generator):
    """One shuffled, augmented epoch, skipping a trailing batch of one image (BN cannot train on it)."""
    for x, y in batches(data, params.batch_size, generator, augment=params.augment):
        if len(y) > 1:
            yield x, y


class Progress:
    """Everything a stage's epochs change: what a checkpoint between epochs holds. ``trained`` is
    what the stage learns (the unlearned copy, or the masks: the optimiser's tensors, restored in place)."""

    def __init__(self, trained: nn.Module | dict[str, torch.Tensor], optimiser: torch.optim.Optimizer,
                 generator: torch.Generator, schedule: torch.optim.lr_scheduler.LRScheduler | None = None):
        self.trained, self.optimiser, self.generator, self.schedule = trained, optimiser, generator, schedule
        self.epochs, self.done = 0, False
        self.train_accuracy = 1.0  # of the last epoch; unlearning only


def unlearn(model: nn.Module, data: MitigationData, params: RNPParams, generator: torch.Generator
            ) -> tuple[int, float]:
    """Gradient ascent on the clean loss, in place; (epochs run, training accuracy of the last one)."""
    optimiser = torch.optim.SGD(model.parameters(), lr=params.unlearn_lr, momentum=params.momentum,
                                weight_decay=params.weight_decay)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, list(params.unlearn_milestones), gamma=0.1)
    model.train()
    progress = Progress(model, optimiser, generator, schedule)
    watch = LossWatch(data.images.device, lambda epoch: f"RNP unlearning epoch {epoch + 1}")
    with loop_checkpoint("RNP unlearning", progress) as checkpoint:  # saved between epochs
        while not progress.done:
            correct, seen = torch.zeros((), dtype=torch.long, device=data.images.device), 0
            for x, y in training_batches(data, params, generator):
                with autocast(x.device):
                    logits = model(x)
                loss = F.cross_entropy(logits.float(), y)
                watch.observe(loss, progress.epochs)
                optimiser.zero_grad(set_to_none=True)
                (-loss).backward()
                nn.utils.clip_grad_norm_(model.parameters(), GRADIENT_CLIP)
                optimiser.step()
                correct += (logits.argmax(1) == y).sum()  # summed on the device: one sync per epoch
                seen += len(y)
            schedule.step()
            watch.check()
            progress.epochs, progress.train_accuracy = progress.epochs + 1, correct.item() / seen
            progress.done = (progress.epochs == params.unlearn_epochs
                             or progress.train_accuracy <= params.clean_threshold)
            checkpoint.boundary(finished=progress.done)
    return progress.epochs, progress.train_accuracy


def learn_neuron_mask(unlearned: nn.Module, data: MitigationData, params: RNPParams, generator: torch.Generator
                      ) -> dict[str, torch.Tensor]:
    """Per BN layer name, a mask in [0, 1] on its channels that recovers the clean loss of ``unlearned``
    (whose weights stay fixed: the mask enters as a factor on each BN weight through functional_call)."""
    norms = [(name, bn) for name, bn in batch_norms(unlearned) if bn.weight is not None]
    masks = {name: torch.ones(bn.num_features, device=bn.weight.device, requires_grad=True) for name, bn in norms}
    optimiser = torch.optim.SGD(masks.values(), lr=params.recover_lr, momentum=params.momentum)
    unlearned.requires_grad_(False).train()  # train mode as in the toolkit: BN normalises with batch statistics
    # The BN running statistics this updates are not in the checkpoint: in train mode they never reach the outputs.
    progress = Progress(masks, optimiser, generator)
    watch = LossWatch(data.images.device, lambda epoch: f"RNP mask recovery epoch {epoch + 1}")
    with loop_checkpoint("RNP neuron mask", progress) as checkpoint:  # saved between epochs
        while progress.epochs < params.recover_epochs:
            for x, y in training_batches(data, params, generator):
                masked = {f"{name}.weight": bn.weight * masks[name] for name, bn in norms}
                with autocast(x.device):
                    logits = functional_call(unlearned, masked, (x,))
                loss = params.alpha * F.cross_entropy(logits.float(), y)
                watch.observe(loss, progress.epochs)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                with torch.no_grad():
                    for mask in masks.values():
                        mask.clamp_(0.0, 1.0)
            watch.check()
            progress.epochs += 1
            checkpoint.boundary(finished=progress.epochs == params.recover_epochs)
    return {name: mask.detach() for name, mask in masks.items()}


@torch.no_grad()
def prune_low_mask_channels(model: nn.Module, masks: dict[str, torch.Tensor], params: RNPParams
                            ) -> dict[str, list[int]]:
    """Zero the BN weight (and, with ``prune_bias``, shift) of channels whose mask is <= the threshold."""
    pruned = {}
    for name, bn in batch_norms(model):
        if name not in masks:
            continue
        channels = torch.nonzero(masks[name] <= params.prune_threshold).flatten()
        bn.weight[channels] = 0
        if params.prune_bias and bn.bias is not None:
            bn.bias[channels] = 0
        if len(channels):
            pruned[name] = channels.tolist()
    return pruned


@defense("rnp", "RNP: unlearn, learn a BN-channel mask that recovers clean accuracy, prune low-mask channels",
         RNPParams, family="pruning")
def reconstructive_neuron_pruning(model, data, params: RNPParams, device):
    model = model.to(device)
    notes = []
    if len(data) < 2:
        notes.append(f"only {len(data)} mitigation image(s): RNP cannot train on fewer than 2; model left unpruned")
        return Defended(model, {"pruned_channels": 0, "notes": notes})
    if len(data) < params.batch_size:
        notes.append(f"{len(data)} mitigation images, fewer than batch_size {params.batch_size}: "
                     "every epoch is a single batch of all of them")
    generator = torch.Generator(device="cpu").manual_seed(run_seed())
    accuracy_before = accuracy(model, data)

    unlearned = copy.deepcopy(model)  # the original stays untouched until it is pruned
    epochs, unlearned_accuracy = unlearn(unlearned, data, params, generator)
    if not all(torch.isfinite(p).all() for p in unlearned.parameters()):
        raise RuntimeError("RNP unlearning produced non-finite weights")
    if unlearned_accuracy > params.clean_threshold:
        notes.append(f"unlearning stopped at unlearn_epochs={epochs} with training accuracy "
                     f"{unlearned_accuracy:.3f} > clean_threshold {params.clean_threshold}")
    masks = learn_neuron_mask(unlearned, data, params, generator)
    del unlearned

    pruned = prune_low_mask_channels(model, masks, params)
    all_masks = torch.cat(list(masks.values()))
    return Defended(model, {
        "pruned_channels": sum(map(len, pruned.values())),
        "bn_channels": len(all_masks),
        "unlearn_epochs_run": epochs,
        "unlearned_train_accuracy": unlearned_accuracy,
        "mask_mean": float(all_masks.mean()),
        "mitigation_accuracy_before": accuracy_before,
        "mitigation_accuracy_after": accuracy(model, data),
        "pruned": pruned,
        "notes": notes,
    })
