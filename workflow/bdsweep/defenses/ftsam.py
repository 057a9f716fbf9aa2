"""FT-SAM (Zhu, Wei, Shen, Fan and Wu, "Enhancing Fine-Tuning Based Backdoor Defense with
Sharpness-Aware Minimization", ICCV 2023): fine-tune the whole model on the mitigation data with
adaptive sharpness-aware minimisation (ASAM, Kwon et al., ICML 2021), i.e. solve
``min_w max_{||T_w^-1 e||_2 <= rho} CE(D_m, w + e)`` with ``T_w = diag(|w| + eta)``.

Per batch: (1) the gradient g of the (label-smoothed) cross-entropy at w; (2) the worst-case
perturbation to first order, ``e = rho T_w^2 g / ||T_w g||_2``, added to every trainable weight;
(3) the loss and its gradient recomputed on the same augmented batch at w + e; (4) w restored
exactly and the base optimiser (SGD, momentum, weight decay on w) steps with the gradient from w + e.
The engine runs the loop; this module's hook does steps 2-4 in ``after_backward``.

As the survey's code ran it (FORK = WhoDunnett/BackdoorBenchmark @ 8613640, ``defense/ft-sam.py``,
BackdoorBench's ft-sam with SAM(adaptive=True)):
- rho 2 and label smoothing 0.1 on EVERY dataset: FORK's argparse defaults (``--rho_max/--rho_min 2``,
  ``--label_smoothing 0.1``, ft-sam.py:203-205) override the YAML, so the GTSRB/Tiny YAML's 8/0 never take
  effect (in BB either). rho stays constant (rho_max = rho_min). ``--adaptive`` is ``store_false``, i.e.
  adaptive by default.
- The learning rate follows a cosine of T_max 100 (= the 100 epochs) stepped after every BATCH
  (ft-sam.py:318), so with more than one batch per epoch it reaches 0 after 100 steps and rises again
  (``schedule="cosine_per_batch"``; ``"cosine"`` steps per epoch). Batch 256 (the YAML's), SGD 0.01,
  momentum 0.9, weight decay 5e-4.
- Every trainable parameter is rescaled, biases and BN affine weights included, and ``eta`` is 0 as
  in the paper's ``T_w = diag(|w_1|, ..., |w_n|)``; Kwon et al.'s ASAM uses eta 0.01 on weights only
  (set ``eta`` for that scaling; biases are rescaled either way). A 1e-12 in the denominator keeps a
  zero gradient finite.
- The second pass must not count twice in BatchNorm's running statistics (the toolkit zeroes BN
  momentum for it); here every buffer is restored after it, which is the same and exact.
- Label smoothing as the toolkit's ``smooth_crossentropy``: 1 - eps on the true class and eps/(K-1) on
  each wrong one (``smoothing_target="wrong_classes"``); it is a KL divergence to that target, which differs
  from the cross-entropy used here by the target's entropy, a constant (same gradients). ``"uniform"`` is
  PyTorch's (eps/K on every class).

Too few data: nothing is held out, so SPC 1 and 2 run as is; with fewer images than ``batch_size``
every epoch is one batch (noted); the engine skips a trailing batch of one image (noted); with fewer
than 2 images nothing can be trained and the model is returned unchanged (noted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import BatchHook, autocast, train
from ..params import BatchSize
from ..passes import epochs_over_images
from ..recipe import TrainingParams
from . import Defended, defense, run_seed
from .support import accuracy, batching_notes, untrainable

DENOMINATOR_EPS = 1e-12  # the toolkit's perturb_eps: a zero gradient gives a zero perturbation


@dataclass(frozen=True)
class FTSAMParams(TrainingParams):
    OWNER = "FT-SAM"

    epochs: int = 100
    batch_size: BatchSize = 256  # FORK's ft-sam YAML
    schedule: str = "cosine_per_batch"  # FORK steps its cosine per batch (ft-sam.py:318); "cosine", "constant"
    rho: float = 2.0  # budget of ||T_w^-1 e||_2; FORK's argparse default on every dataset (ft-sam.py:203-205)
    eta: float = 0.0  # T_w = |w| + eta, element-wise (Kwon et al.'s ASAM: 0.01)
    label_smoothing: float = 0.1  # FORK's argparse default on every dataset (the GTSRB/Tiny YAML's 0 is dead)
    smoothing_target: str = "wrong_classes"  # FORK's eps/(K-1) on each wrong class, or "uniform" (PyTorch's eps/K)
    crop_padding: int = 4

    def checks(self) -> dict[str, bool]:
        return {"rho": self.rho >= 0, "eta": self.eta >= 0,
                "smoothing_target": self.smoothing_target in ("wrong_classes", "uniform")}


def smoothed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float, target: str
                           ) -> torch.Tensor:
    """Mean cross-entropy to the smoothed target: ``"wrong_classes"`` puts 1 - smoothing on the label and
    smoothing/(K-1) on every other class (BackdoorBench's ``smooth_crossentropy``), ``"uniform"`` is
    PyTorch's label smoothing."""
    if target == "uniform" or smoothing == 0:
        return F.cross_entropy(logits, labels, label_smoothing=smoothing)
    log_probabilities = F.log_softmax(logits.float(), dim=1)
    soft = torch.full_like(log_probabilities, smoothing / (logits.shape[1] - 1))
    soft.scatter_(1, labels[:, None], 1 - smoothing)
    return -(soft * log_probabilities).sum(1).mean()


@torch.no_grad()
def adaptive_perturbation(weights: list[torch.Tensor], grads: list[torch.Tensor], rho: float, eta: float
                          ) -> list[torch.Tensor]:
    """ASAM's ascent step ``e = rho T^2 g / ||T g||_2`` with ``T = |w| + eta``: the maximiser of
    ``g . e`` subject to ``||T^-1 e||_2 <= rho``, so that norm is exactly rho (for a non-zero T g)."""
    scales = [w.abs() + eta for w in weights]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(s * g) for s, g in zip(scales, grads)]))
    factor = rho / (norm + DENOMINATOR_EPS)
    return [s * s * g * factor for s, g in zip(scales, grads)]


class SharpnessAwareStep(BatchHook):
    """Replaces each batch's gradient by the gradient at the adaptively perturbed weights."""

    def __init__(self, model: nn.Module, params: FTSAMParams):
        self.model, self.params = model, params
        # Per-step numbers, summed on the device: one host sync at the end, not one per batch.
        self.perturbed_loss_sum = self.perturbation_norm_sum = None
        self.steps = self.images_seen = 0

    @torch.no_grad()
    def perturb(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Move every weight with a gradient to w + e; (those weights, their values at w)."""
        weights = [p for p in self.model.parameters() if p.requires_grad and p.grad is not None]
        originals = [w.detach().clone() for w in weights]  # restored by copy: w + e - e is not w in floats
        perturbation = adaptive_perturbation(originals, [w.grad for w in weights], self.params.rho, self.params.eta)
        for w, e in zip(weights, perturbation):
            w.add_(e)
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(e) for e in perturbation]))
        self.perturbation_norm_sum = norm if self.perturbation_norm_sum is None else self.perturbation_norm_sum + norm
        return weights, originals

    def loss(self, inputs, labels, logits, cross_entropy):
        if self.params.smoothing_target == "uniform":
            return cross_entropy  # the engine's, smoothed by the recipe
        return smoothed_cross_entropy(logits, labels, self.params.label_smoothing, self.params.smoothing_target)

    def after_backward(self, inputs, labels):
        buffers = [b.clone() for b in self.model.buffers()]  # BN statistics: the second pass must not count
        weights, originals = self.perturb()
        self.model.zero_grad(set_to_none=True)
        with autocast(inputs.device):
            loss = smoothed_cross_entropy(self.model(inputs), labels, self.params.label_smoothing,
                                          self.params.smoothing_target)
        loss.backward()  # these gradients, taken at w + e, are the ones the optimiser steps with
        with torch.no_grad():
            for w, original in zip(weights, originals):
                w.copy_(original)
            for b, saved in zip(self.model.buffers(), buffers):
                b.copy_(saved)
        weighted = loss.detach() * len(labels)
        self.perturbed_loss_sum = weighted if self.perturbed_loss_sum is None else self.perturbed_loss_sum + weighted
        self.steps += 1
        self.images_seen += len(labels)


@defense("ft-sam", "FT-SAM: fine-tune the whole model with adaptive sharpness-aware minimisation", FTSAMParams,
         family="fine-tuning", passes=epochs_over_images("epochs", per_image=2.0), featured=True,
         smoke={"epochs": 1, "batch_size": 8})
def sharpness_aware_fine_tuning(model, data, params: FTSAMParams, device):
    model = model.to(device)
    if (unchanged := untrainable("FT-SAM", model, data)) is not None:
        return unchanged
    notes = batching_notes(len(data), params.batch_size)
    hook = SharpnessAwareStep(model, params)
    # The engine smooths only PyTorch's way; FORK's target is the hook's loss.
    recipe = params.recipe(label_smoothing=params.label_smoothing if params.smoothing_target == "uniform" else 0.0)
    curve = train(model, data.images, data.labels, recipe, data.normalisation, run_seed(), description="FT-SAM",
                  hook=hook)
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise RuntimeError("FT-SAM fine-tuning produced non-finite weights")
    return Defended(model, {
        "sam_steps": hook.steps,
        "final_training_loss": curve[-1]["loss"],  # at w, augmented batches; smoothed only for "uniform"
        "final_training_accuracy": curve[-1]["accuracy"],
        "mean_perturbed_loss": float(hook.perturbed_loss_sum) / hook.images_seen,  # at w + e, whole run
        "mean_perturbation_l2": float(hook.perturbation_norm_sum) / hook.steps,  # ||e||_2, not the T-norm
        "mitigation_accuracy_after": accuracy(model, data),
        "notes": notes,
    })
