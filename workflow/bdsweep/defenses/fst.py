"""FST (Min, Qin, Shen and Cheng, NeurIPS 2023): "Towards Stable Backdoor Purification through Feature
Shift Tuning".

Plain fine-tuning barely moves the backdoored features, because the old classifier head keeps rewarding
them. FST therefore
1. re-initialises the classifier's Linear layers (weight and bias uniform in +-1/sqrt(fan_in), as a
   fresh ``nn.Linear``) and keeps a frozen copy w_ori of each original weight;
2. fine-tunes the WHOLE model on CE + alpha * sum_l <w_l, w_ori_l> (the sum of the element-wise product
   of each new and original weight), which pushes the new head, and with it the features, away from the
   backdoored ones;
3. after every optimiser step rescales each new weight to its original's Frobenius norm,
   ||w_l|| = ||w_ori_l||, so the regulariser cannot be lowered by shrinking or inflating w.

As the survey's code ran it (FORK = WhoDunnett/BackdoorBenchmark @ 8613640, ``defense/fst.py``):
- ``layers="all"`` (default): EVERY ``nn.Linear`` of the model is re-initialised and regularised, which is
  what FORK does on VGG19-BN (classifier.0/.3/.6) and MobileNetV3 (classifier.0/.3) (fst.py:223-241); on
  PreAct-ResNet18 and EfficientNet-B3 the classifier is the only Linear. ``layers="classifier"`` re-inits
  the final head only (``model.parts.classifier``), as the FST paper describes.
- 15 epochs, lr 0.01, alpha 0.2 on every dataset: FORK's argparse defaults (fst.py:77-80) override its
  per-dataset YAML. Batch 256 (the YAML's). SGD momentum 0.9 without weight decay, cosine over the
  epochs stepped per epoch; random crop (padding 4) and flip where the dataset allows.
- The regulariser and the norm constraint cover weights only, not biases; a fresh weight is not rescaled
  before the first step.

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

from ..engine import BatchHook, train
from ..params import BatchSize
from ..passes import epochs_over_images
from ..recipe import TrainingParams
from . import Defended, defense, run_seed
from .support import batching_notes, untrainable

LAYER_CHOICES = ("all", "classifier")


@dataclass(frozen=True)
class FSTParams(TrainingParams):
    OWNER = "FST"
    SCHEDULES = ("cosine", "constant")  # "cosine" (the authors') or "constant"

    epochs: int = 15  # FORK's argparse default (fst.py:77) overrides its YAML on every dataset
    batch_size: BatchSize = 256  # FORK's config/defense/fst YAML
    lr: float = 0.01  # fst.py:80
    weight_decay: float = 0.0  # the authors' optimiser has none
    alpha: float = 0.2  # weight of the inner products <w, w_ori> (fst.py:79)
    layers: str = "all"  # "all": every nn.Linear (FORK, fst.py:223-241); "classifier": the final head only
    schedule: str = "cosine"

    def checks(self) -> dict[str, bool]:
        return {"alpha": self.alpha >= 0, "layers": self.layers in LAYER_CHOICES}


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


def tuned_linear_layers(model: nn.Module, layers: str) -> list[tuple[str, nn.Linear]]:
    """(name, layer) of the Linear layers FST re-initialises and regularises, in registration order
    (the classifier last in every architecture here)."""
    if layers == "classifier":
        head = model.get_submodule(model.parts.classifier)
        if not isinstance(head, nn.Linear):
            raise TypeError(f"FST needs the classifier {model.parts.classifier!r} to be nn.Linear, got {type(head)}")
        return [(model.parts.classifier, head)]
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not found:
        raise TypeError("FST needs at least one nn.Linear layer")
    return found


@torch.no_grad()
def project_to_norm(weight: torch.Tensor, norm: torch.Tensor) -> None:
    weight.mul_(norm / weight.norm().clamp_min(1e-12))


def head_alignment(weight: torch.Tensor, original: torch.Tensor) -> tuple[float, float]:
    """(inner product, cosine) between the new and the original head weight."""
    inner = float((weight.detach() * original).sum())
    return inner, inner / max(float(weight.detach().norm() * original.norm()), 1e-12)


class FeatureShift(BatchHook):
    """Adds alpha * sum_l <w_l, w_ori_l> to the cross-entropy; after each step restores every
    ||w_l|| = ||w_ori_l||. The last layer is the head, whose inner product is recorded per epoch."""

    def __init__(self, layers: list[nn.Linear], originals: list[torch.Tensor], alpha: float):
        self.layers, self.originals, self.alpha = layers, originals, alpha
        self.original_norms = [original.norm() for original in originals]
        self.head, self.original = layers[-1], originals[-1]
        self.epoch_inner_product = []

    def loss(self, inputs, labels, logits, cross_entropy):
        inner = sum((layer.weight * original).sum() for layer, original in zip(self.layers, self.originals))
        return cross_entropy + self.alpha * inner

    def step(self):
        for layer, norm in zip(self.layers, self.original_norms):
            project_to_norm(layer.weight, norm)

    def end_epoch(self):  # one host sync per epoch
        self.epoch_inner_product.append(head_alignment(self.head.weight, self.original)[0])


@defense("fst", "FST: re-initialise the head, fine-tune all weights away from the original head (norm-tied)",
         FSTParams, family="fine-tuning", passes=epochs_over_images("epochs"), smoke={"epochs": 1, "batch_size": 8})
def feature_shift_tuning(model, data, params: FSTParams, device):
    model = model.to(device)
    if (unchanged := untrainable("FST", model, data)) is not None:
        return unchanged  # head not re-initialised: an untrained random head would only guess
    notes = batching_notes(len(data), params.batch_size)
    named = tuned_linear_layers(model, params.layers)
    seed = run_seed()

    generator = torch.Generator().manual_seed(seed)
    originals = [reinitialise_head(layer, generator) for _, layer in named]
    layers = [layer for _, layer in named]
    head, original = layers[-1], originals[-1]
    inner_at_init, cosine_at_init = head_alignment(head.weight, original)
    model.requires_grad_(True)  # the whole model is tuned
    hook = FeatureShift(layers, originals, params.alpha)
    curve = train(model, data.images, data.labels, params.recipe(), data.normalisation, seed + 1,
                  description="FST", hook=hook)
    inner, cosine = head_alignment(head.weight, original)
    return Defended(model, {
        "reinitialised_layers": [name for name, _ in named],
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
