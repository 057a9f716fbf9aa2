"""FP: Fine-Pruning (Liu, Dolan-Gavitt & Garg, "Fine-Pruning: Defending Against Backdooring
Attacks on Deep Neural Networks", RAID 2018), as the survey's code ran it (FORK ``defense/fp.py``).

1. Split validation images off the mitigation data (``support.split_held_out``; FORK
   ``spc_choose_poisoned_sample(..., val_ratio=0.1)``, ``fp.py:248-271``), never test data (FORK's
   parent BackdoorBench stops on test accuracy).
2. Rank the units of the INPUT of the first ``nn.Linear`` (in module order) by their mean over the
   fitting images (FORK hooks the input of the model's last child and prunes the first Linear in it,
   ``fp.py:308-345``): PreAct-ResNet18 and the small CNN 512/64 pooled channels, EfficientNet-B3
   1,536, MobileNetV3-L 960, VGG19-BN the 25,088 flattened units of its 7x7 pooled map (49 per
   channel; at 32 px the 49 are equal, and ties keep index order: ``argsort(stable=True)``).
3. Mask the lowest units, ``ceil(units * step)`` more per level (VGG: 251), by zeroing columns of
   that Linear's weight (``torch.nn.utils.prune.custom_from_mask``, as FORK), and test each level on
   the validation images: a level passes if ``abs(acc - acc_0) / acc_0 < max_relative_change``
   (``fp.py:400``: two-sided, strict, float64; a 10 % rise also stops).
4. Fine-tune the pruned model on the fitting images with the mask in place (FORK
   ``config/defense/fp``: 100 epochs, SGD 0.01, momentum 0.9, weight decay 5e-4, batch 256, cosine,
   the training augmentation); the mask is then made permanent (zero weight columns).

FORK's quirks, reproduced by default (``stop_rule="fork"``): level k masks ``seq_sort[:k-1]``, one
unit fewer than k (``fp.py:359``), and the model returned is the one pruned at the level that broke
the rule (``last_net`` is the same object as the pruned model, ``fp.py:355, 374-404``), or at the
last level tried. ``stop_rule="last_passing"`` masks k units at level k and returns the last level
that passed. Also as FORK: ranking and validation images go through the training transform
(random crop, flip where the dataset allows; ``augment_selection``), the fitting images in one pass.

Too few data: at SPC 1 the held-out images are also fitting images (``split_held_out``'s note);
with fewer than 2 fitting images fine-tuning is skipped; a fitting set smaller than the batch size
trains one batch per epoch; a validation accuracy of 0 leaves nothing to protect (FORK divides by
it), so nothing is pruned. Each case is recorded in ``details["notes"]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import prune

from ..engine import train
from ..passes import FORWARD, MitigationSize
from ..recipe import TrainingParams
from . import Defended, defense, run_seed
from .support import accuracy, batches, split_held_out

STOP_RULES = ("fork", "last_passing")
LISTED_UNITS = 4096  # details list the pruned units only up to this many (VGG19-BN has 25,088)


@dataclass(frozen=True)
class FPParams(TrainingParams):
    """FORK's fine-tuning recipe (``config/defense/fp``) is TrainingParams' defaults with 100 epochs."""

    OWNER = "FP"
    MIN_EPOCHS = 0  # 0 prunes only

    epochs: int = 100  # fine-tuning; 0 prunes only
    step: float = 0.01  # share of the units masked per level (FORK once_prune_ratio)
    max_relative_change: float = 0.1  # a level passes if |acc - acc_0| / acc_0 is below this (FORK acc_ratio)
    stop_rule: str = "fork"  # "fork": k-1 units at level k, return the breaking level; "last_passing": k, the last pass
    augment_selection: bool = True  # FORK: ranking and validation images get the training transform
    schedule: str = "cosine"
    crop_padding: int = 4

    def checks(self) -> dict[str, bool]:
        return {"step": 0 < self.step <= 1, "max_relative_change": 0 < self.max_relative_change < 1,
                "stop_rule": self.stop_rule in STOP_RULES}


# ---------------------------------------------------------------------- the stop rule, as pure functions


def level_passes(accuracy: float, baseline: float, max_relative_change: float) -> bool:
    """FORK ``fp.py:400``: ``abs(val_acc - val_acc_0) / val_acc_0 < acc_ratio`` (float64, strict, two-sided)."""
    return abs(accuracy - baseline) / baseline < max_relative_change


def returned_level(accuracies: Sequence[float], max_relative_change: float, rule: str) -> int:
    """Index of the level whose model is returned, given the validation accuracies of the levels
    tried in order (level 0 unpruned; a level that fails ends the sequence). "fork": the level that
    broke the rule, else the last one tried; "last_passing": the last level that passed."""
    last_passing = 0
    for level, value in enumerate(accuracies[1:], 1):
        if not level_passes(value, accuracies[0], max_relative_change):
            return level if rule == "fork" else last_passing
        last_passing = level
    return last_passing


def masked_units(pruned: int, rule: str) -> int:
    """Units masked at a level of ``pruned`` units: FORK masks ``seq_sort[0:pruned-1]`` (``fp.py:359``)."""
    return max(pruned - 1, 0) if rule == "fork" else pruned


# ---------------------------------------------------------------------------------------------- the defense


def first_linear(model: nn.Module) -> str:
    """Name of the first ``nn.Linear`` in module order: the layer whose input FP ranks and masks."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            return name
    raise ValueError("FP needs an nn.Linear layer: the model has none")


@torch.inference_mode()
def mean_input_activation(model: nn.Module, data, layer: str, batch_size: int = 256,
                          generator: torch.Generator | None = None, augment: bool = False) -> torch.Tensor:
    """Mean over the images of every unit of ``layer``'s (flattened) input, in eval mode, float32
    (FORK ``fp.py:318-330``: the sum over each batch divided by the number of images)."""
    model.eval()
    captured = []
    handle = model.get_submodule(layer).register_forward_pre_hook(
        lambda module, inputs: captured.append(inputs[0].flatten(1).float().sum(0)))
    try:
        for x, _ in batches(data, batch_size, generator, augment=augment):
            model(x)  # float32, no autocast, as FORK: bf16 would tie and reorder close activations
    finally:
        handle.remove()
    return torch.stack(captured).sum(0) / len(data)


@torch.inference_mode()
def selection_accuracy(model: nn.Module, data, generator: torch.Generator, augment: bool) -> float:
    """Validation accuracy in float32 (FORK's test loop has no autocast), on augmented images where
    FORK's validation loader augments them (``augment``)."""
    model.eval()
    correct = 0
    for x, y in batches(data, 512, generator if augment else None, augment=augment):
        correct += int((model(x).argmax(1) == y).sum())
    return correct / len(data)


def prune_levels(model: nn.Module, linear: nn.Linear, order: torch.Tensor, held_out, params: FPParams,
                 generator: torch.Generator) -> tuple[int, list[dict]]:
    """Mask ``order``'s units level by level on ``linear``'s pruning mask; (units masked in the
    returned model, the trail of levels tried). The mask is left at the returned level."""
    mask = linear.weight_mask
    per_step = max(1, math.ceil(len(order) * params.step))

    def evaluate(pruned: int) -> dict:
        masked = masked_units(pruned, params.stop_rule)
        mask.fill_(1)
        mask[:, order[:masked]] = 0
        return {"pruned": pruned, "masked": masked,
                "held_out_accuracy": selection_accuracy(model, held_out, generator, params.augment_selection)}

    trail = [evaluate(0)]
    baseline = trail[0]["held_out_accuracy"]
    if baseline > 0:
        for pruned in range(per_step, len(order), per_step):  # FORK: range(0, units, step), never all units
            trail.append(evaluate(pruned))
            if not level_passes(trail[-1]["held_out_accuracy"], baseline, params.max_relative_change):
                break
        level = returned_level([t["held_out_accuracy"] for t in trail], params.max_relative_change, params.stop_rule)
    else:
        level = 0
    masked = trail[level]["masked"]
    mask.fill_(1)
    mask[:, order[:masked]] = 0
    return masked, trail


def passes_per_run(p, m: MitigationSize) -> float:
    """Passes of one run."""
    activations, pruning_checks = m.images * FORWARD, round(1 / p.step) * m.classes * FORWARD
    return activations + pruning_checks + p.epochs * m.fit


@defense("fp", "FP: fine-pruning of the lowest-activation inputs of the first linear layer", FPParams,
         family="pruning", passes=passes_per_run, smoke={"epochs": 1, "batch_size": 8, "step": 0.25})
def fine_pruning(model, data, params: FPParams, device):
    model = model.to(device)
    generator = torch.Generator().manual_seed(run_seed())
    fit, held_out, note = split_held_out(data, generator)
    notes = [note] if note else []

    layer = first_linear(model)
    linear = model.get_submodule(layer)
    activation = mean_input_activation(model, fit, layer, params.batch_size, generator, params.augment_selection)
    order = torch.argsort(activation, stable=True)  # lowest mean activation first: units clean data barely use
    prune.custom_from_mask(linear, "weight", torch.ones_like(linear.weight))
    with torch.no_grad():
        masked, trail = prune_levels(model, linear, order, held_out, params, generator)
    baseline = trail[0]["held_out_accuracy"]
    if baseline == 0:
        notes.append("the unpruned model classifies no held-out image correctly: no accuracy to protect, "
                     "so no unit was pruned")
    elif not level_passes((round(baseline * len(held_out)) - 1) / len(held_out), baseline, params.max_relative_change):
        notes.append(f"one held-out image ({1 / len(held_out):.3f} of {len(held_out)}) changes the accuracy by more "
                     "than the rule allows, so pruning stops at the first level that loses one prediction")
    pruned_accuracy = accuracy(model, held_out)

    if params.epochs == 0:
        notes.append("epochs = 0: pruned without fine-tuning")
    elif len(fit) < 2:
        notes.append(f"only {len(fit)} fitting image(s): fine-tuning skipped (training needs at least 2)")
    else:
        if len(fit) < params.batch_size:
            notes.append(f"{len(fit)} fitting images, fewer than the batch size {params.batch_size}: "
                         "fine-tuning trains one batch per epoch")
        train(model, fit.images, fit.labels, params.recipe(), data.normalisation, run_seed(),
              description="FP fine-tune", progress=False)
    prune.remove(linear, "weight")  # the masked columns stay zero: a plain Linear again
    details = {
        "layer": layer,
        "units": len(order),
        "pruned_channels": masked,
        "pruned_ratio": masked / len(order),
        "held_out_images": len(held_out),
        "held_out_accuracy_before": baseline,
        "held_out_accuracy_pruned": pruned_accuracy,
        "held_out_accuracy_after": accuracy(model, held_out),
        "trail": trail,
        "notes": notes,
    }
    if len(order) <= LISTED_UNITS:
        details["pruned"] = order[:masked].tolist()
    return Defended(model, details)
