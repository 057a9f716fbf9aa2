"""RNP (Li, Lyu, Ma, Koren, Lyu, Li and Jiang, "Reconstructive Neuron Pruning for Backdoor Defense",
ICML 2023) as the survey's code ran it (FORK = WhoDunnett/BackdoorBenchmark @ 8613640, ``defense/rnp.py``,
``config/defense/rnp/default.yaml``, ``utils/defense_utils/rnp/mask_batchnorm.py``).

1. Unlearn: a copy of the model whose every BN weight carries a mask (init 1, a factor on the weight) is
   trained by gradient *ascent* on the clean mitigation data, weights and masks alike (SGD lr 0.001,
   momentum 0.9, weight decay 0.05 (the YAML's string ``5e-2`` cast, `rnp.py:419-421`), cosine schedule
   with T_max 20 (`:422`), batches of 256), and stops after the first epoch whose training accuracy is
   <= ``clean_threshold`` (0.2), or after ``unlearn_epochs`` (20).
2. Recover: with the unlearned weights frozen, the masks, starting where unlearning left them (FORK
   unlearns a masked copy and loads its state, masks included, into the recovery copy), learn by
   gradient *descent* on the plain clean cross-entropy (no alpha, `:179`; SGD lr 0.2, momentum 0.9,
   20 epochs), clipped to [0, 1] after every step.
3. Prune: on the ORIGINAL model, the threshold rises from 0 in steps of 0.02 (repeated float addition,
   while < 1); at each, every channel whose mask score (rounded to 4 decimals, as FORK writes and reads
   them) is < the threshold gets its BN weight zeroed; the sweep stops at the first threshold whose
   mitigation accuracy falls below the unpruned accuracy - 0.02 (absolute), and the model of the last
   threshold that did not is returned (`:508-531`).

FORK's quirks, reproduced by default (each with a parameter for the corrected behaviour):
- a failed try (an exception; FORK runs with anomaly detection, so a NaN in the backward pass raises)
  is retried from the original weights with the unlearning lr x 0.1, up to 10 tries (`:488`); here a
  non-finite loss or non-finite unlearned weights is a failure (``max_tries``, ``retry_lr_factor``);
- the masks are unlearned together with the weights, so recovery starts from the unlearned masks, not
  from 1 (``unlearn_masks=False`` starts it from 1, as the authors' code);
- FORK clips the unlearning gradients *before* the backward pass, a no-op (``clip_gradients=True``
  clips them after it, at norm 20);
- accuracy for the threshold sweep is measured (eval mode) on FORK's training loader, i.e. on augmented
  images (``augment_accuracy=False`` measures on the plain images);
- the returned model is a copy FORK builds with ``nn.BatchNorm2d``'s eps 1e-5 (`:494`), which changes
  MobileNetV3 (eps 1e-3 in torchvision) and no other architecture: ``final_bn_eps`` (0 keeps the
  architecture's own);
- pruning zeroes the BN weight only (``prune_bias`` zeroes the shift too).

Few data: RNP needs no held-out split. A trailing batch of one image is skipped (BN cannot train on
it); with fewer than 2 images nothing can be trained and the model is returned unpruned. Each case,
unlearning that never reaches ``clean_threshold`` and retries are recorded in ``details["notes"]``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..checkpoints import LoopState, checkpointed_steps
from ..engine import LossWatch, NonFiniteLoss, autocast
from ..models import batch_norms
from ..params import BatchSize, check_ranges
from ..passes import FORWARD, MitigationSize
from . import Defended, MitigationData, defense, run_seed
from .support import batches

GRADIENT_CLIP = 20.0  # the toolkit's max gradient norm during unlearning (used with clip_gradients only)


@dataclass(frozen=True)
class RNPParams:
    unlearn_lr: float = 0.001  # FORK unlearn_lr (yaml)
    unlearn_epochs: int = 20  # at most, and the cosine schedule's T_max (`rnp.py:422`)
    clean_threshold: float = 0.2  # FORK unlearn_threshold
    momentum: float = 0.9  # both stages
    weight_decay: float = 0.05  # unlearning only (FORK's yaml string 5e-2, cast at `rnp.py:419`)
    recover_lr: float = 0.2  # FORK recovery_lr
    recover_epochs: int = 20
    threshold_step: float = 0.02  # FORK's sweep step (`rnp.py:508-531`)
    max_accuracy_drop: float = 0.02  # FORK recovery_drop: absolute drop of mitigation accuracy allowed
    batch_size: BatchSize = 256
    augment: bool = True  # both stages train on augmented batches, as FORK's loader
    augment_accuracy: bool = True  # FORK's quirk: the sweep's accuracy is measured on augmented images
    round_scores: bool = True  # FORK's quirk: mask scores rounded to 4 decimals
    unlearn_masks: bool = True  # FORK's quirk: masks are unlearned too, and recovery starts from them
    clip_gradients: bool = False  # FORK clips before the backward pass (a no-op); True clips after it
    max_tries: int = 10  # FORK retries a failed unlearning/recovery ...
    retry_lr_factor: float = 0.1  # ... with the unlearning lr times this (`rnp.py:488`)
    final_bn_eps: float = 1e-5  # FORK's final copy's BN eps (`rnp.py:494`); 0 keeps the architecture's own
    prune_bias: bool = False  # also zero the pruned channels' BN shift (FORK does not)

    def __post_init__(self):
        checks = {
            "unlearn_lr": self.unlearn_lr > 0,
            "unlearn_epochs": self.unlearn_epochs >= 1,
            "clean_threshold": 0 <= self.clean_threshold <= 1,
            "momentum": 0 <= self.momentum < 1,
            "weight_decay": self.weight_decay >= 0,
            "recover_lr": self.recover_lr > 0,
            "recover_epochs": self.recover_epochs >= 1,
            "threshold_step": 0 < self.threshold_step <= 1,
            "max_accuracy_drop": 0 <= self.max_accuracy_drop <= 1,
            "batch_size": self.batch_size >= 1,
            "max_tries": self.max_tries >= 1,
            "retry_lr_factor": 0 < self.retry_lr_factor <= 1,
            "final_bn_eps": self.final_bn_eps >= 0,
        }
        check_ranges("RNP", self, checks)


def training_batches(data: MitigationData, params: RNPParams, generator: torch.Generator):
    """One shuffled, augmented epoch, skipping a trailing batch of one image (BN cannot train on it)."""
    for x, y in batches(data, params.batch_size, generator, augment=params.augment):
        if len(y) > 1:
            yield x, y


def masked_norms(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    return [(name, bn) for name, bn in batch_norms(model) if bn.weight is not None]


def masked_logits(model: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Logits with every BN weight times its mask (FORK's MaskBatchNorm2d), through functional_call."""
    overrides = {f"{name}.weight": bn.weight * masks[name] for name, bn in masked_norms(model)}
    with autocast(x.device):
        return functional_call(model, overrides, (x,)).float()


def unlearn(model: nn.Module, masks: dict[str, torch.Tensor], data: MitigationData, params: RNPParams,
            generator: torch.Generator, lr: float | None = None, label: str = "RNP unlearning") -> tuple[int, float]:
    """Gradient ascent on the clean loss, in place, on the weights and (``unlearn_masks``) the masks;
    (epochs run, training accuracy of the last one)."""
    trained = list(model.parameters()) + (list(masks.values()) if params.unlearn_masks else [])
    for t in trained:
        t.requires_grad_(True)
    optimiser = torch.optim.SGD(trained, lr=params.unlearn_lr if lr is None else lr, momentum=params.momentum,
                                weight_decay=params.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=params.unlearn_epochs)
    model.train()
    # Everything the epochs change; the masks are the optimiser's tensors, restored in place.
    progress = LoopState(trained=model, masks=masks, optimiser=optimiser, generator=generator, schedule=schedule,
                         train_accuracy=1.0)  # of the last epoch
    watch = LossWatch(data.images.device, lambda epoch: f"RNP unlearning epoch {epoch + 1}")
    for epoch in checkpointed_steps(label, progress, params.unlearn_epochs,  # saved between epochs
                                    stop_early=lambda: progress.train_accuracy <= params.clean_threshold):
        correct, seen = torch.zeros((), dtype=torch.long, device=data.images.device), 0
        for x, y in training_batches(data, params, generator):
            logits = masked_logits(model, masks, x)
            loss = F.cross_entropy(logits, y)
            watch.observe(loss, epoch)
            optimiser.zero_grad(set_to_none=True)
            (-loss).backward()
            if params.clip_gradients:
                nn.utils.clip_grad_norm_(trained, GRADIENT_CLIP)
            optimiser.step()
            correct += (logits.argmax(1) == y).sum()  # summed on the device: one sync per epoch
            seen += len(y)
        schedule.step()
        watch.check()
        progress.train_accuracy = correct.item() / max(seen, 1)
    for t in trained:
        t.requires_grad_(False)
    return progress.step, progress.train_accuracy


def learn_neuron_mask(unlearned: nn.Module, masks: dict[str, torch.Tensor], data: MitigationData, params: RNPParams,
                      generator: torch.Generator, label: str = "RNP neuron mask") -> dict[str, torch.Tensor]:
    """Per BN layer name, a mask in [0, 1] on its channels that recovers the clean loss of ``unlearned``
    (whose weights stay fixed), starting from ``masks`` (changed in place)."""
    for mask in masks.values():
        mask.requires_grad_(True)
    optimiser = torch.optim.SGD(masks.values(), lr=params.recover_lr, momentum=params.momentum)
    unlearned.requires_grad_(False).train()  # train mode as in FORK: BN normalises with batch statistics
    # The BN running statistics this updates are not in the checkpoint: in train mode they never reach the outputs.
    progress = LoopState(masks=masks, optimiser=optimiser, generator=generator)  # the masks: restored in place
    watch = LossWatch(data.images.device, lambda epoch: f"RNP mask recovery epoch {epoch + 1}")
    for epoch in checkpointed_steps(label, progress, params.recover_epochs):  # saved between epochs
        for x, y in training_batches(data, params, generator):
            loss = F.cross_entropy(masked_logits(unlearned, masks, x), y)  # no alpha (`rnp.py:179`)
            watch.observe(loss, epoch)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            with torch.no_grad():
                for mask in masks.values():
                    mask.clamp_(0.0, 1.0)
        watch.check()
    return {name: mask.detach() for name, mask in masks.items()}


def mask_scores(masks: dict[str, torch.Tensor], params: RNPParams) -> dict[str, torch.Tensor]:
    """The scores FORK thresholds (float64): each mask written with ``{:.4f}`` and read back, or raw."""
    if not params.round_scores:
        return {name: mask.double().cpu() for name, mask in masks.items()}
    return {name: torch.tensor([float(f"{v:.4f}") for v in mask.double().cpu().tolist()], dtype=torch.float64)
            for name, mask in masks.items()}


@torch.no_grad()
def prune_below(model: nn.Module, originals: dict[str, tuple[torch.Tensor, torch.Tensor]],
                scores: dict[str, torch.Tensor], threshold: float | None, params: RNPParams) -> dict[str, list[int]]:
    """Restore the BN affine parameters, then zero the BN weight (and, with ``prune_bias``, shift) of
    channels scoring strictly below ``threshold`` (None: prune nothing)."""
    pruned = {}
    for name, bn in masked_norms(model):
        weight, bias = originals[name]
        bn.weight.copy_(weight)
        if bn.bias is not None:
            bn.bias.copy_(bias)
        if threshold is None or name not in scores:
            continue
        channels = torch.nonzero(scores[name] < threshold).flatten().to(bn.weight.device)
        bn.weight[channels] = 0
        if params.prune_bias and bn.bias is not None:
            bn.bias[channels] = 0
        if len(channels):
            pruned[name] = channels.tolist()
    return pruned


def sweep_threshold(model: nn.Module, scores: dict[str, torch.Tensor], evaluate, params: RNPParams):
    """FORK's adaptive threshold (`rnp.py:508-531`): from 0, in steps of ``threshold_step`` (added up
    as floats) while below 1, prune channels scoring below it and measure ``evaluate(model)``; stop at
    the first accuracy below the unpruned one - ``max_accuracy_drop``. Leaves the model pruned at the
    last threshold that passed (unpruned if none did) and returns (that threshold or None, the unpruned
    accuracy, {threshold: accuracy}, pruned channels per layer)."""
    originals = {name: (bn.weight.detach().clone(), None if bn.bias is None else bn.bias.detach().clone())
                 for name, bn in masked_norms(model)}
    initial = evaluate(model)
    accuracies, chosen, threshold = {}, None, 0.0
    while threshold < 1.0:
        prune_below(model, originals, scores, threshold, params)
        accuracies[round(threshold, 6)] = measured = evaluate(model)
        if measured < initial - params.max_accuracy_drop:
            break
        chosen = threshold
        threshold += params.threshold_step
    pruned = prune_below(model, originals, scores, chosen, params)
    return chosen, initial, accuracies, pruned


@torch.no_grad()
def mitigation_accuracy(model: nn.Module, data: MitigationData, params: RNPParams, generator: torch.Generator) -> float:
    """Eval-mode accuracy on the mitigation data, on augmented images with ``augment_accuracy`` (FORK
    measures it on its training loader)."""
    was_training = model.training
    model.eval()
    correct = 0
    for x, y in batches(data, 512, generator, augment=params.augment_accuracy):
        with autocast(x.device):
            correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / len(data)


def unlearn_and_recover(model: nn.Module, data: MitigationData, params: RNPParams, generator: torch.Generator,
                        notes: list[str]):
    """FORK's tries (`rnp.py:488`): unlearning then recovery from the original weights, retried with
    the unlearning lr x ``retry_lr_factor`` after a failure. (masks, epochs, accuracy, lr, tries)."""
    lr = params.unlearn_lr
    for attempt in range(1, params.max_tries + 1):
        suffix = "" if attempt == 1 else f" (try {attempt})"
        unlearned = copy.deepcopy(model)  # the original stays untouched until it is pruned
        masks = {name: torch.ones(bn.num_features, device=bn.weight.device) for name, bn in masked_norms(unlearned)}
        try:
            epochs, unlearned_accuracy = unlearn(unlearned, masks, data, params, generator, lr,
                                                 "RNP unlearning" + suffix)
            if not all(torch.isfinite(p).all() for p in [*unlearned.parameters(), *masks.values()]):
                raise NonFiniteLoss("RNP unlearning produced non-finite weights")
            if not params.unlearn_masks:
                masks = {name: torch.ones_like(mask) for name, mask in masks.items()}
            masks = learn_neuron_mask(unlearned, masks, data, params, generator, "RNP neuron mask" + suffix)
            return masks, epochs, unlearned_accuracy, lr, attempt
        except NonFiniteLoss as error:
            if attempt == params.max_tries:
                raise
            notes.append(f"try {attempt} failed ({error}); retried with unlearning lr {lr * params.retry_lr_factor:g}")
            lr *= params.retry_lr_factor
        finally:
            del unlearned
    raise AssertionError("unreachable")


def passes_per_run(p, m: MitigationSize) -> float:
    """Passes of one run: unlearning at its maximum, recovery, then one forward per swept threshold (all of
    them)."""
    thresholds = math.ceil(1 / p.threshold_step) + 1
    return (p.unlearn_epochs + p.recover_epochs) * m.images + thresholds * m.images * FORWARD


@defense("rnp", "RNP: unlearn, learn a BN-channel mask that recovers clean accuracy, prune low-mask channels",
         RNPParams, family="pruning", passes=passes_per_run,
         smoke={"unlearn_epochs": 1, "recover_epochs": 1, "batch_size": 8, "threshold_step": 0.2})
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
    masks, epochs, unlearned_accuracy, lr, tries = unlearn_and_recover(model, data, params, generator, notes)
    if unlearned_accuracy > params.clean_threshold:
        notes.append(f"unlearning stopped at unlearn_epochs={epochs} with training accuracy "
                     f"{unlearned_accuracy:.3f} > clean_threshold {params.clean_threshold}")

    if params.final_bn_eps > 0:  # FORK evaluates and returns a copy built with nn.BatchNorm2d's eps
        for _, bn in batch_norms(model):
            bn.eps = params.final_bn_eps
    threshold, before, accuracies, pruned = sweep_threshold(
        model, mask_scores(masks, params), lambda m: mitigation_accuracy(m, data, params, generator), params)
    if threshold is None:
        notes.append("mitigation accuracy dropped beyond the allowance already at threshold 0: nothing pruned")
    all_masks = torch.cat(list(masks.values()))
    return Defended(model, {
        "pruned_channels": sum(map(len, pruned.values())),
        "bn_channels": len(all_masks),
        "threshold": None if threshold is None else round(threshold, 6),
        "unlearn_tries": tries,
        "unlearn_lr_used": lr,
        "unlearn_epochs_run": epochs,
        "unlearned_train_accuracy": unlearned_accuracy,
        "mask_mean": float(all_masks.mean()),
        "mitigation_accuracy_before": before,
        "mitigation_accuracy_after": accuracies.get(round(threshold, 6), before) if threshold is not None else before,
        "mitigation_accuracy_by_threshold": accuracies,
        "pruned": pruned,
        "notes": notes,
    })
