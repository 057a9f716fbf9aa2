"""CLP (Zheng et al., 2022): data-free channel Lipschitzness-based pruning.

For every convolution followed by batch norm, channel k's upper-bound Lipschitz constant is the
largest singular value of its kernel (reshaped in_channels x kh*kw) scaled by |gamma_k| / sigma_k.
Within each layer, channels above mean + u * std are pruned by zeroing their BN scale and shift.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import conv_bn_pairs
from . import Defended, defense


@dataclass(frozen=True)
class CLPParams:
    u: float = 3.0


def channel_lipschitz(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """Upper-bound channel Lipschitz constant of each output channel of ``bn(conv(x))``."""
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs()
    kernels = conv.weight.reshape(conv.out_channels, conv.in_channels // conv.groups, -1)
    return torch.linalg.matrix_norm(kernels * scale.view(-1, 1, 1), ord=2)


@defense("clp", "CLP: data-free pruning of channels with a high Lipschitz upper bound", CLPParams,
         family="pruning", needs_data=False)
@torch.no_grad()
def channel_lipschitz_pruning(model, data, params: CLPParams, device):
    model = model.to(device)
    pruned = {}
    for conv, bn, bn_name in conv_bn_pairs(model):
        lipschitz = channel_lipschitz(conv, bn)
        threshold = lipschitz.mean() + params.u * lipschitz.std()
        channels = torch.nonzero(lipschitz > threshold).flatten()
        bn.weight[channels] = 0
        bn.bias[channels] = 0
        if len(channels):
            pruned[bn_name] = channels.tolist()
    return Defended(model, {"pruned_channels": sum(map(len, pruned.values())), "pruned": pruned})
