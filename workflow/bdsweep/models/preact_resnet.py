"""PreAct-ResNet18 (He et al., 2016, identity mappings) in its CIFAR form: 3x3 stride-1 stem, no
max-pool, four stages of two pre-activation basic blocks, adaptive average pooling, so the same
network runs at 32 and 64 px.

As the survey's toolkit builds it (FORK ``models/preact_resnet.py``, ``PreActResNet18``; the same
in BB): layer4's output goes straight to the pooling, with no final BN-ReLU, so the network has 16
BN layers and 11,171,146 parameters at 10 classes. Module names and registration order (``conv1``,
``layerK.B.bn1/conv1/bn2/conv2/shortcut.0``, ``linear``) equal FORK's, so its BN-to-conv pairing
(CLP) and FP's ranked layer (the input of ``linear``) are the same too."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import ARCHITECTURES
from . import ModelParts


class PreActBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection shortcut sees the pre-activated input, as in the paper.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    parts = ModelParts(classifier="linear", last_conv="layer4.1.conv2", stages=("layer1", "layer2", "layer3", "layer4"),
                       polarizer="layer4.1.conv1")

    def __init__(self, num_classes: int, image_size: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        stages, in_channels = [], 64
        for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(PreActBlock(in_channels, channels, stride), PreActBlock(channels, channels, 1)))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = self.avgpool(out)
        return self.linear(torch.flatten(out, 1))


# Forward GFLOPs per image (torch.utils.flop_counter, 10 classes): bdsweep cost's fallback throughput.
ARCHITECTURES.register("preact_resnet18", "PreAct-ResNet18, 3x3 stride-1 stem, no max-pool",
                       forward_gflops={32: 1.111, 64: 4.443})(PreActResNet18)
