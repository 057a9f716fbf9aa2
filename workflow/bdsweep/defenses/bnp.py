"""BNP (Zheng, Tang, Li, Liu, NeurIPS 2022, "Pre-activation distributions expose backdoor neurons"):
prune the channels whose batch-norm statistics disagree with clean data.

A BN layer's running statistics were estimated on the poisoned training set, so for backdoor
channels they describe a mixture of clean and triggered pre-activations. For every BatchNorm2d:
1. measure each channel's mean and (unbiased) variance of the BN's input on clean data, eval mode;
2. score it by a KL divergence between N(mu_data, var_data) and N(running_mean, running_var);
3. zero the BN weight and bias of channels scoring above mean + u * std of that layer's scores.
Scores are all computed on the unpruned model, then every layer is pruned at once.

By default, as the survey's code ran it (FORK ``defense/bnp.py:70-126``, ``config/defense/bnp/*.yaml``):
- the score is ``log(var_r / var_d) + (var_d + (mu_d - mu_r)^2) / (2 var_r) - 1/2`` (``bnp.py:108``):
  the Gaussian KL without the 1/2 on the log term and without eps (it can be negative);
- the statistics are those of the LAST batch only: FORK forwards its shuffled SPC loader (batch 256,
  the training transform: random crop with padding 4, flip on CIFAR-10) and its MBNS batch norm
  overwrites ``batch_mean``/``batch_var`` on every forward
  (``utils/defense_utils/mbns/mbns_model/mbns_batchnorm.py:23-24``). So with at most 256 images it is
  one augmented batch of all of them, else the last ``n mod 256`` of a shuffle (GTSRB SPC 10: 174 of
  430). Only that batch is forwarded here (in eval mode the others change nothing);
- u = 3, Tiny-ImageNet 4 (``config/defense/bnp/tiny.yaml``; the paper preset);
- the model is FORK's MBNS copy of the architecture (``bnp.py:get_mbns_network``), whose batch norms
  all have eps 1e-5: on MobileNetV3-L (own eps 1e-3) the statistics are measured and the returned
  model evaluated with eps 1e-5 (``copy_bn_eps``; 0 keeps the model's own eps). No-op elsewhere.
The corrected options: ``exact_kl=True`` scores the exact KL, ``0.5 log(var_r / var_d) + ...``,
with the BN's eps added to both variances (the variance the layer divides by);
``statistics="all"`` pools all mitigation images (float64 moments); ``augment=False`` uses them as
they are. ``exact_kl=True, statistics="all", augment=False`` is the method as its authors meant it.

Deviation (b): a zero variance (a channel constant on the batch, or a zero running variance) makes
FORK's score infinite or NaN, which poisons the layer's mean and std so that nothing in the layer is
pruned. Here a zero variance is replaced by the layer's eps (only where it is zero), so the score is
finite: a channel that is constant on clean data but varied in training scores high.

Few data: two values per channel suffice for a variance, so SPC 1 or 2 works wherever a BN sees
more than one value per channel (images x positions). A layer that sees a single value (one image
and a 1x1 map) is left unpruned, and ``details["notes"]`` says which; with a single image the
statistics are over its positions only, also noted. With no images at all nothing is pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..models import batch_norms
from ..params import FixedBatchSize
from ..passes import FORWARD, MitigationSize
from . import Defended, defense, run_seed
from .support import accuracy, batches, subset

STATISTICS_BATCH = 128  # images per forward pass while gathering statistics; the result does not depend on it
STATISTICS = ("last_batch", "all")


@dataclass(frozen=True)
class BNPParams:
    u: float = 3.0  # threshold: mean + u * std of a layer's scores (FORK config/defense/bnp: 3; tiny.yaml 4)
    exact_kl: bool = False  # False: FORK's score (bnp.py:108, no 1/2 on the log, no eps); True: the exact KL with eps
    statistics: str = "last_batch"  # FORK: the last loader batch (mbns_batchnorm.py:23); "all": every image
    # FORK config/defense/bnp/*.yaml batch_size: its loader's last batch gives the statistics. Not a memory knob
    # (statistics are gathered in batches of STATISTICS_BATCH), so an out-of-memory retry leaves it alone.
    loader_batch: FixedBatchSize = 256
    augment: bool = True  # FORK: the training transform (random crop, padding 4; flip where the dataset allows)
    copy_bn_eps: float = 1e-5  # eps of every BN, as FORK's MBNS copy (mbns_model/*); 0 keeps the model's own

    def __post_init__(self):
        if not (math.isfinite(self.u) and self.u >= 0):
            raise ValueError(f"u must be a finite number >= 0, got {self.u}")
        if self.statistics not in STATISTICS:
            raise ValueError(f"statistics must be one of {STATISTICS}, got {self.statistics!r}")
        if self.loader_batch < 1:
            raise ValueError(f"loader_batch must be at least 1, got {self.loader_batch}")
        if not (math.isfinite(self.copy_bn_eps) and self.copy_bn_eps >= 0):
            raise ValueError(f"copy_bn_eps must be a finite number >= 0, got {self.copy_bn_eps}")


class ChannelMoments:
    """Per-channel count, mean and sum of squared deviations of NCHW tensors, merged batch by
    batch (Chan et al.'s parallel update) in float64, so many batches lose no precision."""

    def __init__(self):
        self.count, self.mean, self.squares = 0, None, None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        count = x.shape[0] * x.shape[2] * x.shape[3]
        mean = x.mean((0, 2, 3))
        squares = (x - mean.view(1, -1, 1, 1)).square().sum((0, 2, 3))
        mean, squares = mean.double(), squares.double()
        if self.count == 0:
            self.count, self.mean, self.squares = count, mean, squares
            return
        total = self.count + count
        delta = mean - self.mean
        self.squares = self.squares + squares + delta.square() * self.count * count / total
        self.mean = self.mean + delta * count / total
        self.count = total

    def variance(self) -> torch.Tensor:
        return self.squares / (self.count - 1)  # unbiased, as torch.var


def gaussian_kl(mean_p, var_p, mean_q, var_q) -> torch.Tensor:
    """KL( N(mean_p, var_p) || N(mean_q, var_q) ), elementwise."""
    return 0.5 * torch.log(var_q / var_p) + (var_p + (mean_p - mean_q).square()) / (2 * var_q) - 0.5


def fork_kl(mean_p, var_p, mean_q, var_q) -> torch.Tensor:
    """The survey code's score (FORK ``bnp.py:108``): the KL above without the 1/2 on the log term."""
    return torch.log(var_q / var_p) + (var_p + (mean_p - mean_q).square()) / (2 * var_q) - 0.5


@torch.no_grad()
def bn_input_moments(model: nn.Module, data, layers: list[tuple[str, nn.BatchNorm2d]],
                     generator: torch.Generator | None = None, augment: bool = False) -> dict[str, ChannelMoments]:
    """Moments of every listed BN's input over the mitigation data (augmented with ``generator``'s
    draws when ``augment``), the model in eval mode."""
    moments = {name: ChannelMoments() for name, _ in layers}
    handles = [bn.register_forward_pre_hook(lambda module, inputs, name=name: moments[name].add(inputs[0]))
               for name, bn in layers]
    was_training = model.training
    model.eval()
    try:
        for x, _ in batches(data, STATISTICS_BATCH, generator, augment=augment):
            model(x)  # float32 on purpose: no autocast, the statistics are the point
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return moments


def last_batch(data, batch_size: int, generator: torch.Generator):
    """The images of the last batch of one shuffled pass in batches of ``batch_size`` (FORK's
    DataLoader(shuffle=True), no drop_last): all of them when they fit in one batch."""
    order = torch.randperm(len(data), generator=generator, device=generator.device)
    return subset(data, order[(len(data) - 1) // batch_size * batch_size:].to(data.images.device))


def channel_kl(bn: nn.BatchNorm2d, moments: ChannelMoments, exact: bool = True) -> torch.Tensor:
    """Each channel's score between the data's Gaussian and the BN's running Gaussian: the exact KL
    with eps on both variances, or FORK's score (no eps; a zero variance becomes eps, not inf)."""
    eps = bn.eps
    running_mean, running_var, data_var = bn.running_mean.double(), bn.running_var.double(), moments.variance()
    if exact:
        return gaussian_kl(moments.mean, data_var + eps, running_mean, running_var + eps)

    def nonzero(var):
        return torch.where(var > 0, var, torch.full_like(var, eps))

    return fork_kl(moments.mean, nonzero(data_var), running_mean, nonzero(running_var))


def passes_per_run(p, m: MitigationSize) -> float:
    """Passes of one run: the statistics batch (FORK: the loader's last batch only), then accuracy before and
    after."""
    measured = m.images if p.statistics == "all" else (m.images - 1) % p.loader_batch + 1 if m.images else 0
    return (measured + 2 * m.images) * FORWARD


@defense("bnp", "BNP: prune BN channels whose statistics shift on clean data", BNPParams,
         family="pruning", passes=passes_per_run, featured=True, smoke={"loader_batch": 8})
@torch.no_grad()
def batch_norm_pruning(model, data, params: BNPParams, device):
    model = model.to(device)
    notes = []
    layers = [(name, bn) for name, bn in batch_norms(model) if bn.running_mean is not None]
    if len(layers) < len(batch_norms(model)):
        notes.append("BN layers without running statistics were skipped")
    if len(data) == 0:
        notes.append("no mitigation images: nothing could be measured, the model is returned unpruned")
        return Defended(model, {"pruned_channels": 0, "pruned": {}, "notes": notes})
    if len(data) == 1:
        notes.append("a single mitigation image: each channel's statistics are over its spatial positions only")
    elif params.statistics == "last_batch" and len(data) % params.loader_batch == 1:
        notes.append(f"the last batch of {params.loader_batch} holds a single image: each channel's statistics "
                     "are over its spatial positions only")

    if params.copy_bn_eps:
        changed = [name for name, bn in batch_norms(model) if bn.eps != params.copy_bn_eps]
        for _, bn in batch_norms(model):
            bn.eps = params.copy_bn_eps
        if changed:
            notes.append(f"BN eps set to {params.copy_bn_eps:g} in {len(changed)} layer(s), as the survey code's "
                         "copy of the architecture")
    accuracy_before = accuracy(model, data)
    generator = torch.Generator().manual_seed(run_seed())
    measured = data if params.statistics == "all" else last_batch(data, params.loader_batch, generator)
    moments = bn_input_moments(model, measured, layers, generator, params.augment)
    pruned, too_few_values, thresholds = {}, [], {}
    for name, bn in layers:
        if moments[name].count < 2:  # a variance needs two values
            too_few_values.append(name)
            continue
        kl = channel_kl(bn, moments[name], params.exact_kl)
        threshold = kl.mean() + params.u * kl.std()
        channels = torch.nonzero(kl > threshold).flatten().to(bn.weight.device)
        bn.weight[channels] = 0
        bn.bias[channels] = 0
        if len(channels):
            pruned[name] = channels.tolist()
            thresholds[name] = float(threshold)
    if too_few_values:
        notes.append(f"{len(too_few_values)} BN layer(s) saw one value per channel (one image, 1x1 map) and "
                     f"were left unpruned: {', '.join(too_few_values)}")
    return Defended(model, {
        "pruned_channels": sum(map(len, pruned.values())),
        "pruned": pruned,
        "thresholds": thresholds,  # of the layers that lost channels
        "layers_scored": len(layers) - len(too_few_values),
        "images": len(data),
        "images_measured": len(measured),  # FORK: the last loader batch only
        "mitigation_accuracy_before": accuracy_before,
        "mitigation_accuracy_after": accuracy(model, data),
        "notes": notes,
    })
