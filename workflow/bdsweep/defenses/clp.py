"""CLP (Zheng et al., 2022): data-free channel Lipschitzness-based pruning.

For every convolution followed by batch norm, channel k's upper-bound Lipschitz constant is the
largest singular value of its kernel (reshaped in_channels x kh*kw) scaled by |gamma_k| / sigma_k.
Within each layer, channels above mean + u * std (unbiased std) are pruned by zeroing their BN
scale and shift.

As the survey's code (FORK ``defense/clp.py:57-82``): sigma_k = sqrt(running_var_k) without the
BN's eps (``clp.py:62``); ``bn_eps=True`` divides by sqrt(running_var + eps), the variance the layer
really divides by (differs from FORK only on near-zero variances, e.g. one channel of MobileNetV3,
whose BN eps is 1e-3). u = 3 on every dataset (FORK ``config/defense/clp/*.yaml``, Tiny included).

Deviation (b): a channel with running_var exactly 0 makes FORK divide by zero and ``torch.svd``
raise, so FORK cannot run such a model. Here that channel's sigma is sqrt(eps), the layer's actual
divisor, so its score is finite (and large when gamma is not 0: the channel amplifies any input
change by |gamma| / sqrt(eps)); ``details["zero_variance_channels"]`` counts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..models import conv_bn_pairs
from ..passes import no_passes
from . import Defended, defense


@dataclass(frozen=True)
class CLPParams:
    u: float = 3.0  # threshold: mean + u * std of a layer's scores (FORK config/defense/clp/*.yaml: 3 everywhere)
    bn_eps: bool = False  # False: sigma = sqrt(running_var), FORK clp.py:62; True: sqrt(running_var + eps)

    def __post_init__(self):
        if not (math.isfinite(self.u) and self.u >= 0):
            raise ValueError(f"u must be a finite number >= 0, got {self.u}")


def channel_lipschitz(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, bn_eps: bool = False) -> torch.Tensor:
    """Upper-bound Lipschitz constant of each output channel of ``bn(conv(x))``: sigma_max of the
    kernel times |gamma| / sigma, sigma = sqrt(running_var) (FORK) or sqrt(running_var + eps).
    A zero running variance falls back to sqrt(eps) (see the module docstring), never inf."""
    variance = bn.running_var + bn.eps if bn_eps else torch.where(bn.running_var > 0, bn.running_var, bn.eps)
    scale = (bn.weight / torch.sqrt(variance)).abs()
    kernels = conv.weight.reshape(conv.out_channels, conv.in_channels // conv.groups, -1)
    return torch.linalg.matrix_norm(kernels * scale.view(-1, 1, 1), ord=2)


@defense("clp", "CLP: data-free pruning of channels with a high Lipschitz upper bound", CLPParams,
         family="pruning", needs_data=False, passes=no_passes, featured=True)
@torch.no_grad()
def channel_lipschitz_pruning(model, data, params: CLPParams, device):
    model = model.to(device)
    pruned, zero_variance = {}, 0
    for conv, bn, bn_name in conv_bn_pairs(model):
        zero_variance += int((bn.running_var <= 0).sum())
        lipschitz = channel_lipschitz(conv, bn, params.bn_eps)
        threshold = lipschitz.mean() + params.u * lipschitz.std()
        channels = torch.nonzero(lipschitz > threshold).flatten()
        bn.weight[channels] = 0
        bn.bias[channels] = 0
        if len(channels):
            pruned[bn_name] = channels.tolist()
    details = {"pruned_channels": sum(map(len, pruned.values())), "pruned": pruned}
    if zero_variance:
        details["zero_variance_channels"] = zero_variance
        details["notes"] = [f"{zero_variance} channel(s) with running_var 0 scored with sigma = sqrt(eps) "
                            "(the survey's code cannot run such a model)"]
    return Defended(model, details)
